"""The tests build their packages with the demo's builder (real ``dpkg-deb``)."""

from bot.demo.debbuild import build_deb

__all__ = ["build_deb"]

"""Shared fixtures. Module-specific fixtures live in their test modules or in tests/*.py helpers."""

from __future__ import annotations

import shutil

import pytest

from tests.postgres import stop_session_server


def pytest_configure(config: pytest.Config) -> None:
    if shutil.which("dpkg-deb") is None:
        raise pytest.UsageError("dpkg-deb is needed by the tests (Debian package dpkg)")


def pytest_unconfigure(config: pytest.Config) -> None:
    stop_session_server()  # the throwaway PostgreSQL, if tests/databases.py started one

"""The image and the package metadata, checked from their files (no Docker needed)."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def ignored() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def excluded(path: str, patterns: list[str]) -> bool:
    return any(
        fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.removeprefix("**/"))
        for pattern in patterns
    )


def test_the_build_context_leaves_out_the_bulk_but_not_what_the_image_copies() -> None:
    patterns = ignored()
    for path in (".git", ".venv", "tests", "tgops-demo", ".env", "tgops.toml"):
        assert excluded(path, patterns), path
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = [
        source
        for line in dockerfile.splitlines()
        if line.startswith("COPY ")
        for source in line.split()[1:-1]
    ]
    assert copied, "the Dockerfile copies nothing?"
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not excluded(source, patterns), source


def test_the_image_runs_as_a_numeric_unprivileged_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    (user,) = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) >= 1000, user
    assert f"--uid {uid}" in dockerfile and f"--gid {gid}" in dockerfile


def test_the_license_is_an_spdx_expression_with_a_setuptools_that_reads_it() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    (setuptools,) = [r for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    minimum = tuple(int(p) for p in setuptools.removeprefix("setuptools>=").split("."))
    assert minimum >= (77,), setuptools  # PEP 639 license expressions: setuptools 77

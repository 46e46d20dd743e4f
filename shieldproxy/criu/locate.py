"""Find the CRIU binary and CRIU's Python package pycriu.

``scripts/criu.sh`` (run by ``make setup``) builds CRIU into ``.criu/`` of the
checkout and links ``.criu/lib/python`` into ``.venv``, so both are found there
without any configuration.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[2]
PROJECT_CRIU = REPO_ROOT / ".criu" / "bin" / "criu"
"""CRIU binary that scripts/criu.sh installs, valid when running from a checkout."""
CRIU_ENV = "SHIELDPROXY_CRIU"
"""Environment variable with the path of the CRIU binary to use."""

MIN_CRIU_VERSION = (4, 2)
"""CRIU 4.1 cannot dump TCP sockets on Linux 6.16 and later ("Can't get 1:16 opt")."""

_SETUP_HINT = "run `make setup` (scripts/criu.sh builds CRIU into .criu/)"
_VERSION_RE = re.compile(r"^Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", re.MULTILINE)
_VERSION_TIMEOUT = 10.0


class CriuNotFoundError(RuntimeError):
    """No usable CRIU binary or pycriu package was found."""


def criu_version(path: Path | str) -> tuple[int, int, int]:
    """Run ``PATH --version`` and return its version as (major, minor, patch).

    Raises:
        CriuNotFoundError: the program cannot run, fails, or prints no version.
    """
    try:
        result = subprocess.run(
            [str(path), "--version"],
            capture_output=True,
            text=True,
            timeout=_VERSION_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CriuNotFoundError(f"running {path} --version failed: {exc}") from exc
    match = _VERSION_RE.search(result.stdout)
    if result.returncode != 0 or match is None:
        output = (result.stdout + result.stderr).strip() or "(no output)"
        raise CriuNotFoundError(
            f"{path} --version exited {result.returncode} without a version: {output}"
        )
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def _format_version(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def _check_candidate(path: Path | str) -> str | None:
    """Return why PATH is not a usable CRIU, or None when it is one."""
    try:
        version = criu_version(path)
    except CriuNotFoundError as exc:
        return str(exc)
    if version[:2] < MIN_CRIU_VERSION:
        return (
            f"{path} is CRIU {_format_version(version)}, older than "
            f"{_format_version(MIN_CRIU_VERSION)}"
        )
    return None


def find_criu() -> Path:
    """Return the path of the CRIU binary to run, version 4.2 or newer.

    The first of these wins: the path in $SHIELDPROXY_CRIU, the project's
    ``.criu/bin/criu``, then ``criu`` on PATH.

    Raises:
        CriuNotFoundError: $SHIELDPROXY_CRIU names an unusable program, or no
            candidate is CRIU 4.2 or newer. The message lists each candidate's
            problem and what to run.
    """
    override = os.environ.get(CRIU_ENV)
    if override:
        problem = _check_candidate(override)
        if problem is not None:
            raise CriuNotFoundError(
                f"${CRIU_ENV} is {override!r}, which is not usable: {problem}. "
                f"Point it at CRIU {_format_version(MIN_CRIU_VERSION)} or newer, "
                f"or unset it and {_SETUP_HINT}"
            )
        return Path(override)

    problems: list[str] = []
    if PROJECT_CRIU.exists():
        problem = _check_candidate(PROJECT_CRIU)
        if problem is None:
            return PROJECT_CRIU
        problems.append(problem)
    else:
        problems.append(f"{PROJECT_CRIU} does not exist")

    on_path = shutil.which("criu")
    if on_path is None:
        problems.append("no criu on PATH")
    else:
        problem = _check_candidate(on_path)
        if problem is None:
            return Path(on_path)
        problems.append(problem)

    raise CriuNotFoundError(
        f"CRIU {_format_version(MIN_CRIU_VERSION)} or newer not found: "
        f"{'; '.join(problems)}. To fix this, {_SETUP_HINT} or set ${CRIU_ENV}"
    )


def import_pycriu_images() -> ModuleType:
    """Import and return ``pycriu.images``, CRIU's image message classes.

    Raises:
        CriuNotFoundError: pycriu or the protobuf runtime it needs is missing.
    """
    try:
        return importlib.import_module("pycriu.images")
    except ImportError as exc:
        raise CriuNotFoundError(
            f"cannot import pycriu ({exc}): {_SETUP_HINT}, which links "
            ".criu/lib/python into .venv; pycriu also needs the protobuf package"
        ) from exc

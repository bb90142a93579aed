"""Prerequisites of tests: a missing one skips a local run and FAILS under ``CI=true``.

``./bootstrap.sh test`` installs everything the suite uses (Debian packages, the ``dev`` extra),
so in CI a missing tool, package or privilege is a broken setup, never a silent skip (issue 20).
The only skips CI accepts are about hardware this machine kind lacks: ``skip(..., hardware=True)``.
Every skip in the suite goes through here; ``tests/unit/test_suite_layout.py`` checks that.
"""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType

import pytest

CI = os.environ.get("CI") == "true"


def skip(reason: str, *, hardware: bool = False, allow_module_level: bool = False) -> None:
    """Skip (locally) or fail (CI=true) with ``reason``; ``hardware=True`` skips in CI too."""
    if CI and not hardware:
        pytest.fail(f"{reason} -- under CI=true a missing prerequisite fails the test (./bootstrap.sh test "
                    "installs what the suite needs)", pytrace=False)
    pytest.skip(reason, allow_module_level=allow_module_level)


def module(name: str, *, why: str = "", module_level: bool = False) -> ModuleType:
    """``importlib.import_module(name)``, or skip/fail saying which package is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        skip(f"needs the Python package for {name!r} ({exc}){': ' + why if why else ''}; "
             "pip install -e '.[dev]'", allow_module_level=module_level)
        raise  # unreachable: skip() raises


def tool(name: str, *, module_level: bool = False) -> str:
    """The path of command ``name``, or skip/fail."""
    path = shutil.which(name)
    if path is None:
        skip(f"needs the {name!r} command (./bootstrap.sh test installs it)", allow_module_level=module_level)
    return path  # type: ignore[return-value]


def root(what: str) -> None:
    """Skip/fail unless running as root."""
    if os.geteuid() != 0:
        skip(f"needs root: {what}")

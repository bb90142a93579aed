"""Fixtures for the network lab tests: one real Lab (namespaces + servers) per test session.

``lab``: a started ``busted.lab.Lab`` shared by the session (needs root; skipped otherwise,
except under CI=true where not being root is a failure).
"""

import os

import pytest


def _require_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("the network lab tests must run as root in CI (namespaces, veths, port 53/443)",
                        pytrace=False)
        pytest.skip("needs root: the network lab creates network namespaces")


@pytest.fixture(scope="session")
def lab():
    _require_root()
    from busted.lab import Lab

    with Lab() as lab_:
        yield lab_


@pytest.fixture
def need_root():
    """For tests that build their own Lab."""
    _require_root()

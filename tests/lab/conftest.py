"""Fixtures for the network lab tests: one real Lab (namespaces + servers) per test session.

``lab``: a started ``busted.lab.Lab`` shared by the session (needs root; skipped otherwise,
except under CI=true where not being root is a failure).
"""

import needs
import pytest


def _require_root() -> None:
    needs.root("the network lab creates network namespaces, veths, servers on ports 53/443")


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

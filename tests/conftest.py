"""Shared test setup. Kernel-facing tests need root; under CI=true they must never skip."""

import needs
import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/kernel/" in str(item.fspath) or "/tests/lab/" in str(item.fspath):
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(scope="session")
def root_required():
    needs.root("kernel tests load real BPF programs")

"""Shared test setup. Kernel-facing tests need root; under CI=true they must never skip."""

import os

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/kernel/" in str(item.fspath) or "/tests/lab/" in str(item.fspath):
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(scope="session")
def root_required():
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("kernel tests must run as root in CI (they load real BPF)")
        pytest.skip("needs root: loads real BPF programs")

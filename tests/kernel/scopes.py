"""Helpers shared by the policy tests (a module, not conftest.py: several conftest modules exist)."""

import contextlib
import os
import time
from pathlib import Path


@contextlib.contextmanager
def scope_cgroup(name: str):
    """A cgroup v2 directory made for a test module's clients (an enforcement scope), removed
    once its processes are gone (bounded wait)."""
    from busted.policy.enforce import cgroup2_mount

    mount = cgroup2_mount()
    assert mount is not None
    path = Path(mount) / f"{name}-{os.getpid()}"
    path.mkdir()
    yield path
    for _ in range(50):  # its processes are gone once the clients are reaped
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{path} still has processes: {(path / 'cgroup.procs').read_text()}")

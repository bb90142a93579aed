import subprocess
import sys
import time
from pathlib import Path

import pytest

PEERS = str(Path(__file__).with_name("peers.py"))


@pytest.fixture(autouse=True)
def _root(root_required):
    return None


@pytest.fixture(scope="module")
def lab():
    """A network lab (namespaces, lab DNS, fake providers) shared by a test module."""
    from busted.lab import Lab

    with Lab() as lab:
        yield lab


class Peer:
    """A peers.py child process; ``port`` is known once it listens."""

    def __init__(self, mode: str, host: str, port: int, num: int, name: str, netns: str | None = None):
        argv = [sys.executable, PEERS, mode, host, str(port), str(num), name]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.port = port
        if mode in ("server", "many"):
            line = self.proc.stdout.readline()
            assert line.startswith("PORT"), (line, self.proc.stderr.read() if self.proc.poll() else "")
            self.port = int(line.split()[1])

    def wait(self, timeout: float = 30) -> str:
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        return out


def collect(mon, done, timeout: float = 10.0) -> list:
    """Events from ``mon`` until ``done(events)`` is true or ``timeout`` passes (bounded)."""
    got: list = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in mon.events(timeout=0.2):
            got.append(ev)
            if done(got):
                return got
        if done(got):
            return got
    return got

"""Root runs busted from a directory another user owns (issue 17 item 1): the interpreters busted
starts (the BPF compile child, the lab's servers) must not import the code planted there."""

import os
import subprocess
import sys

import pytest

NOBODY = 65534
PLANTED = ("json.py", "bcc/__init__.py", "busted/__init__.py")
# The parent as the `busted` command runs (its directory first on sys.path, not the caller's): -P.
BUSTED = [sys.executable, "-P", "-m", "busted.cli"]


@pytest.fixture
def planted(tmp_path):
    """A directory owned by uid 65534 holding json.py, bcc/ and busted/ that leave a marker when imported."""
    markers = tmp_path / "markers"
    markers.mkdir()
    evil = tmp_path / "theirs"
    for rel in PLANTED:
        f = evil / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        name = rel.replace("/", "_")
        f.write_text(f"import os, sys\nopen({str(markers / name)!r}, 'w').write(f'uid={{os.getuid()}} "
                     f"argv={{sys.argv}}')\n")
    for p in (evil, *evil.rglob("*")):
        os.chown(p, NOBODY, NOBODY)
    return evil, markers


def test_the_compile_child_imports_nothing_from_the_working_directory(planted):
    evil, markers = planted
    env = dict(os.environ, BUSTED_BPF_CACHE="off")  # no cache: the compile child runs
    r = subprocess.run([*BUSTED, "monitor", "--json", "--duration", "0.5"], cwd=evil, env=env,
                       capture_output=True, text=True, timeout=180)
    found = {p.name: p.read_text() for p in markers.iterdir()}
    assert found == {}, found
    assert r.returncode == 0, r.stderr[-3000:]
    assert "busted: monitoring" in r.stderr  # the probes compiled (in the child) and loaded


def test_lab_children_import_nothing_from_the_working_directory(planted, monkeypatch):
    from busted.lab import Lab

    evil, markers = planted
    monkeypatch.chdir(evil)
    with Lab() as lab:
        r = lab.run_client(["getent", "ahostsv4", "api.openai.com"], timeout=20)  # the lab DNS server answers
        assert r.returncode == 0 and lab.hosts["api.openai.com"].ipv4 in r.stdout.decode(), r
        for run in (lab.run_client, lambda argv: lab.spawn_client(argv).communicate(timeout=20)):
            run([sys.executable, "-c", "import json"])  # a demo client, as `busted lab` starts them
    found = {p.name: p.read_text() for p in markers.iterdir()}
    assert found == {}, found

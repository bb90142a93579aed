"""Child interpreters of a root process (issue 17 item 1): isolated from the caller's directory and
environment (busted/_safe.py). The kernel test tests/kernel/test_isolation.py runs the real children."""

import os
import subprocess

from busted._safe import CHILD_CWD, SAFE_PATH, child_env, python_argv


def test_a_child_imports_neither_the_working_directory_nor_pythonpath(tmp_path):
    (tmp_path / "json.py").write_text(f"open({str(tmp_path / 'marker')!r}, 'w').write('imported')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    # Even started from the planted directory with PYTHONPATH naming it (callers also pass cwd=CHILD_CWD).
    r = subprocess.run(python_argv("json.tool"), input=b'{"a": 1}', cwd=tmp_path, env=env, capture_output=True,
                       timeout=60)
    assert r.returncode == 0 and b'"a": 1' in r.stdout, r.stderr
    assert not (tmp_path / "marker").exists()


def test_a_child_finds_this_busted_and_gets_its_arguments():
    r = subprocess.run(python_argv("busted.lab.dns_server", "--help"), cwd=CHILD_CWD, env=child_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--config" in r.stdout, r.stderr


def test_the_child_environment_is_scrubbed(monkeypatch):
    for k, v in {"PYTHONPATH": "/home/u", "LD_PRELOAD": "/home/u/x.so", "PATH": "/home/u/bin:/usr/bin",
                 "BCC_KERNEL_SOURCE": "/usr/src/k", "LANG": "C.UTF-8", "OPENAI_API_KEY": "sk-x"}.items():
        monkeypatch.setenv(k, v)
    assert child_env({"X": "1"}) == {"PATH": SAFE_PATH, "BCC_KERNEL_SOURCE": "/usr/src/k", "LANG": "C.UTF-8",
                                     "X": "1"}
    assert python_argv("m")[1] == "-I"

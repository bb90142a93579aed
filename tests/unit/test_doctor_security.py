"""``busted doctor --security`` (issue 17): the checks a root monitor's trust depends on, each
OK/WARN/FAIL with what to do. Directories and files owned by uid 65534 stand for another user."""

import io
import json
import os
import sys

import pytest

from busted.cli import main

NOBODY = 65534


def _run(*argv):
    out = io.StringIO()
    rc = main(["doctor", "--security", "--json", *argv], out=out)
    return rc, json.loads(out.getvalue())["security"]


def _one(checks, name):
    got = [c for c in checks if c["check"] == name]
    assert len(got) == 1, checks
    return got[0]


@pytest.fixture
def nobody_dir(tmp_path, root_required):
    d = tmp_path / "theirs"
    d.mkdir()
    os.chown(d, NOBODY, NOBODY)
    return d


def test_bytecode_cache_is_judged_by_the_monitors_rule(tmp_path, nobody_dir, monkeypatch):
    monkeypatch.setenv("BUSTED_BPF_CACHE", str(nobody_dir))
    c = _one(_run()[1], "bytecode cache")
    assert c["status"] == "WARN" and "not trusted" in c["detail"] and "chmod 700" in c["detail"]
    mine = tmp_path / "cache"
    mine.mkdir(mode=0o700)
    (mine / "a.json").write_text("{}")
    os.chown(mine / "a.json", NOBODY, NOBODY)
    monkeypatch.setenv("BUSTED_BPF_CACHE", str(mine))
    c = _one(_run()[1], "bytecode cache")
    assert c["status"] == "WARN" and "1 file(s)" in c["detail"] and "a.json" in c["detail"]
    (mine / "a.json").unlink()
    assert _one(_run()[1], "bytecode cache")["status"] == "OK"
    monkeypatch.setenv("BUSTED_BPF_CACHE", "off")
    assert _one(_run()[1], "bytecode cache")["status"] == "OK"


def test_policy_and_prices_files_another_user_can_change(tmp_path, nobody_dir):
    pol = tmp_path / "policy.toml"
    pol.write_text("")
    os.chown(pol, NOBODY, NOBODY)
    prices = tmp_path / "prices.json"
    prices.write_text("{}")
    prices.chmod(0o666)
    rc, checks = _run("--policy", str(pol), "--prices", str(prices))
    assert rc == 1
    p = _one(checks, "--policy")
    assert p["status"] == "FAIL" and f"owned by uid {NOBODY}" in p["detail"] and "chown root" in p["detail"]
    pr = _one(checks, "--prices")
    assert pr["status"] == "FAIL" and "writable by group or others" in pr["detail"]  # the monitor refuses it
    in_theirs = nobody_dir / "policy.toml"
    in_theirs.write_text("")
    assert _one(_run("--policy", str(in_theirs))[1], "--policy")["status"] == "FAIL"  # their directory
    pol.unlink()
    pol.write_text("")
    pol.chmod(0o644)
    assert _one(_run("--policy", str(pol))[1], "--policy")["status"] == "OK"


def test_where_the_store_and_jsonl_would_go(tmp_path, nobody_dir):
    c = _one(_run("--store", str(nobody_dir / "audit.db"))[1], "--store")
    assert c["status"] == "FAIL" and f"uid {NOBODY}" in c["detail"] and "refuses" in c["detail"]
    (tmp_path / "shadow").write_text("x")
    (tmp_path / "out.jsonl").symlink_to(tmp_path / "shadow")
    c = _one(_run("--jsonl", str(tmp_path / "out.jsonl"))[1], "--jsonl")
    assert c["status"] == "FAIL" and "symbolic link" in c["detail"]
    (tmp_path / "old.db").write_text("")
    (tmp_path / "old.db").chmod(0o644)
    c = _one(_run("--store", str(tmp_path / "old.db"))[1], "--store")
    assert c["status"] == "WARN" and "readable by other users" in c["detail"] and "chmod 600" in c["detail"]
    rc, checks = _run("--store", str(tmp_path / "new.db"), "--jsonl", str(tmp_path / "new.jsonl"))
    assert {(c["check"], c["status"]) for c in checks if c["check"].startswith("--")} == {
        ("--store", "OK"), ("--jsonl", "OK")}
    assert "created 0600" in _one(checks, "--store")["detail"]
    assert not (tmp_path / "new.db").exists()  # checking creates nothing


def test_bind_addresses(monkeypatch):
    _, checks = _run("--metrics", "0.0.0.0:9464", "--ui", "127.0.0.1:8765")
    m, u = _one(checks, "--metrics"), _one(checks, "--ui")
    assert m["status"] == "WARN" and "beyond loopback" in m["detail"] and "127.0.0.1" in m["detail"]
    assert u["status"] == "OK"
    for addr in ("[::1]:9464", "9464", "localhost:9464"):
        assert _one(_run("--metrics", addr)[1], "--metrics")["status"] == "OK", addr
    assert _one(_run("--ui", "[::]:80")[1], "--ui")["status"] == "WARN"


def test_an_import_directory_another_user_owns(nobody_dir, monkeypatch):
    monkeypatch.setattr(sys, "path", [*sys.path, str(nobody_dir)])
    rc, checks = _run()
    c = _one(checks, "import path")
    assert rc == 1 and c["status"] == "FAIL" and str(nobody_dir) in c["detail"]


def test_text_output_and_options_without_security(capsys, tmp_path):
    out = io.StringIO()
    main(["doctor", "--security", "--metrics", "0.0.0.0:1"], out=out)
    lines = out.getvalue().splitlines()
    assert any(ln.startswith("WARN --metrics") for ln in lines)
    assert all(ln.split()[0] in ("OK", "WARN", "FAIL") for ln in lines)
    assert main(["doctor", "--policy", str(tmp_path / "p.toml")]) == 2
    assert "add --security" in capsys.readouterr().err

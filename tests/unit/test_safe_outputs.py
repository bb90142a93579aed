"""Outputs written as root (issue 17 items 7, 8): never through a link, created 0600, an existing
file or directory another user controls refused with a message saying what to do (busted/_safe.py)."""

import io
import os
import stat

import pytest

import busted
from busted.cli import main
from busted.errors import StoreError
from busted.sinks import JsonlSink, Store

NOBODY = 65534


def _root_only(path):
    path.write_bytes(b"ROOT ONLY\n")
    path.chmod(0o600)
    return path


def _mode(p):
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_a_store_lock_that_is_a_symlink_leaves_its_target_alone(tmp_path):
    target = _root_only(tmp_path / "shadow")
    (tmp_path / "audit.db.lock").symlink_to(target)
    with pytest.raises(StoreError, match=r"audit\.db\.lock: is a symbolic link.*Remove it"):
        Store(tmp_path / "audit.db")
    assert target.read_bytes() == b"ROOT ONLY\n"
    assert not (tmp_path / "audit.db").exists()


def test_a_store_that_is_a_symlink_is_refused(tmp_path):
    target = tmp_path / "empty-root-file"
    target.write_bytes(b"")
    (tmp_path / "audit.db").symlink_to(target)
    with pytest.raises(StoreError, match="symbolic link"):
        Store(tmp_path / "audit.db")
    assert target.read_bytes() == b""


@pytest.mark.parametrize("suffix", ["-wal", "-shm", "-journal"])
def test_store_side_files_that_are_symlinks_are_refused(tmp_path, suffix):
    target = _root_only(tmp_path / "shadow")
    (tmp_path / f"audit.db{suffix}").symlink_to(target)
    with pytest.raises(StoreError, match="symbolic link"):
        Store(tmp_path / "audit.db")
    assert target.read_bytes() == b"ROOT ONLY\n"


def test_jsonl_through_a_symlink_is_refused(tmp_path):
    target = _root_only(tmp_path / "shadow")
    (tmp_path / "out.jsonl").symlink_to(target)
    with pytest.raises(StoreError, match="symbolic link"):
        JsonlSink(tmp_path / "out.jsonl")
    assert target.read_bytes() == b"ROOT ONLY\n"


def test_cli_jsonl_through_a_symlink_exits_2_before_the_monitor(tmp_path, monkeypatch, capsys):
    made = []
    options = busted.MonitorOptions  # the fake takes what the real Monitor takes, no more
    monkeypatch.setattr(busted, "Monitor", lambda **kw: made.append(options(**kw)))
    target = _root_only(tmp_path / "shadow")
    (tmp_path / "out.jsonl").symlink_to(target)
    rc = main(["monitor", "--jsonl", str(tmp_path / "out.jsonl"), "--duration", "0"], out=io.StringIO())
    assert rc == 2 and "symbolic link" in capsys.readouterr().err
    assert made == [] and target.read_bytes() == b"ROOT ONLY\n"


def test_outputs_are_created_0600(tmp_path):
    os.umask(old := os.umask(0o022))
    try:
        s = Store(tmp_path / "audit.db")
        try:
            for name in ("audit.db", "audit.db.lock", "audit.db-wal", "audit.db-shm"):
                assert _mode(tmp_path / name) == 0o600, name
        finally:
            s.close()
        with JsonlSink(tmp_path / "out.jsonl", max_bytes=10, backups=2) as j:
            assert _mode(tmp_path / "out.jsonl") == 0o600
            from events_factory import sample_events

            for ev in sample_events()[:5]:
                j.write(ev)
            j.flush()
        assert j.rotations >= 1
        for p in tmp_path.glob("out.jsonl*"):
            assert _mode(p) == 0o600, p.name
    finally:
        os.umask(old)


def test_a_file_owned_by_another_user_is_refused(tmp_path, root_required):
    for name in ("out.jsonl", "audit.db"):
        (tmp_path / name).write_bytes(b"")
        os.chown(tmp_path / name, NOBODY, NOBODY)
    with pytest.raises(StoreError, match=f"owned by uid {NOBODY}"):
        JsonlSink(tmp_path / "out.jsonl")
    with pytest.raises(StoreError, match=f"owned by uid {NOBODY}"):
        Store(tmp_path / "audit.db")
    assert (tmp_path / "out.jsonl").read_bytes() == b"" and (tmp_path / "audit.db").read_bytes() == b""


def test_a_hard_link_or_a_group_writable_file_is_refused(tmp_path):
    other = tmp_path / "passwd"
    other.write_bytes(b"x\n")
    os.link(other, tmp_path / "out.jsonl")
    with pytest.raises(StoreError, match="hard links"):
        JsonlSink(tmp_path / "out.jsonl")
    gw = tmp_path / "gw.jsonl"
    gw.write_bytes(b"")
    gw.chmod(0o664)
    with pytest.raises(StoreError, match="writable by group or others"):
        JsonlSink(gw)
    assert other.read_bytes() == b"x\n" and gw.read_bytes() == b""


def test_a_directory_another_user_can_write_is_refused(tmp_path, root_required):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(StoreError, match=rf"directory .*theirs can be written by uid {NOBODY}.*chmod go-w"):
        JsonlSink(theirs / "out.jsonl")
    with pytest.raises(StoreError, match=f"uid {NOBODY}"):
        Store(theirs / "audit.db")
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(StoreError, match="can be written by other users"):
        JsonlSink(open_dir / "out.jsonl")
    assert list(theirs.iterdir()) == [] and list(open_dir.iterdir()) == []
    sticky = tmp_path / "sticky"  # like /tmp: others cannot rename or remove our files there
    sticky.mkdir()
    sticky.chmod(0o1777)
    with JsonlSink(sticky / "out.jsonl"):
        pass
    assert _mode(sticky / "out.jsonl") == 0o600


def test_an_existing_private_output_is_appended_to(tmp_path):
    p = tmp_path / "out.jsonl"
    p.write_bytes(b'{"kind":"old"}\n')
    p.chmod(0o640)  # the owner's choice of mode is kept
    with JsonlSink(p):
        pass
    assert p.read_bytes() == b'{"kind":"old"}\n' and _mode(p) == 0o640


# -- busted query: reading a store as root ---------------------------------------------------------


def _store(d):
    from events_factory import sample_events

    p = d / "q.db"
    with Store(p) as s:
        s.write_many(sample_events())
    return p


def test_query_creates_nothing_next_to_an_idle_store(tmp_path):
    """A read-only open in WAL mode made SQLite create -shm and -wal next to the store (as root)."""
    p = _store(tmp_path)
    before = sorted(os.listdir(tmp_path))
    out = io.StringIO()
    assert main(["query", "--store", str(p), "--json"], out=out) == 0
    assert '"flow_id": 4242' in out.getvalue()  # the flows table: one flow
    with Store.open_readonly(p) as r:
        assert len(list(r.events())) == 6
    assert sorted(os.listdir(tmp_path)) == before  # no -shm, no -wal


def test_query_while_a_writer_runs_sees_its_rows(tmp_path):
    from events_factory import sample_events

    p = tmp_path / "w.db"
    with Store(p) as w:
        w.write_many(sample_events())
        w.flush()
        with Store.open_readonly(p) as r:  # not immutable: the WAL holds the rows
            assert len(list(r.events())) == 6
        w.write_many(sample_events(flow_id=2))
        w.flush()
        with Store.open_readonly(p) as r:
            assert len(list(r.events())) == 12


@pytest.mark.parametrize("plant", ["store-owned-by-nobody", "store-group-writable", "directory-world-writable",
                                   "shm-symlink", "store-symlink"])
def test_query_refuses_a_store_another_user_controls(tmp_path, plant, capsys):
    d = tmp_path / "shared"
    d.mkdir(mode=0o755)
    p = _store(d)
    victim = _root_only(tmp_path / "victim")
    target = p
    if plant == "store-owned-by-nobody":
        os.chown(p, NOBODY, NOBODY)
    elif plant == "store-group-writable":
        p.chmod(0o660)
    elif plant == "directory-world-writable":
        d.chmod(0o777)
    elif plant == "shm-symlink":
        (d / "q.db-shm").symlink_to(victim)
    else:
        target = d / "link.db"
        target.symlink_to(p)
    with pytest.raises(StoreError, match="refusing to read") as ei:
        Store.open_readonly(target)
    assert str(target) in str(ei.value)
    assert main(["query", "--store", str(target)], out=io.StringIO()) == 2
    assert "refusing to read" in capsys.readouterr().err
    assert victim.read_bytes() == b"ROOT ONLY\n" and _mode(victim) == 0o600

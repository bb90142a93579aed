"""JSONL sink: one event per line, exact round trip, rotation, stdout, secrets masked."""

import json
import threading
import time

import pytest
from events_factory import sample_events
from hypothesis import given, settings
from hypothesis import strategies as st

from busted import StoreError
from busted.sinks import JsonlSink, Sink, event_from_dict, redact


def _read(path):
    return [event_from_dict(json.loads(ln)) for ln in path.read_text().splitlines()]


def test_lines_round_trip(tmp_path):
    p = tmp_path / "x.jsonl"
    evs = sample_events()
    with JsonlSink(p) as s:
        assert isinstance(s, Sink)
        for ev in evs:
            s.write(ev)
    assert _read(p) == evs
    first = json.loads(p.read_text().splitlines()[0])
    assert list(first)[0] == "kind" and first["kind"] == "dns_answer"


def test_lineage_fields_are_keys_of_the_line(tmp_path):
    from dataclasses import replace

    from busted import Ancestor

    p = tmp_path / "who.jsonl"
    ev = replace(sample_events()[1], ancestry=(Ancestor(100, "curl", "/usr/bin/curl"), Ancestor(9, "bash", None)),
                 agent="codex-cli", container_id="ab" * 32, container_runtime="cri-o",
                 pod_uid="6f5bd2a4-9c3e-4d1a-8b7f-2e6c9d0a1b3c", pod_qos="guaranteed", proc_start_time=1_699_999_999.5)
    with JsonlSink(p) as s:
        s.write(ev)
    line = json.loads(p.read_text())
    assert (line["pod_qos"], line["proc_start_time"], line["agent"]) == ("guaranteed", 1_699_999_999.5, "codex-cli")
    assert line["ancestry"][1] == {"pid": 9, "comm": "bash", "exe": None}
    assert _read(p) == [ev]


def test_appends_across_sessions(tmp_path):
    p = tmp_path / "a.jsonl"
    with JsonlSink(p) as s:
        s.write(sample_events()[0])
    with JsonlSink(p) as s:
        s.write(sample_events()[1])
    assert [e.kind for e in _read(p)] == ["dns_answer", "flow_opened"]


def test_rotation_keeps_n_backups_and_every_line_parses(tmp_path):
    p = tmp_path / "e.jsonl"
    n = 0
    with JsonlSink(p, max_bytes=2000, backups=2) as s:
        for i in range(30):
            for ev in sample_events(flow_id=i):
                s.write(ev)
                n += 1
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["e.jsonl", "e.jsonl.1", "e.jsonl.2"]
    assert s.rotations > 2 and s.written == n
    seen = []
    for f in (p.with_name("e.jsonl.2"), p.with_name("e.jsonl.1"), p):  # oldest first
        assert f.stat().st_size <= 2000
        seen += _read(f)
    # the newest events are kept, in order, with nothing torn across files
    flat = [e for i in range(30) for e in sample_events(flow_id=i)]
    assert seen == flat[len(flat) - len(seen):]


def test_rotation_with_no_backups_starts_over(tmp_path):
    p = tmp_path / "z.jsonl"
    with JsonlSink(p, max_bytes=1500, backups=0) as s:
        for ev in sample_events() * 5:
            s.write(ev)
    assert [f.name for f in tmp_path.iterdir()] == ["z.jsonl"] and p.stat().st_size <= 1500
    got = _read(p)
    assert got and got == (sample_events() * 5)[-len(got):]  # the newest lines, whole and in order
    assert s.rotations >= 1


def test_stdout(capsys):
    s = JsonlSink("-")
    for ev in sample_events():
        s.write(ev)
    s.close()
    s.close()  # idempotent
    out = capsys.readouterr().out.splitlines()
    assert [event_from_dict(json.loads(ln)) for ln in out] == sample_events()


def test_lines_reach_the_file_within_the_flush_interval(tmp_path):
    p = tmp_path / "f.jsonl"
    s = JsonlSink(p, flush_interval=0.0)
    s.write(sample_events()[0])
    assert len(p.read_text().splitlines()) == 1  # visible to `tail -f` without close
    s.close()


def test_a_timer_flushes_when_traffic_stops(tmp_path):
    """Issue 8.8: lines written and then nothing more must reach the file without close()."""
    p = tmp_path / "timer.jsonl"
    s = JsonlSink(p, flush_interval=0.1)
    try:
        evs = sample_events()
        for ev in evs:
            s.write(ev)
        deadline = time.monotonic() + 5
        while p.stat().st_size == 0:  # no later event comes; only the timer can write them
            assert time.monotonic() < deadline, "the buffered lines never reached the file"
            time.sleep(0.02)
        assert _read(p) == evs and s.written == len(evs)
    finally:
        s.close()
    assert s.report() == {"written": 6, "lost": 0, "dropped": 0, "unwritten": 0,
                          "text": f"jsonl {p}: 6 events written, 0 lost"}


def test_threads_do_not_interleave_lines(tmp_path):
    p = tmp_path / "t.jsonl"
    with JsonlSink(p, max_bytes=20_000, backups=50) as s:
        ths = [threading.Thread(target=lambda i=i: [s.write(ev) for ev in sample_events(flow_id=i) * 20])
               for i in range(8)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
    lines = [ln for f in tmp_path.iterdir() for ln in f.read_text().splitlines()]
    assert len(lines) == 8 * 6 * 20
    for ln in lines:
        json.loads(ln)


def test_errors_name_the_path(tmp_path):
    with pytest.raises(StoreError, match="no/such/dir/x.jsonl: cannot open the JSONL output"):
        JsonlSink(tmp_path / "no" / "such" / "dir" / "x.jsonl")
    s = JsonlSink(tmp_path / "c.jsonl")
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.write(sample_events()[0])


def test_secrets_never_reach_the_file(tmp_path):
    class Leaky:
        kind = "leaky"

        def to_dict(self):
            return {"kind": "leaky",
                    "headers": [["Authorization", "Bearer sk-live-123"], ["X-Api-Key", "k1"]],
                    "request": {"api_key": "k2", "Cookie": "session=abc", "model": "gpt-4o"}}

    p = tmp_path / "s.jsonl"
    with JsonlSink(p) as s:
        s.write(Leaky())
    text = p.read_text()
    for secret in ("sk-live-123", "k1", "k2", "session=abc"):
        assert secret not in text
    assert json.loads(text)["request"]["model"] == "gpt-4o"


# -- redact ---------------------------------------------------------------------------------------


def test_redact_any_depth_and_header_pairs():
    d = {"a": {"Authorization": "Bearer x", "headers": [["x-api-key", "k"], ["accept", "json"]]},
         "api-key": "z", "Proxy-Authorization": "Basic y", "list": [{"cookie": "c"}],
         "pairs": (("API_KEY", "q"), ("x", "y")), "nested": {"authorization": {"deep": "secret"}}}
    r = redact(d)
    assert r["a"]["Authorization"] == "[REDACTED]" and r["api-key"] == "[REDACTED]"
    assert r["a"]["headers"] == [["x-api-key", "[REDACTED]"], ["accept", "json"]]
    assert r["Proxy-Authorization"] == "[REDACTED]" and r["list"] == [{"cookie": "[REDACTED]"}]
    assert r["pairs"] == (("API_KEY", "[REDACTED]"), ("x", "y"))
    assert r["nested"] == {"authorization": "[REDACTED]"}
    assert d["a"]["Authorization"] == "Bearer x"  # input untouched


def test_redact_leaves_ordinary_data_alone():
    for ev in sample_events():
        assert redact(ev.to_dict()) == ev.to_dict()
    # a plain list of two strings is not a header list (e.g. a command line)
    assert redact({"cmdline": ["cookie", "jar"]}) == {"cmdline": ["cookie", "jar"]}


_KEYS = st.sampled_from(["a", "Authorization", "x-api-key", "COOKIE", "b"]) | st.text(max_size=6)


@settings(max_examples=200)
@given(st.recursive(st.none() | st.integers() | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(_KEYS, kids, max_size=4),
                    max_leaves=20),
       st.text(min_size=1, max_size=12))
def test_redact_never_lets_a_secret_through(tree, secret):
    wrapped = {"x": tree, "Authorization": secret, "h": [["Cookie", secret]], "d": {"x-api-key": secret}}
    r = redact(wrapped)
    assert r["Authorization"] == r["h"][0][1] == r["d"]["x-api-key"] == "[REDACTED]"
    assert redact(r) == r  # idempotent


def test_llm_calls_round_trip_and_their_secrets_are_masked(tmp_path):
    from dataclasses import replace

    from events_factory import SECRET, sample_calls

    clean = sample_calls()
    dirty = sample_calls(flow_id=7, secret=SECRET)
    p = tmp_path / "c.jsonl"
    with JsonlSink(p) as s:
        for ev in clean + dirty:
            s.write(ev)
    assert SECRET not in p.read_text()
    got = _read(p)
    assert got[:3] == clean  # exact: every field, None kept as None
    masked = replace(dirty[0], path="/v1/chat/completions?key=[REDACTED]",
                     user_agent="OpenAI/Python 1.54.0 [REDACTED]", prompt="hello [REDACTED]",
                     response_id="chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG-[REDACTED]")
    assert got[3:] == [masked, *dirty[1:]]
    assert [e.kind for e in got] == ["llm_call", "mcp_message", "mcp_message"] * 2


@pytest.mark.parametrize("plant", ["unsafe-directory", "directory-at-backup"])
def test_failed_reopen_after_rotation_is_told_counted_retried_never_stdout(tmp_path, capsys, plant):
    """A rotation whose new file cannot be opened left ``_fd`` None, which ``_write_out`` took for
    stdout (and a refused open raised StoreError out of write()): lines must wait or be counted
    as lost, never go to stdout, and the open is retried on later writes."""
    import os

    from busted import EventsLost, LossPlace

    d = tmp_path / "out"
    d.mkdir(mode=0o700)
    p = d / "r.jsonl"
    msgs: list[str] = []
    evs = sample_events()
    s = JsonlSink(p, max_bytes=3000, backups=1, flush_interval=0, max_backlog=2000, on_error=msgs.append)
    try:
        if plant == "unsafe-directory":  # open_private refuses a directory others may write (no sticky bit)
            os.chmod(d, 0o777)
        else:  # path -> path.1 cannot be renamed over a non-empty directory
            (d / "r.jsonl.1").mkdir()
            (d / "r.jsonl.1" / "x").write_text("")
        for _ in range(30):  # well past max_bytes: a rotation is attempted and fails
            for ev in evs:
                s.write(ev)  # never raises
        assert msgs, "the failed rotation was not told"
        assert str(p) in msgs[0] and ("cannot reopen" if plant == "unsafe-directory" else "cannot rotate") in msgs[0]
        assert len(msgs) == 1, msgs  # told once, not per write
        assert capsys.readouterr().out == ""  # nothing went to stdout
        if plant == "unsafe-directory":
            assert s.dropped > 0 and s.last_error is not None  # backlog 2000 bytes: the rest counted
            dropped = s.dropped
            os.chmod(d, 0o700)  # fixed: the next write opens the path again
            s.write(evs[0])
            s.flush()
            lines = [json.loads(ln) for ln in p.read_text().splitlines()]
            lost = [ln for ln in lines if "JsonlSink" in ln.get("detail", "")]
            assert len(lost) == 1 and lost[0]["count"] == dropped and lost[0]["where"] == "sink"
            assert isinstance(event_from_dict(lost[0]), EventsLost) and LossPlace.SINK.name.lower() == "sink"
            assert "writes again" in msgs[-1]
    finally:
        os.chmod(d, 0o700)
        s.close()
    rep = s.report()
    assert rep["lost"] == s.dropped and capsys.readouterr().out == ""
    if plant == "directory-at-backup":  # nothing lost: every line in the (oversized) file
        assert rep["lost"] == 0 and len(p.read_text().splitlines()) == rep["written"] == 30 * len(evs)


def _files(base) -> dict[str, bytes]:
    return {p.name.replace(base.name, "x"): p.read_bytes() for p in sorted(base.parent.glob(base.name + "*"))}


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=8), max_bytes=st.sampled_from([700, 3000, 1 << 20]),
       backups=st.sampled_from([0, 2]))
def test_batches_write_what_lines_one_by_one_write(tmp_path_factory, sizes, max_bytes, backups):
    """write_encoded takes a batch whole when no line of it would rotate, write out or drop: the
    files (rotations included) hold what writing the same events one by one leaves."""
    from busted.sinks import encode

    d = tmp_path_factory.mktemp("b")
    evs = [ev for i in range(sum(sizes)) for ev in sample_events(flow_id=i)][: sum(sizes)]
    one, many = d / "one.jsonl", d / "many.jsonl"
    with JsonlSink(one, max_bytes=max_bytes, backups=backups) as s:
        for ev in evs:
            s.write(ev)
    with JsonlSink(many, max_bytes=max_bytes, backups=backups) as s:
        i = 0
        for n in sizes:
            s.write_encoded([encode(ev) for ev in evs[i:i + n]], flush=n % 2 == 0)
            i += n
    assert _files(many) == _files(one)


def test_a_batch_with_an_event_that_does_not_encode(tmp_path):
    """The lines before it are written, then the error is raised (as line by line)."""
    from busted.sinks import encode

    class Bad(Exception):
        pass

    class Broken:
        def to_dict(self):
            raise Bad

        kind = "broken"

    good = sample_events()
    with JsonlSink(tmp_path / "e.jsonl") as s:
        with pytest.raises(Bad):
            s.write_encoded([encode(good[0]), Broken(), encode(good[1])])  # type: ignore[list-item]
    lines = (tmp_path / "e.jsonl").read_text().splitlines()
    assert [json.loads(ln)["kind"] for ln in lines] == [good[0].kind]

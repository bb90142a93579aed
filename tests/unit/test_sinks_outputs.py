import json
import urllib.request

import pytest
from events_factory import sample_events

import busted
from busted.sinks import JsonlSink, PrometheusExporter, event_from_dict


def test_jsonl_rotation_keeps_n_backups(tmp_path):
    p = tmp_path / "e.jsonl"
    with JsonlSink(p, max_bytes=2000, backups=2) as s:
        for i in range(30):
            for ev in sample_events(flow_id=i):
                s.write(ev)
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["e.jsonl", "e.jsonl.1", "e.jsonl.2"]
    for f in files:
        for line in f.read_text().splitlines():
            ev = event_from_dict(json.loads(line))
            assert ev.kind


def test_jsonl_lines_round_trip(tmp_path):
    p = tmp_path / "x.jsonl"
    evs = sample_events()
    with JsonlSink(p) as s:
        for ev in evs:
            s.write(ev)
    assert [event_from_dict(json.loads(ln)) for ln in p.read_text().splitlines()] == evs


def _scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _value(text, name, **labels):
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_prometheus_counters_over_http():
    exp = PrometheusExporter("127.0.0.1:0").start()
    try:
        for i in range(3):
            for ev in sample_events(flow_id=i):
                exp.observe(ev)
        exp.set_queue_depth(17)
        text = _scrape(exp.port)
    finally:
        exp.close()
    assert _value(text, "busted_flows_total", provider="openai", comm="curl", direction="connect") == 3
    assert _value(text, "busted_bytes_sent_total", provider="openai", comm="curl") == 3 * 811
    assert _value(text, "busted_bytes_received_total", provider="openai", comm="curl") == 3 * 2233
    assert _value(text, "busted_events_lost_total", where="kernel_ring") == 9
    assert "busted_queue_depth 17.0" in text and "busted_flows_open 0.0" in text


def test_prometheus_label_cardinality_is_bounded():
    exp = PrometheusExporter("127.0.0.1:0", max_label_sets=5)
    for i in range(20):
        ev = sample_events()[1]
        exp.observe(type(ev)(**{**{f: getattr(ev, f) for f in ev.__dataclass_fields__ if f != "kind"},
                                "comm": f"c{i}"}))
    from prometheus_client import generate_latest

    text = generate_latest(exp.registry).decode()
    assert _value(text, "busted_flows_total", comm="other") == 15


def test_to_dataframe():
    pytest.importorskip("pandas")
    df = busted.to_dataframe(sample_events())
    assert list(df["kind"]) == ["dns_answer", "flow_opened", "tls_client_hello", "flow_classified", "flow_closed",
                                "events_lost"]
    assert df.loc[df["kind"] == "flow_closed", "bytes_received"].iloc[0] == 2233
    assert str(df["time"].dtype).startswith("datetime64")

"""Outputs fed by a real capture: the store round-trips it, Prometheus counts it, query reads it."""

import json
import subprocess
import sys
import threading
import time
import urllib.request

from clients import free_port, wait_ready

import busted
from busted import FlowClosed, FlowEvent
from busted.sinks import Store


def _curl(lab, host="api.openai.com"):
    r = lab.run_client(["curl", "-s", "-m", "5", f"https://{host}/v1/chat/completions", "-d", "{}"])
    assert r.returncode == 0


def test_lab_capture_round_trips_through_the_store_across_restarts(lab, tmp_path):
    from busted.lab import demo_traffic

    events = []
    with busted.Monitor() as mon:
        t = threading.Thread(target=demo_traffic, args=(lab,))
        t.start()
        while t.is_alive():
            events.extend(mon.events(timeout=0.3))
        events.extend(mon.events(timeout=1.0))
    ips = {a for h in lab.hosts.values() for a in h.addresses}
    events = [e for e in events if not isinstance(e, FlowEvent) or e.daddr in ips]
    assert sum(1 for e in events if isinstance(e, FlowClosed) and e.provider) >= 5
    db = tmp_path / "lab.db"
    half = len(events) // 2
    with Store(db) as s:
        s.write_many(events[:half])
    with Store(db) as s:  # a restart of the writer
        s.write_many(events[half:])
    with Store.open_readonly(db) as r:
        assert list(r.events()) == events
        flows = {f["flow_id"]: f for f in r.flows()}
    for e in events:
        if isinstance(e, FlowClosed):
            f = flows[e.flow_id]
            assert (f["provider"], f["bytes_sent"], f["bytes_received"], f["pid"]) == (
                e.provider, e.bytes_sent, e.bytes_received, e.pid)






def _metric(text, name, **labels):
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None


def test_cli_store_metrics_and_query(lab, tmp_path):
    db = tmp_path / "cli.db"
    port = free_port()
    jsonl = tmp_path / "cli.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "busted.cli", "monitor", "--json", "--comm", "curl",
                             "--store", str(db), "--metrics", f"127.0.0.1:{port}", "--duration", "25",
                             "--jsonl", str(jsonl)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(proc)
        for _ in range(3):
            _curl(lab)
        text = ""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            if (_metric(text, "busted_bytes_received_total", provider="openai", comm="curl") or 0) > 0 and \
                    text.count("busted_flows_total{") and _metric(text, "busted_flows_open") == 0:
                sent = _metric(text, "busted_bytes_sent_total", provider="openai", comm="curl")
                if sent and _metric(text, "busted_flows_total", provider="openai", comm="curl") == 3:
                    break
            time.sleep(0.5)
    finally:
        proc.send_signal(2)
        out, err = proc.communicate(timeout=30)
    rows = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    closed = [r for r in rows if r["kind"] == "flow_closed" and r["provider"] == "openai"]
    assert len(closed) == 3, (out, err)
    # the exit summary tells what each output kept; every event the CLI saw went to both
    assert f"busted: store {db}: {len(rows)} events written, 0 lost" in err.splitlines(), err
    assert f"busted: jsonl {jsonl}: {len(rows)} events written, 0 lost" in err.splitlines(), err
    assert [json.loads(ln) for ln in jsonl.read_text().splitlines()] == rows
    assert (tmp_path / "cli.db.lock").exists()  # the single-writer lock (released with the process)
    assert _metric(text, "busted_flows_total", provider="openai", comm="curl") == 3
    assert _metric(text, "busted_bytes_sent_total", provider="openai", comm="curl") == sum(
        r["bytes_sent"] for r in closed)
    assert _metric(text, "busted_bytes_received_total", provider="openai", comm="curl") == sum(
        r["bytes_received"] for r in closed)
    q = subprocess.run([sys.executable, "-m", "busted.cli", "query", "--store", str(db), "--provider", "openai"],
                       capture_output=True, text=True, timeout=30)
    got = [json.loads(ln) for ln in q.stdout.splitlines()]
    assert sorted(g["flow_id"] for g in got) == sorted(r["flow_id"] for r in closed)
    assert all(g["closed"] and g["bytes_sent"] > 0 for g in got)
    csv = subprocess.run([sys.executable, "-m", "busted.cli", "query", "--store", str(db), "--format", "csv",
                          "--table", "events"], capture_output=True, text=True, timeout=30)
    assert csv.stdout.splitlines()[0].startswith("kind,") and len(csv.stdout.splitlines()) >= 1 + len(rows)

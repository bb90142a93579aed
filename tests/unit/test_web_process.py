"""The page's own process (``busted monitor --ui``): fed by the monitor, serving as nobody, bounded.

Real child processes and real sockets; no kernel. tests/kernel/test_web_ui.py drives it in Chromium."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import needs
import pytest

from busted.web import WebState
from busted.web.process import PageProcess
from busted.web.state import SHOWN_KINDS
from tests.unit.events_factory import SECRET, sample_calls, sample_events

ROOT = Path(__file__).resolve().parents[2]


def _get(page: PageProcess, route: str):
    req = urllib.request.Request(f"http://127.0.0.1:{page.port}{route}",
                                 headers={"Authorization": f"Bearer {page.token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def _wait(pred, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    return pred()


def _status_lines(pid: int) -> dict[str, str]:
    return dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)


class _Stats:
    events, queue_depth, open_flows = 7, 0, 1
    lost = {"KERNEL_RING": 2}
    plan = {"capture": "cgroup"}


def test_the_page_shows_what_the_monitor_feeds_it_as_the_in_process_page_would():
    """Calls (redacted), flow groups and the monitor's stats reach the child; the same views as an
    in-process WebState fed the same events."""
    events = [*sample_events(), *sample_calls(t0=time.time() - 60, flow_id=10, pid=200, secret=SECRET)]
    here = WebState()
    here.write_batch(events)
    with PageProcess("127.0.0.1:0") as page:
        page.start(stats=_Stats)
        assert page.url == f"http://127.0.0.1:{page.port}/?token={page.token}"
        page.write_batch(events)
        page.tick()  # what the monitor's loop does when idle
        calls = _wait(lambda: _get(page, "/api/calls"))
        assert calls == json.loads(json.dumps(here.items("calls")))
        assert SECRET not in json.dumps(calls)
        assert _get(page, "/api/flows") == json.loads(json.dumps(here.flows()))
        health = _wait(lambda: (h := _get(page, "/api/health")).get("monitor") and h)
        assert health["monitor"]["lost"] == {"kernel_ring": 2} and health["monitor"]["plan"] == {"capture": "cgroup"}
        assert health["monitor"]["page_dropped"] == 0
        assert page.sent == sum(ev.kind in SHOWN_KINDS or ev.kind.startswith("budget_") for ev in events)
        assert page.sent < len(events)  # opens, DNS, hellos... stay in the monitor
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{page.port}/api/calls", timeout=5)
        assert e.value.code == 401
    assert page.proc.returncode == 0


def test_the_page_process_gives_up_root_and_keeps_the_token_out_of_proc():
    needs.root("giving up root")
    with PageProcess("127.0.0.1:0") as page:
        page.start()
        st = _status_lines(page.pid)
        assert st["Uid"].split() == ["65534"] * 4 and st["Gid"].split() == ["65534"] * 4
        assert st["Groups"].strip() == "" and st["NoNewPrivs"].strip() == "1"
        assert st["CapEff"].strip() == "0000000000000000"
        assert page.token.encode() not in Path(f"/proc/{page.pid}/cmdline").read_bytes()
        assert page.token.encode() not in Path(f"/proc/{page.pid}/environ").read_bytes()
        assert _get(page, "/api/health")["seen"] == 0  # and it serves, as nobody


def test_the_monitor_loads_no_web_server():
    """A fresh interpreter (this one has imported Starlette for other tests) that serves the page
    from a child has no Starlette, uvicorn or asyncio event loop of its own."""
    code = ("import sys, urllib.request\n"
            "from busted.web.process import PageProcess\n"
            "p = PageProcess('127.0.0.1:0').start()\n"
            "req = urllib.request.Request(p.url.split('?')[0] + 'api/health', "
            "headers={'Authorization': 'Bearer ' + p.token})\n"
            "assert urllib.request.urlopen(req, timeout=5).status == 200\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('starlette', 'uvicorn', 'anyio', 'h11')))\n"
            "p.close()\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_stopped_page_drops_and_counts_and_never_blocks_the_monitor():
    """The child frozen (SIGSTOP): the monitor's sends fill the socket, then every batch is dropped
    for the page and counted; write_batch returns at once throughout."""
    closed = next(ev for ev in sample_events() if ev.kind == "flow_closed")
    batch = [closed] * 500
    with PageProcess("127.0.0.1:0") as page:
        page.start()
        os.kill(page.pid, signal.SIGSTOP)
        try:
            slowest = 0.0
            for _ in range(400):  # ~200,000 flow closes: far more than the socket's buffer holds
                t = time.monotonic()
                page.write_batch(batch)
                page.tick()  # a send per batch, as if FLUSH_S had passed each time
                slowest = max(slowest, time.monotonic() - t)
                if page.dropped:
                    break
            assert page.dropped > 0 and page.sent > 0
            assert slowest < 2.0  # generous: a blocking send would hang here until the child ran
        finally:
            os.kill(page.pid, signal.SIGCONT)
        health = None
        end = time.monotonic() + 10  # stats go at most once a second: wait for one carrying the count
        page._stats = _Stats
        while time.monotonic() < end:
            page._stats_at = 0.0
            page.tick()
            health = _get(page, "/api/health")
            if health.get("monitor", {}).get("page_dropped"):
                break
            time.sleep(0.1)
        assert health is not None and health["monitor"]["page_dropped"] == page.dropped


def test_the_page_ends_with_the_monitor():
    """The monitor killed (no close()): the page reads end-of-file and exits; nothing is left serving."""
    code = ("import os, sys, time\n"
            "from busted.web.process import PageProcess\n"
            "p = PageProcess('127.0.0.1:0').start()\n"
            "print(p.pid, p.port, flush=True)\n"
            "time.sleep(60)\n")
    mon = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pid, port = map(int, mon.stdout.readline().split())
        assert Path(f"/proc/{pid}").exists()
        mon.kill()
        mon.wait(10)
        gone = _wait(lambda: not Path(f"/proc/{pid}").exists() or "Z" in _status_lines(pid).get("State", ""))
        assert gone, f"the page's process {pid} outlived its monitor"
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
    finally:
        if mon.poll() is None:
            mon.kill()
        mon.wait(10)


def test_a_page_that_does_not_start_is_said_and_the_monitor_goes_on():
    warned: list[str] = []
    page = PageProcess("127.0.0.1:0", warn=warned.append, startup_timeout=5)
    os.kill(page.pid, signal.SIGKILL)
    page.start()
    page.write_batch(sample_events())  # no error: the page is gone, the monitor goes on
    page.close()
    assert warned and "did not start" in warned[0] and "goes on without it" in warned[0]


def test_nothing_is_imported_after_the_page_gives_up_root():
    """Every route and the event stream served after ``before_serve`` (where the page's process
    drops root) import no module: one that did could be unreadable to ``nobody`` (a venv in /root)."""
    code = r'''
import json, sys, urllib.request
from busted.web import WebUI
from busted.web.state import _as_dict
from tests.unit.events_factory import sample_calls
from tests.unit.sse_reader import open_tab, wait_subscribed
calls = [_as_dict(ev) for ev in sample_calls(pid=1)]  # the page's process gets dicts from the monitor
snap = {}
ui = WebUI("127.0.0.1:0").start(before_serve=lambda: snap.setdefault("m", set(sys.modules)))
base, hdr = f"http://127.0.0.1:{ui.port}", {"Authorization": "Bearer " + ui.token}
codes = []
for path in ["/", "/?token=" + ui.token, "/static/app.js", "/static/uPlot.min.css", "/api/calls", "/api/flows",
             "/api/spend?by=model", "/api/health", "/api/budgets", "/api/mcp?pid=1&limit=x", "/nope"]:
    try:
        with urllib.request.urlopen(urllib.request.Request(base + path, headers=hdr), timeout=5) as r:
            codes.append(r.status)
    except urllib.error.HTTPError as e:
        codes.append(e.code)
t, got = open_tab(base + "/api/stream", ui.token, want=1)
wait_subscribed(ui.state)
ui.write_batch(calls)
t.join(10)
ui.close()
print(json.dumps({"codes": codes, "streamed": len(got), "new": sorted(set(sys.modules) - snap["m"])}))
'''
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["codes"] == [200] * 10 + [404], res
    assert res["streamed"] == 1
    assert res["new"] == [], res["new"]


def test_what_the_page_is_sent_is_held_briefly_bounded_and_flushed_when_idle(monkeypatch):
    """Sends are coalesced (at most one per FLUSH_S); what waits is bounded and counted when it
    overflows; tick() (the monitor's idle loop) sends the rest, so a lone call still shows."""
    from busted.web import process

    monkeypatch.setattr(process, "FLUSH_S", 3600.0)  # a loaded host must not reach it mid-test
    closed = next(ev for ev in sample_events() if ev.kind == "flow_closed")
    with PageProcess("127.0.0.1:0") as page:
        page.start()
        page.tick()
        sends = []
        real = page._send
        page._send = lambda data: sends.append(len(data)) or real(data)
        for _ in range(50):
            page.write_batch([closed] * 10)  # within FLUSH_S of the last send: held
        assert sends == [] and len(page._pending) == 500
        rounds = process._MAX_PENDING // 500 + 1
        for _ in range(rounds):
            page.write_batch([closed] * 500)
        assert len(page._pending) == process._MAX_PENDING
        assert page.dropped == 500 + rounds * 500 - process._MAX_PENDING
        page._pending.clear()
        page.dropped = 0
        page.write_batch(sample_calls(t0=time.time(), flow_id=3, pid=300))  # a lone call, then silence
        assert sends == []
        page.tick()
        assert sends and page._pending == []
        assert _wait(lambda: [c for c in _get(page, "/api/calls") if c["pid"] == 300])


def test_root_that_may_not_change_user_serves_no_page():
    """A monitor run as root without CAP_SETUID/CAP_SETGID (some containers): the page's process
    cannot give up root, so it serves nothing and says why (failing closed); the monitor goes on."""
    needs.root("dropping capabilities")
    setpriv = needs.tool("setpriv")
    code = ("import sys\n"
            "from busted.web.process import PageProcess\n"
            "warned = []\n"
            "p = PageProcess('127.0.0.1:0', warn=warned.append, startup_timeout=20).start()\n"
            "p.close()\n"
            "print(repr(warned))\n")
    out = subprocess.run([setpriv, "--bounding-set=-setuid,-setgid", "--inh-caps=-setuid,-setgid",
                          sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "cannot give up root (Operation not permitted); the page is not served" in out.stderr
    assert "did not start: its process ended before serving" in out.stdout

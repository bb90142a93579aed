"""The web page's state and server, without a browser (tests/kernel/test_web_ui.py drives Chromium)."""

import dataclasses
import json
import time
import urllib.error
import urllib.request

import pytest
from starlette.testclient import TestClient

from busted.events import Evidence
from busted.web import Filters, WebState, WebUI
from busted.web.app import COOKIE, CSP, Tab, make_app
from tests.unit.events_factory import SECRET, sample_calls, sample_events
from tests.unit.sse_reader import open_tab, wait_subscribed

TOKEN = "t0k3n-for-tests"


def _state(n_calls: int = 3) -> WebState:
    st = WebState(max_items=100, max_flows=10)
    st.write_batch(sample_events())
    for i in range(n_calls):
        st.write_batch(sample_calls(t0=time.time() - 60 + i, flow_id=10 + i, pid=200 + i, secret=SECRET))
    return st


def _client(st: WebState) -> TestClient:
    return TestClient(make_app(st, TOKEN), base_url="http://127.0.0.1:8765")


def test_every_route_needs_the_token():
    c = _client(_state())
    for path in ("/", "/static/app.js", "/api/calls", "/api/flows", "/api/spend", "/api/health", "/api/budgets",
                 "/api/stream", "/api/nope", "/nope"):
        r = c.get(path)
        assert r.status_code == 401, path
        assert "token" in r.text
        r = c.get(path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401, path


def test_token_sets_a_cookie_and_leaves_the_address_bar():
    c = _client(_state())
    r = c.get(f"/?token={TOKEN}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert f"{COOKIE}={TOKEN}" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    r = c.get("/")  # the cookie from the redirect
    assert r.status_code == 200 and "<table id=\"calls\">" in r.text
    assert r.headers["content-security-policy"] == CSP
    assert "'unsafe-inline'" not in CSP and "script-src 'self'" in CSP
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in r.text  # no inline script: only src= scripts
    js = c.get("/static/app.js")
    assert js.status_code == 200 and "textContent" in js.text
    assert ".innerHTML" not in js.text and "insertAdjacentHTML" not in js.text and "outerHTML" not in js.text
    assert c.get("/static/../server.py").status_code in (401, 404)
    assert c.get("/static/index.html").status_code == 404  # only the listed files


def test_foreign_host_header_refused_on_loopback():
    c = TestClient(make_app(_state(), TOKEN), base_url="http://evil.example:8765")
    assert c.get(f"/?token={TOKEN}").status_code == 403


def test_calls_are_redacted_filtered_and_newest_first():
    c = _client(_state(3))
    h = {"Authorization": f"Bearer {TOKEN}"}
    calls = c.get("/api/calls", headers=h).json()
    assert [d["pid"] for d in calls] == [202, 201, 200]
    assert all(d["kind"] == "llm_call" and d["input_tokens"] == 120 for d in calls)
    assert SECRET not in c.get("/api/calls", headers=h).text
    assert SECRET not in c.get("/api/mcp", headers=h).text
    assert [d["pid"] for d in c.get("/api/calls?pid=201", headers=h).json()] == [201]
    assert c.get("/api/calls?provider=none", headers=h).json() == []
    assert len(c.get("/api/calls?comm=python3&provider=openai&limit=2", headers=h).json()) == 2
    flows = c.get("/api/flows", headers=h).json()
    assert flows and flows[0]["bytes_sent"] == 811 and flows[0]["evidence"] == "sni"
    assert flows[0]["direction"] == "connect" and flows[0]["flows"] == 1
    losses = c.get("/api/losses", headers=h).json()
    assert losses[0]["where"] == "kernel_ring" and losses[0]["count"] == 3
    health = c.get("/api/health", headers=h).json()
    assert health["lost_events"] == {"kernel_ring": 3}


def test_spend_per_group_and_window():
    st = _state(3)
    s = st.spend("provider", 3600, 60)
    assert s["totals"][0]["group"] == "openai" and s["totals"][0]["calls"] == 3
    assert s["totals"][0]["input_tokens"] == 360
    assert sum(s["series"]["openai"]) == pytest.approx(3 * 0.0000435)
    assert len(s["t"]) == 60
    assert st.spend("model", 3600)["totals"][0]["group"] == "gpt-4o-mini-2024-07-18"
    assert st.spend("provider", 10)["totals"] == []  # the calls are a minute old
    assert st.spend("bogus")["by"] == "provider"


def test_windows_are_bounded_and_count_what_falls_out():
    st = WebState(max_items=5, max_flows=3)
    for i in range(20):
        st.write_batch(sample_calls(flow_id=i, pid=i))
        st.write_batch([dataclasses.replace(ev, hostname=f"h{i}.test") if hasattr(ev, "hostname") else ev
                        for ev in sample_events(flow_id=i, pid=i)])
    assert len(st.items("calls", limit=100)) == 5
    assert st.dropped_window > 0
    assert len(st.flows()) <= 3 and st.flows_evicted > 0


def test_filters_match_the_cli_semantics():
    f = Filters({"pid": "7", "provider": "none"})
    assert f.match({"pid": 7, "provider": None}) and not f.match({"pid": 7, "provider": "openai"})
    assert not f.match({"pid": 8, "provider": None})
    assert Filters({"container": "abc"}).match({"container_id": "abc"})
    assert not Filters({})


def test_a_slow_tab_drops_and_counts_never_grows():
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        tab = Tab(loop, Filters({}), maxlen=10)
        for _ in range(50):
            tab.offer([{"kind": "llm_call", "pid": 1}])
        lines, dropped = tab.take()
        assert len(lines) == 10 and dropped == 40
        assert tab.take() == ([], 0)
    finally:
        loop.close()


def test_no_tab_no_encoding(monkeypatch):
    """With no tab open, writing keeps the events as they are: nothing is encoded."""
    import busted.web.state as state_mod

    calls = []
    monkeypatch.setattr(state_mod, "_as_dict", lambda ev: calls.append(ev) or {})
    st = WebState()
    for i in range(10):
        st.write_batch([*sample_events(flow_id=i), *sample_calls(flow_id=i)])
    assert [c for c in calls if not isinstance(c, dict) and c.kind != "events_lost"] == []


def _get(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    return urllib.request.urlopen(req, timeout=5)


def test_webui_serves_live_events_over_sse_and_stops():
    ui = WebUI("127.0.0.1:0").start()
    try:
        base = f"http://127.0.0.1:{ui.port}"
        assert ui.url == f"{base}/?token={ui.token}"
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(base + "/api/stream")
        assert e.value.code == 401
        t, got = open_tab(base + "/api/stream?pid=321", ui.token, want=2)
        wait_subscribed(ui.state)
        ui.write_batch(sample_calls(pid=999))  # filtered out for this tab
        ui.write_batch(sample_calls(pid=321, secret=SECRET))
        t.join(10)
        assert [d["kind"] for d in got] == ["llm_call", "mcp_message"]
        assert all(d["pid"] == 321 for d in got)
        assert SECRET not in json.dumps(got)
    finally:
        ui.close()
    with pytest.raises(OSError):
        _get(f"http://127.0.0.1:{ui.port}/", {"Authorization": f"Bearer {ui.token}"})


def test_webui_port_taken_is_a_clear_error():
    from busted.errors import EnvironmentProblem

    with WebUI("127.0.0.1:0") as a, pytest.raises(EnvironmentProblem, match="cannot listen"):
        WebUI(f"127.0.0.1:{a.port}")


def test_stored_dicts_and_live_events_show_alike():
    from busted.sinks import encode

    live, stored = WebState(), WebState()
    for ev in [*sample_events(), *sample_calls(t0=time.time() - 60, flow_id=10, pid=200, secret=SECRET)]:
        live.write(ev)
        stored.write(encode(ev).data)
    a, b = live.items("calls"), stored.items("calls")
    assert a == b
    assert live.flows() == stored.flows() and live.flows()[0]["bytes_received"] == 2233


def _flow_kinds():
    by = {ev.kind: ev for ev in sample_events()}
    return by["flow_opened"], by["flow_classified"], by["flow_closed"]


def test_flows_are_grouped_as_they_come_and_keep_no_event():
    """The flows view's groups are updated per close/classification: opens are not kept, a flow
    tied to a provider shows before it closes, counts are not limited to a window of events, and
    no event object is held (nothing for the garbage collector to walk, memory bounded by groups)."""
    import weakref

    opened, classified, closed = _flow_kinds()
    st = WebState()
    st.write_batch([opened])
    assert st.flows() == [] and st.seen == 0
    st.write_batch([classified])
    (row,) = st.flows()
    assert (row["flows"], row["bytes_sent"], row["evidence"], row["direction"]) == (0, 0, "sni", "connect")
    n = 12_000  # more than the 10,000-event window the view used to group
    for i in range(0, n, 1000):
        st.write_batch([dataclasses.replace(closed, flow_id=j, wall_time=closed.wall_time + j)
                        for j in range(i, i + 1000)])
    (row,) = st.flows()
    assert row["flows"] == n and row["bytes_sent"] == 811 * n and row["bytes_received"] == 2233 * n
    assert row["last_seen"] == closed.wall_time + n - 1
    peer = dataclasses.replace(closed, hostname=None, provider=None, daddr="10.9.9.9", evidence=Evidence.UNKNOWN)
    ref = weakref.ref(peer)
    st.write_batch([peer])
    del peer
    assert ref() is None  # the state kept no reference to the event
    rows = st.flows()
    assert [(r["hostname"], r["daddr"], r["flows"], r["evidence"]) for r in rows] == [
        (None, "10.9.9.9", 1, "unknown"), ("api.openai.com", "10.231.1.65", n, "sni")]
    assert st.seen == 1 + n + 1
    assert st.flows(Filters({"provider": "none"}))[0]["daddr"] == "10.9.9.9"


def test_flow_groups_are_lru_bounded_and_evictions_counted():
    _, _, closed = _flow_kinds()
    st = WebState(max_flows=3)
    for h in ("a", "b", "c"):
        st.write_batch([dataclasses.replace(closed, hostname=f"{h}.test")])
    st.write_batch([dataclasses.replace(closed, hostname="a.test")])  # a: the most recently seen
    st.write_batch([dataclasses.replace(closed, hostname="d.test")])  # evicts b, the least recently seen
    assert [r["hostname"] for r in st.flows()] == ["d.test", "a.test", "c.test"]
    assert st.flows_evicted == 1 and st.flows()[1]["flows"] == 2
    assert st.health()["flows_evicted"] == 1


def test_stored_flow_dicts_missing_newer_fields_still_group():
    from busted.sinks import encode

    _, _, closed = _flow_kinds()
    d = {k: v for k, v in encode(closed).data.items() if k not in ("agent", "container_id", "bytes_received")}
    st = WebState()
    st.write_batch([d, d])
    (row,) = st.flows()
    assert (row["flows"], row["bytes_sent"], row["bytes_received"], row["agent"]) == (2, 1622, 0, None)
    assert row["direction"] == "connect" and row["evidence"] == "sni"


def test_the_server_loop_sleeps_while_no_tab_is_open():
    """No timer in the server's event loop when nothing is connected (uvicorn's own main loop
    keeps a 0.1-s sleep scheduled at all times); close() still stops it."""
    import asyncio

    ui = WebUI("127.0.0.1:0").start()
    try:
        deadline = time.monotonic() + 10
        while ui._server._loop is None and time.monotonic() < deadline:  # the main loop is entered
            time.sleep(0.01)
        loop = ui._server._loop
        assert loop is not None

        async def timers():
            await asyncio.sleep(0)  # let the main loop reach its wait
            return [h for h in loop._scheduled if not h.cancelled()]  # asyncio's pending timers

        assert asyncio.run_coroutine_threadsafe(timers(), loop).result(5) == []
    finally:
        ui.close()
    assert not ui._thread.is_alive()


def test_an_exit_asked_before_the_server_loop_runs_ends_it_at_once():
    import asyncio

    import uvicorn

    from busted.web.server import _idle_server_class

    server = _idle_server_class()(uvicorn.Config(make_app(WebState(), TOKEN), lifespan="off"))
    server.request_exit()
    asyncio.run(asyncio.wait_for(server.main_loop(), 5))  # returns, not TimeoutError
    assert server.should_exit

"""Budgets (busted.policy.budgets): parsing, accounting per scope, epoch-aligned windows, restore, reload."""

import math

import needs
import pytest
from events_factory import IDENT
from hypothesis import given
from hypothesis import strategies as st

from busted import BudgetExceeded, BudgetSpend, Policy, PolicyError
from busted.events import Direction, LlmCall
from busted.policy.budgets import (
    BUDGET_TOP_BIT,
    Block,
    BudgetBook,
    kernel_budgets,
    parse_window,
    window_of,
)
from busted.sinks._codec import event_from_dict

T0 = 1_800_000_000.0  # a multiple of 3600


def budget_policy(**kw):
    b = {"name": "anth-30", "provider": "anthropic", "per": "uid", "limit_tokens": 30, "window": "1h",
         "action": "deny", **kw}
    return Policy.from_dict({"default": "audit", "budgets": [b]})


def call(wall, tokens=20, uid=1000, provider="anthropic", cost=None, direction=Direction.CONNECT, **kw):
    ident = {**IDENT, "uid": uid, "provider": provider, "hostname": f"api.{provider}.com",
             "direction": direction, **kw}
    return LlmCall(ts_ns=int(wall * 1e9), wall_time=wall, **ident, api="anthropic.messages", method="POST",
                   path="/v1/messages", request_model="claude-3-5-haiku", input_tokens=tokens - 8, output_tokens=8,
                   cost_usd=cost)


def book(pol, kernel=True):
    return BudgetBook(pol.budgets, kernel={pol.budgets[0].name: 0} if kernel else {})


def test_parse_and_describe():
    text = """
default = "audit"
[[rules]]
name = "r"
action = "allow"
provider = "openai"

[[budgets]]
name = "anth"
provider = "anthropic"
per = "uid"
limit_tokens = 30
window = "1h"
action = "deny"

[[budgets]]
name = "team"
per = "agent"
limit_usd = 20
window = "1d"
action = "deny"

[[budgets]]
name = "model"
model = "gpt-4o"
per = "host"
limit_usd = 5.5
window = "7d"
"""
    pol = Policy.loads(text, source="p.toml")
    a, t, m = pol.budgets
    assert (a.name, a.per, a.window_s, a.limit_tokens, a.limit_usd, a.action, a.line) == (
        "anth", "uid", 3600, 30, None, "deny", 8)
    assert (t.limit_usd, t.window_s, t.match.provider) == (20.0, 86400, None)
    assert (m.action, m.window_s, m.match.model) == ("audit", 7 * 86400, ("gpt-4o",))
    idx, why = kernel_budgets(pol.budgets, len(pol.rules))
    assert idx == {"anth": 0} and "per=agent" in why["team"] and "model" not in why
    out = pol.describe()
    assert "anth: 30 tokens per uid per 1h" in out and "held in the kernel" in out
    assert "team: $20 per agent per 1d" in out and "enforced as audit" in out
    assert Policy.loads(text) == pol and Policy.loads(text.replace("= 30", "= 31")) != pol


@pytest.mark.parametrize(("body", "msg", "line"), [
    ('window = "1x"', "expected a number and a unit", 6),
    ('window = "0h"', "between 1s and 366d", 6),
    ('wat = 1', "unknown key 'wat' in budgets[0]", 7),
    ('per = "pod"', "per must be one of uid, exe", 3),
    ('action = "allow"', "action must be one of deny, audit", 7),
    ('limit_tokens = -1', "positive whole number", 7),
    ('limit_usd = "5"', "positive number of dollars", 7),
    ('provider = "Open AI"', "is not a provider id", 7),
    ('uid = "no-such-user-xyz"', "no user named", 7),
])
def test_invalid_budgets_say_why_and_where(body, msg, line):
    lines = ['[[budgets]]', 'name = "b"', 'per = "uid"', 'limit_tokens = 5', 'window = "1h"', '']
    key = body.split(" = ")[0]
    lines = [x for x in lines if not x.startswith(key + " =")]
    lines.insert(line - 1 if key not in ("window", "per") else len(lines), body)
    text = "\n".join(lines)
    with pytest.raises(PolicyError) as ei:
        Policy.loads(text, source="b.toml")
    assert msg in str(ei.value), str(ei.value)
    assert "b.toml:" in str(ei.value)


def test_no_limit_and_no_window_and_names():
    with pytest.raises(PolicyError, match="has no limit"):
        Policy.from_dict({"budgets": [{"name": "b", "per": "uid", "window": "1h"}]})
    with pytest.raises(PolicyError, match="has no window"):
        Policy.from_dict({"budgets": [{"name": "b", "per": "uid", "limit_tokens": 1}]})
    with pytest.raises(PolicyError, match="used twice"):
        Policy.from_dict({"budgets": [{"name": "b", "per": "uid", "limit_tokens": 1, "window": "1h"}] * 2})
    with pytest.raises(PolicyError, match="also a rule's name"):
        Policy.from_dict({"rules": [{"name": "b", "action": "deny"}],
                          "budgets": [{"name": "b", "per": "uid", "limit_tokens": 1, "window": "1h"}]})


def test_kernel_reasons():
    def why(**kw):
        return kernel_budgets(budget_policy(**kw).budgets, 0)[1].get("anth-30")

    assert why() is None
    assert why(per="cgroup") is None and why(per="host") is None and why(per="exe") is None
    assert "per=agent" in why(per="agent") and why(per="container") is None
    assert "model" in why(model="gpt-4o") and "agent" in why(agent="claude-code")
    assert "uid (not its per)" in why(per="cgroup", uid=0)
    assert "hostname api*.x.com" in why(hostname="api*.x.com")
    assert why(hostname="*.x.com") is None
    assert why(action="audit") is None  # audit budgets are simply not in the kernel
    many = Policy.from_dict({"budgets": [{"name": f"b{i}", "per": "uid", "limit_tokens": 1, "window": "1h",
                                          "action": "deny"} for i in range(10)]})
    idx, w = kernel_budgets(many.budgets, 0)
    assert len(idx) == 8 and "more than 8" in w["b9"]
    assert "62 destination bits" in kernel_budgets(many.budgets, BUDGET_TOP_BIT + 1)[1]["b0"]


def test_two_calls_exhaust_thirty_tokens_per_uid():
    pol = budget_policy()
    b = book(pol)
    out1, c1 = b.feed([call(T0 + 1)])
    assert c1 == [] and [type(e) for e in out1] == [BudgetSpend]
    assert (out1[0].tokens, out1[0].calls, out1[0].scope, out1[0].window_start, out1[0].window_end) == (
        20, 1, "1000", T0, T0 + 3600)
    out2, c2 = b.feed([call(T0 + 2), call(T0 + 3, uid=1001), call(T0 + 4, provider="openai"),
                       call(T0 + 5, direction=Direction.ACCEPT)])
    ex = [e for e in out2 if isinstance(e, BudgetExceeded)]
    assert len(ex) == 1
    e = ex[0]
    assert (e.budget, e.per, e.scope, e.tokens, e.limit_tokens, e.window_end, e.enforced, e.uid) == (
        "anth-30", "uid", "1000", 40, 30, T0 + 3600, True, 1000)
    assert c2 == [Block(0, 1, 1000, T0 + 3600, "anth-30")]
    spends = {(s.scope, s.tokens) for s in out2 if isinstance(s, BudgetSpend)}
    assert spends == {("1000", 40), ("1001", 20)}  # openai and the accepted flow do not count
    out3, c3 = b.feed([call(T0 + 6)])  # reported once per window
    assert c3 == [] and not any(isinstance(x, BudgetExceeded) for x in out3)
    assert event_from_dict(e.to_dict()) == e and event_from_dict(out1[0].to_dict()) == out1[0]


def test_usd_limit_unpriced_calls_and_dry_run():
    pol = budget_policy(limit_tokens=None, limit_usd=0.01)
    b = book(pol, kernel=False)
    out, _ = b.feed([call(T0, cost=None), call(T0 + 1, cost=0.006)])
    assert out[-1].unpriced_calls == 1 and out[-1].usd == pytest.approx(0.006)
    out, cmds = b.feed([call(T0 + 2, cost=0.005)])
    ex = next(e for e in out if isinstance(e, BudgetExceeded))
    assert not ex.enforced and ex.note and "dry run" in ex.note and cmds == []


def test_window_roll_resets_and_expire_unblocks():
    b = book(budget_policy())
    b.feed([call(T0 + 10, tokens=40)])
    assert b.snapshot()[0]["exceeded"]
    out, _ = b.feed([call(T0 + 3600, tokens=10)])
    assert (out[0].tokens, out[0].window_start) == (10, T0 + 3600)
    assert [u.value for u in b.expire(T0 + 3600)] == [1000]
    assert b.expire(T0 + 7200) == [] and b.snapshot() == []


def test_seed_restores_current_window_only():
    pol = budget_policy()
    b = book(pol)
    out, _ = b.feed([call(T0 + 1), call(T0 + 2)])
    stored = [e for e in out if isinstance(e, BudgetSpend)]
    stale = BudgetSpend(ts_ns=0, wall_time=T0 - 10, budget="anth-30", per="uid", scope="1002",
                        window_start=T0 - 3600, window_end=T0, tokens=99, usd=0.0, calls=3)
    fresh = BudgetBook(pol.budgets, kernel={"anth-30": 0})
    cmds = fresh.seed([s.to_dict() for s in stored] + [stale], T0 + 30)
    assert cmds == [Block(0, 1, 1000, T0 + 3600, "anth-30")]
    assert [(s["scope"], s["tokens"], s["calls"]) for s in fresh.snapshot()] == [("1000", 40, 2)]
    out, cmds = fresh.feed([call(T0 + 40)])
    assert cmds == [] and not any(isinstance(x, BudgetExceeded) for x in out)  # already reported


def test_rebuild_keeps_spend_by_name():
    pol = budget_policy()
    b = book(pol)
    b.feed([call(T0 + 1, tokens=40)])
    new, cmds = b.rebuild(budget_policy().budgets, {"anth-30": 3}, {}, T0 + 5)
    assert cmds == [Block(3, 1, 1000, T0 + 3600, "anth-30")]
    other, cmds = b.rebuild(budget_policy(window="2h").budgets, {"anth-30": 0}, {}, T0 + 5)
    assert cmds == [] and other.snapshot() == []  # a different window starts from nothing


def test_scopes_other_than_uid():
    for per, kw, want in (("exe", {"exe": "/usr/bin/python3"}, "/usr/bin/python3"),
                          ("agent", {"agent": "claude-code"}, "claude-code"),
                          ("cgroup", {"cgroup_id": 77}, "77"), ("host", {}, "host"),
                          ("container", {"container_id": "ab" * 32}, "ab" * 32)):
        b = BudgetBook(budget_policy(per=per).budgets)
        out, _ = b.feed([call(T0, **kw)])
        assert out[0].scope == want, per
    b = BudgetBook(budget_policy(per="agent").budgets)
    assert b.feed([call(T0, agent=None)]) == ([], [])  # no agent known: not counted


def test_parse_window():
    assert [parse_window(x) for x in ("30s", "5m", "1h", "1d", "2w")] == [30, 300, 3600, 86400, 1209600]
    for bad in ("", "1", "h", "1.5h", "-1h", 3600, "400d"):
        with pytest.raises(ValueError):
            parse_window(bad)


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False), st.integers(min_value=1, max_value=366 * 86400))
def test_windows_are_epoch_aligned_and_hold_their_time(wall, w):
    start, end = window_of(wall, w)
    assert start <= wall < end and end - start == w and start % w == 0
    assert window_of(start, w) == (start, end) and window_of(end, w)[0] == end
    assert window_of(math.nextafter(end, 0), w) == (start, end) or math.nextafter(end, 0) < start


@given(st.lists(st.tuples(st.floats(min_value=0, max_value=7200), st.integers(0, 50)), max_size=30))
def test_spend_per_window_is_the_sum_of_its_calls(calls):
    b = BudgetBook(budget_policy(limit_tokens=10**9).budgets)
    calls = sorted(calls)
    last = {}
    for t, n in calls:
        out, _ = b.feed([call(T0 + t, tokens=max(n, 8))])
        last[window_of(T0 + t, 3600)] = out[0]
    for (start, end), ev in last.items():
        want = sum(max(n, 8) for t, n in calls if start <= T0 + t < end)
        assert (ev.window_start, ev.window_end, ev.tokens) == (start, end, want)


def test_spend_survives_a_restart_through_the_store(tmp_path):
    """The store keeps BudgetSpend events; at start the current windows' spend is read back."""
    import time

    from busted.policy.budget_enforce import BudgetRunner, stored_spend
    from busted.sinks import Store

    pol = budget_policy(window="1d")
    now = time.time()
    b = book(pol)
    out, _ = b.feed([call(now), call(now)])
    old = BudgetSpend(ts_ns=0, wall_time=now - 86400, budget="anth-30", per="uid", scope="1000",
                      window_start=window_of(now - 86400, 86400)[0], window_end=window_of(now - 86400, 86400)[1],
                      tokens=5, usd=0.0, calls=9)
    with Store(tmp_path / "s.db") as st:
        st.write_many([old, *out])
        st.flush()
    with Store(tmp_path / "s.db", readonly=True) as st:
        rows = stored_spend([st], pol, now)
    assert {r["tokens"] for r in rows} == {20, 40}  # yesterday's window is not read
    runner = BudgetRunner(pol, None, None, seed=rows)
    snap = runner.snapshot()
    assert [(s["scope"], s["tokens"], s["calls"], s["exceeded"]) for s in snap] == [("1000", 40, 2, True)]
    assert stored_spend([], Policy.from_dict({}), now) == []


def test_policy_check_prints_budgets(tmp_path):
    import io

    from busted.cli import main

    f = tmp_path / "p.toml"
    f.write_text('[[budgets]]\nname = "daily"\nper = "agent"\nlimit_usd = 2.5\nwindow = "1d"\naction = "deny"\n'
                 'provider = ["openai", "anthropic"]\n')
    out = io.StringIO()
    assert main(["policy", "check", str(f)], out=out) == 0
    text = out.getvalue()
    assert "deny  daily: $2.5 per agent per 1d  [provider=openai|anthropic]  (line 1)" in text
    assert "per=agent: the kernel cannot key a connection by agent: enforced as audit" in text
    f.write_text('[[budgets]]\nname = "daily"\nper = "exe"\nwindow = "1d"\n')
    assert main(["policy", "check", str(f)], out=io.StringIO()) == 2


def test_prometheus_budget_gauges_are_bounded():
    prometheus_client = needs.module("prometheus_client")
    from busted.sinks import PrometheusExporter

    exp = PrometheusExporter("127.0.0.1:0", max_label_values=3)
    b = BudgetBook(budget_policy(limit_tokens=50, limit_usd=1.0).budgets, kernel={"anth-30": 0})
    for uid in range(10):  # 10 scopes, 3 label values: the others are not exported
        out, _ = b.feed([call(T0 + 1, uid=uid, cost=0.25), call(T0 + 2, uid=uid, tokens=40)])
        for ev in out:
            exp.observe(ev)
    from prometheus_client.parser import text_string_to_metric_families

    text = prometheus_client.generate_latest(exp.registry).decode()
    got = {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
           for fam in text_string_to_metric_families(text) for smp in fam.samples}

    def v(name, **labels):
        return got.get((name, tuple(sorted(labels.items()))))

    who = {"budget": "anth-30", "per": "uid"}
    assert v("busted_budget_spent", **who, scope="0", unit="tokens") == 60
    assert v("busted_budget_spent", **who, scope="0", unit="usd") == 0.25
    assert v("busted_budget_limit", budget="anth-30", unit="tokens") == 50
    assert v("busted_budget_limit", budget="anth-30", unit="usd") == 1.0
    assert v("busted_budget_window_end_seconds", **who, scope="2") == T0 + 3600
    assert not any(dict(k[1]).get("scope") not in (None, "0", "1", "2") for k in got)
    assert v("busted_budget_exceeded_total", budget="anth-30", action="deny", enforced="true") == 10
    assert v("busted_label_values_folded_total", label="scope") == 14  # 7 scopes x 2 reports


def test_top_budget_table_escapes_and_sorts():
    from busted.policy.budgets import budget_table

    b = BudgetBook(budget_policy(per="exe", limit_usd=1.0).budgets)
    b.feed([call(T0, exe="/tmp/\x1b[2Jevil", cost=0.5), call(T0, exe="/usr/bin/python3", tokens=40, cost=0.1)])
    text = budget_table(b.snapshot())
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["BUDGET", "PER", "SCOPE", "TOKENS"]
    assert "/usr/bin/python3" in lines[1] and "40/30" in lines[1] and "133%" in lines[1] and "exceeded" in lines[1]
    assert "\x1b" not in text and "evil" in lines[2] and "0.50/1.00" in lines[2] and lines[2].endswith("ok")


def test_web_budgets_route_latest_spend_and_exceeded():
    needs.module("starlette")
    from starlette.testclient import TestClient

    from busted.web import WebState
    from busted.web.app import make_app

    st = WebState()
    b = book(budget_policy())
    out, _ = b.feed([call(T0 + 1, uid=7), call(T0 + 2), call(T0 + 3)])
    st.write_batch(out)
    st.write_batch([d.to_dict() for d in b.feed([call(T0 + 3600 + 1, uid=7)])[0]])  # stored dicts too, a new window
    c = TestClient(make_app(st, "tok"), base_url="http://127.0.0.1:8765")
    assert c.get("/api/budgets").status_code == 401
    rows = c.get("/api/budgets", headers={"Authorization": "Bearer tok"}).json()
    got = [(r["scope"], r["tokens"], r["limit_tokens"], r["exceeded"], r["enforced"], r["window_end"]) for r in rows]
    assert got == [("7", 20, 30, False, None, T0 + 7200), ("1000", 40, 30, True, True, T0 + 3600)]
    assert 'id="budgets"' in c.get("/", headers={"Authorization": "Bearer tok"}).text


def test_compile_gives_kernel_budgets_their_destination_bits():
    from busted.classify.providers import Catalog
    from busted.policy.enforce import ANY_BIT, compile_policy, name_mask

    pol = Policy.from_dict({"rules": [{"name": "r0", "action": "audit", "provider": "openai"}], "budgets": [
        {"name": "a", "provider": ["anthropic", "nosuch"], "per": "uid", "limit_tokens": 1, "window": "1h",
         "action": "deny"},
        {"name": "audit-only", "per": "agent", "limit_tokens": 1, "window": "1h", "action": "deny"},
        {"name": "h", "hostname": "*.example.org", "per": "host", "limit_usd": 1, "window": "1d", "action": "deny"}]})
    c = compile_policy(pol, Catalog.builtin(), cgroup_mount="/nonexistent")
    assert c.budgets == {"a": 0, "h": 1}
    assert name_mask(c.names, "api.anthropic.com") & (1 << BUDGET_TOP_BIT)
    assert not name_mask(c.names, "api.openai.com") & (1 << BUDGET_TOP_BIT)
    assert name_mask(c.names, "api.openai.com") & (1 << 0) and name_mask(c.names, "api.openai.com") & (1 << ANY_BIT)
    assert name_mask(c.names, "x.example.org") == 1 << (BUDGET_TOP_BIT - 1)
    assert any("nosuch is not in the catalog" in n for n in c.notes)
    assert any("budget audit-only: per=agent" in n and "enforced as audit" in n for n in c.notes)
    assert not c.flags


def test_budget_per_exe_is_keyed_by_the_kernels_hash_of_the_path():
    from busted.classify.providers import Catalog
    from busted.policy.budgets import KIND_EXE, Block
    from busted.policy.budgets import scope_hash as exe_hash
    from busted.policy.enforce import CF_BEXE, compile_policy

    # FNV-1a 64 (the C twin in policy_enforce.c): known vectors, and the kernel's 127-byte cut
    assert exe_hash("") == 0xCBF29CE484222325 and exe_hash("a") == 0xAF63DC4C8601EC8C
    assert exe_hash("/x" + "y" * 200) == exe_hash(("/x" + "y" * 200)[:127])
    b = BudgetBook(budget_policy(per="exe").budgets, kernel={"anth-30": 0})
    _out, cmds = b.feed([call(T0, exe="/usr/bin/python3", tokens=40)])
    assert cmds == [Block(0, KIND_EXE, exe_hash("/usr/bin/python3"), cmds[0].until, "anth-30")]
    c = compile_policy(budget_policy(per="exe"), Catalog.builtin(), cgroup_mount="/nonexistent")
    assert c.budgets == {"anth-30": 0} and c.flags == CF_BEXE


def test_budget_per_container_puts_every_container_in_the_kernels_map(tmp_path):
    from busted.classify.providers import Catalog
    from busted.policy.budgets import KIND_CONTAINER, Block, scope_hash
    from busted.policy.enforce import CF_BCTR, compile_policy

    a, b = "a" * 64, "b" * 64
    (tmp_path / "system.slice" / f"docker-{a}.scope" / "sub").mkdir(parents=True)
    (tmp_path / "system.slice" / f"docker-{b}.scope").mkdir()
    c = compile_policy(budget_policy(per="container"), Catalog.builtin(), cgroup_mount=str(tmp_path))
    top_a = (tmp_path / "system.slice" / f"docker-{a}.scope").stat().st_ino
    top_b = (tmp_path / "system.slice" / f"docker-{b}.scope").stat().st_ino
    assert c.flags == CF_BCTR and c.ctr == {top_a: 0, top_b: 0}  # no rule bits: keyed for the budget only
    assert c.ctr_scope == {top_a: scope_hash(a), top_b: scope_hash(b)}
    book_ = BudgetBook(budget_policy(per="container").budgets, kernel={"anth-30": 0})
    _out, cmds = book_.feed([call(T0, container_id=a, tokens=40)])
    assert cmds == [Block(0, KIND_CONTAINER, scope_hash(a), cmds[0].until, "anth-30")]

"""The cheap filters ahead of /proc and classification, on real lab traffic (issue 20).

Without a policy, a flow the filters refuse makes no flow event, yet its other events (the
ClientHello, its LLM call) are reported as before; with a policy, every flow is still judged,
whatever the filters keep."""

import sys
import uuid

from conftest import collect
from test_policy_lab import DENY_ANTHROPIC, PY_20_TOKENS, curl, requests_with, run

import busted
from busted import FlowClosed, FlowOpened, LlmCall, Policy, PolicyDecision, TlsClientHello


def test_a_refused_flow_makes_no_flow_event_but_its_hello_and_llm_call_come(lab):
    m = uuid.uuid4().hex
    url = f"https://api.anthropic.com/v1/messages?m={m}"
    with busted.Monitor(comm="curl") as mon:
        py = run(lab, [sys.executable, "-I", "-c", PY_20_TOKENS, url], None)
        cu = run(lab, curl("https://api.openai.com/v1/models", m), None)

        def done(evs):
            return (any(isinstance(e, LlmCall) and e.provider == "anthropic" for e in evs)
                    and any(isinstance(e, FlowClosed) and e.provider == "openai" for e in evs))

        evs = collect(mon, done, timeout=15)
        stats = mon.stats()
    assert py.stdout.split() == [b"200", b"20"] and cu.returncode == 0, (py.stderr, cu.stderr)
    assert len(requests_with(lab, m)) == 2
    flows = [e for e in evs if isinstance(e, FlowOpened | FlowClosed)]
    assert flows and all(e.comm == "curl" for e in flows), flows
    opened = next(e for e in flows if isinstance(e, FlowOpened) and e.provider == "openai")
    assert opened.exe and opened.exe.endswith("curl")  # an admitted flow: /proc read as ever
    (call,) = [e for e in evs if isinstance(e, LlmCall) and e.provider == "anthropic"]
    # the refused flow's identity, built when its plaintext came: the process and the peer as before
    assert call.total_tokens == 20 and call.pid != opened.pid and call.exe == sys.executable
    hellos = {e.sni: e for e in evs if isinstance(e, TlsClientHello)}
    assert hellos["api.anthropic.com"].flow_id == call.flow_id and hellos["api.anthropic.com"].provider == "anthropic"
    assert stats.filtered >= 2  # at least the python client's open and close


def test_with_a_policy_the_filters_do_not_hide_flows_from_it(lab):
    """The policy judges every flow at its open: a flow the filters drop still gets its decision."""
    m = uuid.uuid4().hex
    with busted.Monitor(policy=Policy.from_dict(DENY_ANTHROPIC), comm="bst-nobody") as mon:
        a = run(lab, curl("https://api.anthropic.com/v1/models", m), None)
        evs = collect(mon, lambda e: any(isinstance(x, PolicyDecision) for x in e), timeout=10)
        stats = mon.stats()
    assert a.returncode == 0, a.stderr
    dec = [(d.provider, d.rule, d.action, d.enforced, d.comm) for d in evs if isinstance(d, PolicyDecision)]
    assert ("anthropic", "no-anthropic", "deny", False, "curl") in dec, dec
    assert not [e for e in evs if isinstance(e, FlowOpened | FlowClosed)]
    assert stats.filtered >= 1

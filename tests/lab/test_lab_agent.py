"""`busted lab`'s agent stand-in under a real Monitor: a script named `claude` -> `bash -c` -> curl
to the lab's Anthropic; the curl's flow (and its LLM call) name the agent and the chain, although
all three processes exit within milliseconds of the call. Needs root and BPF (run under the lock)."""

import time

import busted
from busted import FlowClosed, FlowOpened, LlmCall
from busted.lab.traffic import demo_traffic


def test_the_agent_client_reports_its_agent_and_chain(lab):
    with busted.Monitor() as mon:
        (res,) = demo_traffic(lab, rounds=1, timeout=20, only=("agent-claude",))
        assert res.ok, (res.returncode, res.stdout[-300:], res.stderr[-500:])
        anthropic = set(lab.hosts["api.anthropic.com"].addresses)
        events: list = []
        end = time.monotonic() + 15  # until the curl's flow has closed (it announces itself), bounded
        while time.monotonic() < end:
            events.extend(mon.events(timeout=0.3))
            if any(isinstance(e, FlowClosed) and e.daddr in anthropic and e.comm == "curl" for e in events):
                break
    flows = [e for e in events if isinstance(e, FlowOpened | FlowClosed) and e.daddr in anthropic
             and e.comm == "curl"]
    assert {type(e) for e in flows} == {FlowOpened, FlowClosed}, events
    for ev in flows:
        chain = ev.ancestry
        assert [a.comm for a in chain[:3]] == ["curl", "bash", "claude"], chain
        assert chain[2].pid == res.pid  # the process the lab started (ip netns exec and env exec)
        assert chain[2].exe.endswith("/agent/claude") and chain[0].exe.endswith("/curl")
        assert (ev.agent, ev.agent_pid, ev.agent_evidence) == ("claude-code", res.pid, "exe:claude")
        assert ev.ppid == chain[1].pid and ev.proc_start_time is not None
        assert abs(ev.proc_start_time - ev.wall_time) < 20  # curl started just before its connection
    calls = [e for e in events if isinstance(e, LlmCall) and e.daddr in anthropic]
    if mon.plan.plaintext != "off":  # uprobes: the call carries the same identity
        assert len(calls) == 1 and calls[0].agent == "claude-code" and calls[0].ancestry == flows[0].ancestry

"""FlowView: the one reducer of flow state (opened / classified / closed), bounded."""

from dataclasses import replace

import pytest
from events_factory import sample_events

from busted.events import Evidence, FlowClassified, FlowClosed, FlowOpened
from busted.sinks.flowview import FlowView


def _flow_events(flow_id: int = 4242, **kw):
    evs = [e for e in sample_events(flow_id=flow_id, **kw) if isinstance(e, FlowOpened | FlowClassified | FlowClosed)]
    opened, classified, closed = evs
    return opened, classified, closed


def test_life_of_a_flow():
    opened, classified, closed = _flow_events()
    opened = replace(opened, provider=None, hostname=None, evidence=Evidence.UNKNOWN, confidence=0.0)
    v = FlowView()
    assert v.update(sample_events()[0]) is None  # a DNS answer: ignored
    c = v.update(opened)
    assert c is not None and c.kind == "flow_opened" and c.before is None and not c.provider_learned
    assert c.after.is_open and c.after.opened == opened.wall_time and c.after.provider is None
    assert c.after.bytes_sent is None and len(v) == 1 and 4242 in v
    c = v.update(classified)
    assert c.before is not None and c.before.provider is None and c.provider_learned
    assert (c.after.provider, c.after.hostname, c.after.flow.evidence) == ("openai", "api.openai.com",
                                                                            Evidence.SNI)
    assert c.after.opened == opened.wall_time and v.get(4242) == c.after
    assert v.update(classified) is None  # same classification again: nothing changed
    c = v.update(closed)
    assert c.kind == "flow_closed" and not c.provider_learned and not c.after.is_open
    assert (c.after.bytes_sent, c.after.bytes_received, c.after.duration_ns) == (811, 2233, 1_000_000_000)
    assert c.after.opened == opened.wall_time and c.after.closed == closed.wall_time
    assert len(v) == 0 and v.get(4242) is None  # closed flows are forgotten
    assert v.evicted == 0


def test_repeated_open_changes_nothing():
    opened, _, _ = _flow_events()
    v = FlowView()
    assert v.update(opened).provider_learned  # provider known at open
    assert v.update(replace(opened, ts_ns=99)) is None
    assert len(v) == 1


def test_close_keeps_a_known_classification_when_it_carries_none():
    opened, _, closed = _flow_events()
    v = FlowView()
    v.update(opened)
    bare = replace(closed, provider=None, hostname=None, evidence=Evidence.UNKNOWN, confidence=0.0)
    c = v.update(bare)
    assert (c.after.provider, c.after.hostname, c.after.flow.evidence, c.after.flow.confidence) == (
        "openai", "api.openai.com", Evidence.DNS, 0.8)
    assert c.after.bytes_sent == 811


def test_close_without_open():
    _, _, closed = _flow_events()
    v = FlowView()
    c = v.update(closed)
    assert c.before is None and c.provider_learned and c.after.opened == pytest.approx(closed.wall_time - 1.0)
    pre = v.update(replace(closed, flow_id=7, duration_ns=0, preexisting=True))
    assert pre.after.opened is None and pre.after.closed == closed.wall_time


def test_bounded_lru_counts_evictions():
    v = FlowView(max_flows=3)
    for i in range(5):
        v.update(_flow_events(flow_id=i)[0])
    assert len(v) == 3 and v.evicted == 2
    assert [s.flow_id for s in v.open_flows()] == [2, 3, 4]
    v.update(_flow_events(flow_id=2)[1])  # classified: 2 becomes the most recent
    v.update(_flow_events(flow_id=5)[0])
    assert [s.flow_id for s in v.open_flows()] == [4, 2, 5] and v.evicted == 3
    c = v.update(_flow_events(flow_id=0)[2])  # the close of an evicted flow still reports its state
    assert c.before is None and c.after.bytes_sent == 811
    with pytest.raises(ValueError):
        FlowView(max_flows=0)

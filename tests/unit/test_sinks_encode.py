"""The outputs' fast paths give exactly what the plain code gave: to_dict, redact, the one JSON
encoding (orjson or not), one flows upsert per flow per transaction, the CLI's batched loop."""

import dataclasses
import enum
import io
import json
import math
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import needs
import pytest
from events_factory import SECRET, sample_calls, sample_events
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sinks_sqlite import EVENTS

from busted.events import (
    Ancestor,
    Direction,
    Event,
    Evidence,
    FlowClassified,
    FlowClosed,
    FlowOpened,
    PolicyDecision,
)
from busted.redact import MASK, redact_id, redact_text
from busted.sinks import Store, _codec, dumps, encode, redact

# -- the plain implementations these replace, kept here as the reference --------------------------


def _ref_jsonable(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return v.name.lower()
    if isinstance(v, tuple | list):
        return [_ref_jsonable(x) for x in v]
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _ref_jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, bytes):
        return v.hex()
    return v


def _ref_to_dict(ev: Event) -> dict[str, Any]:
    d: dict[str, Any] = {"kind": ev.kind}
    for f in dataclasses.fields(ev):
        d[f.name] = _ref_jsonable(getattr(ev, f.name))
    return d


def _ref_secret(k: Any) -> bool:
    return isinstance(k, str) and k.strip().lower().replace("_", "-") in _codec._SECRET_KEYS


def _ref_redact(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: (MASK if _ref_secret(k) else (redact_id if k == "response_id" else redact_text)(v)
                    if k in _codec._TEXT_KEYS and isinstance(v, str)
                    else _ref_redact(v)) for k, v in d.items()}
    if isinstance(d, list | tuple):
        if d and all(isinstance(x, list | tuple) and len(x) == 2 and isinstance(x[0], str) for x in d):
            return type(d)(type(x)((x[0], MASK)) if _ref_secret(x[0]) else _ref_redact(x) for x in d)
        return type(d)(_ref_redact(x) for x in d)
    return d


class Color(enum.Enum):
    UNKNOWN = 0
    RED = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class OddEvent(Event):
    """A kind defined outside busted.events, with field types the built-in ones do not use."""

    kind = "odd_event"
    blob: bytes = b""
    colors: tuple[Color, ...] = ()
    nested: Any = None


ODD = [
    OddEvent(ts_ns=1, wall_time=2.5, blob=b"\x00\xff", colors=(Color.RED, Color.UNKNOWN),
             nested={"Authorization": "Bearer x", "headers": [("x-api-key", "k"), ("accept", "*/*")],
                     "deep": [{"cookie": "c"}, (1, 2.5, None, True)]}),
    OddEvent(ts_ns=1, wall_time=2.5, nested=[Direction.CONNECT, Evidence.SNI, Ancestor(pid=1, comm="x")]),
    PolicyDecision(ts_ns=1, wall_time=1.0, rule="r", action="deny", enforced=False, point="connect",
                   matched=(("provider", "openai"), ("api_key", "sk-x"), ("port", 443))),
]
KNOWN = [*sample_events(), *sample_calls(secret=SECRET), *ODD,
         FlowOpened(ts_ns=1, wall_time=1.0, flow_id=1, direction=Direction.CONNECT, pid=1, tid=1, uid=0, comm="c",
                    family=4, saddr="a", sport=1, daddr="b", dport=2,
                    ancestry=(Ancestor(pid=1, comm="c", exe=None), Ancestor(pid=0, comm="init", exe="/sbin/init")))]


@pytest.mark.parametrize("ev", KNOWN, ids=lambda e: e.kind)
def test_to_dict_and_redact_as_before(ev):
    d = ev.to_dict()
    assert d == _ref_to_dict(ev) and list(d) == list(_ref_to_dict(ev))  # values, types and key order
    assert redact(d) == _ref_redact(d)
    assert redact(d) is not d and d == _ref_to_dict(ev)  # a new object; the input unchanged


@settings(max_examples=300)
@given(ev=EVENTS)
def test_to_dict_and_redact_as_before_any_event(ev):
    d = ev.to_dict()
    assert d == _ref_to_dict(ev)
    assert redact(d) == _ref_redact(d)


@pytest.fixture(params=["orjson", "stdlib"])
def encoder(request, monkeypatch):
    if request.param == "orjson":
        needs.module("orjson")
    else:
        monkeypatch.setattr(_codec, "_orjson", None)
    return request.param


def _stdlib(d: Any) -> str:
    return json.dumps(d, separators=(",", ":"), default=str)


@pytest.mark.parametrize("ev", KNOWN, ids=lambda e: e.kind)
def test_dumps_gives_the_same_json_values(ev, encoder):
    d = redact(ev.to_dict())
    line = dumps(d, cls=type(ev))
    assert line.isascii() and "\n" not in line
    assert json.loads(line) == json.loads(_stdlib(d))
    if encoder == "stdlib" or not _codec._plain_class(type(ev)):
        assert line == _stdlib(d)
    assert encode(ev).line == line


def test_orjson_only_for_classes_whose_fields_it_writes_alike():
    import busted.events as E

    plain = (E.FlowOpened, E.FlowClassified, E.FlowClosed, E.DnsAnswer, E.TlsClientHello, E.EventsLost, E.LlmCall,
             E.McpMessage)
    assert all(_codec._plain_class(c) for c in plain)
    assert not _codec._plain_class(E.PolicyDecision)  # matched: tuple[tuple[str, Any], ...]
    assert not _codec._plain_class(OddEvent)  # nested: Any
    # orjson would write the enum's value (1); the standard library writes str() of it
    ev = OddEvent(ts_ns=1, wall_time=1.0, nested={"color": Color.RED})
    assert json.loads(encode(ev).line)["nested"] == {"color": "Color.RED"}


def test_orjson_is_what_encodes_busted_events(monkeypatch):
    orjson = needs.module("orjson")
    calls = []

    class Counting:
        OPT_PASSTHROUGH_DATETIME = orjson.OPT_PASSTHROUGH_DATETIME

        @staticmethod
        def dumps(*a, **kw):
            calls.append(1)
            return orjson.dumps(*a, **kw)

    monkeypatch.setattr(_codec, "_orjson", Counting)
    lines = [encode(ev).line for ev in sample_events()]
    assert len(calls) == len(lines)


@pytest.mark.parametrize("d", [
    {"comm": "\x1b]0;OWNED\x07", "sni": "caf\u00e9\u202e", "emoji": "\U0001f600"},  # escaped, ASCII out
    {"s": "\ud800"},  # a lone surrogate (orjson refuses it)
    {"big": 2**70, "neg": -(2**64)},  # beyond 64 bits (orjson refuses them)
    {"nan": math.nan, "inf": [math.inf, None], "x": None, "deep": {"y": -math.inf}},  # orjson: null
    {"n": "annulled", "f": math.nan},  # "null" inside a string does not hide a NaN
    {"keys": {1: "a", None: "b"}},  # non-string keys
    {"obj": Path("/x")},  # default=str
])
def test_dumps_edge_values_are_the_standard_librarys(d, encoder):
    assert dumps(d, cls=FlowOpened) == _stdlib(d)  # a plain class: orjson tries, its guards decide


@settings(max_examples=200)
@given(ev=EVENTS)
def test_dumps_any_event(ev):
    d = redact(ev.to_dict())
    line = dumps(d, cls=type(ev))
    assert json.loads(line) == json.loads(_stdlib(d)) and line.isascii()


# -- the store: one upsert per flow per transaction ------------------------------------------------

_IDENT = dict(direction=Direction.CONNECT, pid=7, tid=7, uid=0, comm="c", family=4, saddr="10.0.0.1", sport=1,
              daddr="10.0.0.2", dport=443)


def _flow_event(kind: str, fid: int, t: float, classified: bool) -> Event:
    cls = {"open": FlowOpened, "classified": FlowClassified, "close": FlowClosed}[kind]
    extra = {"bytes_sent": 10, "bytes_received": 20, "duration_ns": 1_000_000} if kind == "close" else {}
    cl = dict(hostname="api.openai.com", provider="openai", evidence=Evidence.SNI, confidence=0.9) \
        if classified else {}
    return cls(ts_ns=int(t * 1e9), wall_time=t, flow_id=fid, **_IDENT, **cl, **extra)


FLOW_SCRIPTS = st.lists(st.tuples(st.sampled_from(["open", "classified", "close"]), st.integers(1, 3),
                                  st.booleans()), min_size=1, max_size=14)


def _flows_rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT * FROM flows ORDER BY flow_id").fetchall()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=FLOW_SCRIPTS, max_flows=st.sampled_from([1, 2, 64]))
def test_one_upsert_per_flow_per_batch_is_the_same_as_one_by_one(script, max_flows):
    """Replayed opens after a close, classifications lost and found, evictions (max_flows 1):
    a transaction of the whole script leaves the flows rows one transaction per event leaves."""
    evs = [_flow_event(k, fid, 100.0 + i, c) for i, (k, fid, c) in enumerate(script)]
    with tempfile.TemporaryDirectory() as d:
        one, many = Path(d) / "one.db", Path(d) / "many.db"
        with Store(one, batch_size=1, max_flows=max_flows) as s:
            for ev in evs:
                s.write(ev)
                s.flush()  # one event per transaction
        with Store(many, batch_size=10_000, max_flows=max_flows) as s:
            s.write_encoded([encode(ev) for ev in evs])
        assert _flows_rows(many) == _flows_rows(one)
        with Store.open_readonly(many) as r:
            assert list(r.events()) == evs


def test_encoded_and_plain_writes_store_the_same(tmp_path):
    evs = [*sample_events(), *sample_calls(secret=SECRET)]
    with Store(tmp_path / "a.db") as s:
        s.write_many(evs)
    with Store(tmp_path / "b.db") as s:
        s.write_encoded([encode(ev) for ev in evs[:3]] + evs[3:])  # a plain event among them is fine
    for table in ("events", "flows", "dns_answers", "tls_hellos", "losses", "llm_calls", "mcp_messages"):
        with sqlite3.connect(tmp_path / "a.db") as a, sqlite3.connect(tmp_path / "b.db") as b:
            q = f"SELECT * FROM {table} ORDER BY 1"
            assert a.execute(q).fetchall() == b.execute(q).fetchall(), table
    with sqlite3.connect(tmp_path / "b.db") as b:
        assert SECRET not in "".join(js for (js,) in b.execute("SELECT json FROM events"))


# -- the CLI's loop ---------------------------------------------------------------------------------


def _run(tmp_path: Path, feed: Any, name: str) -> tuple[list[str], list[str], list]:
    from busted.cli import _parser, _run_monitor, _Sinks

    args = _parser().parse_args(["monitor", "--json", "--jsonl", str(tmp_path / f"{name}.jsonl"),
                                 "--store", str(tmp_path / f"{name}.db")])
    out = io.StringIO()
    _run_monitor(args, out, feed, sinks=_Sinks(args))
    with Store.open_readonly(tmp_path / f"{name}.db") as r:
        stored = list(r.events())
    return out.getvalue().splitlines(), (tmp_path / f"{name}.jsonl").read_text().splitlines(), stored


def test_batched_loop_writes_what_the_one_by_one_loop_writes(tmp_path):
    evs = [ev for i in range(20) for ev in (*sample_events(flow_id=i), *sample_calls(flow_id=i, secret=SECRET))]
    flat = _run(tmp_path, iter(evs), "flat")
    batched = _run(tmp_path, (evs[i:i + 7] for i in range(0, len(evs), 7)), "batched")
    assert flat == batched
    stdout, jsonl, stored = batched
    assert stdout == jsonl  # --json prints the lines the file outputs write: one encoding, redacted
    assert [json.loads(ln) for ln in jsonl] == [redact(ev.to_dict()) for ev in evs]
    assert SECRET not in "".join(jsonl)
    assert [ev.to_dict() for ev in stored] == [redact(ev.to_dict()) for ev in evs]
    assert all(ln.isascii() for ln in stdout)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Planted(Event):
    """An event kind with credential-named fields, as a future kind (or a bug) might carry."""

    kind = "planted_secret"
    x_api_key: str
    headers: tuple = ()
    note: str = ""


@pytest.mark.parametrize("outputs", [[], ["--jsonl", "x.jsonl"]])
def test_json_output_masks_credential_named_keys(tmp_path, outputs):
    """``busted monitor --json`` printed ``to_dict()`` without the sinks' redaction pass: a
    credential-named key reached stdout verbatim while JSONL and SQLite masked it."""
    from busted.cli import _parser, _run_monitor, _Sinks

    ev = _Planted(ts_ns=1, wall_time=1.0, x_api_key=SECRET, headers=(("Authorization", f"Bearer {SECRET}"),),
                  note="kept")
    args = _parser().parse_args(["monitor", "--json", *[str(tmp_path / o) if o.endswith(".jsonl") else o
                                                        for o in outputs]])
    out = io.StringIO()
    sinks = _Sinks(args) if outputs else None
    _run_monitor(args, out, iter([ev, [ev, *sample_calls(secret=SECRET)]]), sinks=sinks)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and SECRET not in out.getvalue()
    first = json.loads(lines[0])
    assert first["x_api_key"] == MASK and first["headers"] == [["Authorization", MASK]] and first["note"] == "kept"
    if outputs:
        assert (tmp_path / "x.jsonl").read_text().splitlines() == lines


class _Str(str):
    pass


_KEYS = st.sampled_from(["path", "user_agent", "prompt", "Authorization", "x_api_key", "Cookie", "comm", "pid",
                         "headers", " API-Key ", "completion", "exe"])
_LEAF = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | \
    st.sampled_from(["sk-proj-Zq3xW9vT1bN7mK2pL5hR8cY4dF6gJ0sA", "/v1/x?key=abcdef0123456789", "plain", ""]) | \
    st.text(max_size=8) | st.text(max_size=8).map(_Str)
_TREE = st.recursive(_LEAF, lambda kids: st.lists(kids, max_size=4) | st.lists(kids, max_size=3).map(tuple)
                     | st.dictionaries(_KEYS, kids, max_size=5) | st.tuples(_KEYS, kids), max_leaves=20)


@settings(max_examples=400)
@given(tree=st.dictionaries(_KEYS, _TREE, max_size=8))
def test_redact_any_tree_as_before(tree):
    """Key plans are per key tuple: the same keys with other value types, nested header pairs,
    str subclasses and text keys holding lists all come out as the plain walk made them."""
    assert redact(tree) == _ref_redact(tree)
    assert redact([tree, tree]) == _ref_redact([tree, tree])

"""The per-class generated encoders (``_codec.redacted_dict``) give exactly ``redact(ev.to_dict())``:
the same values, value types and key order, for every event class and any field values (the
usual ones, and values of other types than declared, which must take the generic path for that
field), and credentials are masked as strongly as the generic path masks them."""

import dataclasses
import enum
import json
import math
from typing import Any

import pytest
from events_factory import SECRET, sample_calls, sample_events
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sinks_encode import ODD, _Planted, _Str
from test_sinks_sqlite import EVENTS

import busted.events as E
from busted.events import Ancestor, Direction, DnsRecord, Event, Evidence, FlowOpened, LlmCall
from busted.redact import MASK
from busted.sinks import _codec, encode, event_kinds, redact
from busted.sinks._codec import redacted_dict


def _same(a: Any, b: Any, where: str = "") -> None:
    """``a`` and ``b`` alike: equal values, the same types at every depth, the same key order."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: key order {list(a)} vs {list(b)}"
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def _check(ev: Event) -> dict[str, Any]:
    want = redact(ev.to_dict())
    got = redacted_dict(ev)
    _same(got, want)
    return got


ALL_CLASSES = sorted({*event_kinds().values(), _Planted}, key=lambda c: c.kind)
BUILTIN = [c for c in vars(E).values() if isinstance(c, type) and issubclass(c, Event) and "kind" in c.__dict__
           and c.__module__ == E.__name__ and c.kind not in ("event", "flow")]


@pytest.mark.parametrize("cls", BUILTIN, ids=lambda c: c.kind)
def test_every_builtin_class_has_an_encoder(cls):
    assert _codec._compile(cls) is not None


@pytest.mark.parametrize("ev", [*sample_events(), *sample_calls(secret=SECRET), *ODD,
                                FlowOpened(ts_ns=1, wall_time=1.0, flow_id=1, direction=Direction.CONNECT, pid=1,
                                           tid=1, uid=0, comm="c", family=4, saddr="a", sport=1, daddr="b", dport=2,
                                           ancestry=(Ancestor(1, "c"), Ancestor(0, "init", "/sbin/init")))],
                         ids=lambda e: e.kind)
def test_known_events_as_the_generic_path(ev):
    got = _check(ev)
    if type(ev) in BUILTIN:  # the generated encoder made it, not the fallback
        assert _codec._ENCODERS[type(ev)](ev) is not None
    assert SECRET not in json.dumps(got)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(ev=EVENTS)
def test_any_event_as_the_generic_path(ev):
    _check(ev)


class Shade(enum.IntEnum):
    UNKNOWN = 0
    DARK = 1


# Values a field may hold against its declaration (frozen dataclasses do not check): other enums,
# ints equal to an enum member, str subclasses, bytes, lists, header pairs, nested dicts with
# credential keys, dataclasses, secrets in any text.
_ODD_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
    | st.text(max_size=8).map(_Str) | st.binary(max_size=6)
    | st.sampled_from([SECRET, f"Bearer {SECRET}", f"/v1/x?api_key={SECRET}", Direction.ACCEPT, Evidence.SNI,
                       Shade.DARK, 1, 4, Ancestor(1, "a", SECRET), DnsRecord("n", "A", "v", 1)]),
    lambda kids: st.lists(kids, max_size=3) | st.lists(kids, max_size=3).map(tuple)
    | st.tuples(st.sampled_from(["Authorization", "accept", "x-api-key", "path"]), kids)
    | st.dictionaries(st.sampled_from(["cookie", "path", "user_agent", "comm", "api_key"]), kids, max_size=3),
    max_leaves=8)


@st.composite
def _odd_event(draw: st.DrawFn) -> Event:
    """An event of any class, some fields replaced by odd values (the rest as EVENTS or defaults)."""
    cls = draw(st.sampled_from(ALL_CLASSES))
    fields = dataclasses.fields(cls)
    kw: dict[str, Any] = {}
    for f in fields:
        odd = draw(st.integers(0, 3)) == 0
        if odd or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING):
            kw[f.name] = draw(_ODD_VALUES)
    return cls(**kw)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ev=_odd_event())
def test_odd_field_values_as_the_generic_path(ev):
    _check(ev)


@settings(max_examples=200, deadline=None)
@given(ev=_odd_event())
def test_no_secret_in_any_line(ev):
    """A key-shaped secret in a text field (path, user agent, prompt, completion), or under a
    credential-named field, never reaches the line."""
    line = encode(ev).line
    d = ev.__dict__
    for name in ("path", "user_agent", "prompt", "completion", "response_id", "x_api_key"):
        if d.get(name) == SECRET or d.get(name) == f"/v1/x?api_key={SECRET}":
            assert SECRET not in json.loads(line)[name]


def test_secrets_masked_in_every_text_field():
    call = sample_calls(secret=SECRET)[0]
    call = dataclasses.replace(call, completion=f"key {SECRET}", response_id=f"chatcmpl-1 {SECRET}")
    d = _check(call)
    assert SECRET not in json.dumps(d)
    assert d["path"].endswith("?key=" + MASK)
    planted = _Planted(ts_ns=1, wall_time=1.0, x_api_key=SECRET, headers=(("Cookie", SECRET), ("accept", "x")))
    d = _check(planted)
    assert d["x_api_key"] == MASK and d["headers"] == [["Cookie", MASK], ["accept", "x"]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class _OwnDict(Event):
    kind = "own_dict"
    x: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "x": self.x, "api_key": "k"}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Slots(Event):
    kind = "slots_event"
    path: str = ""


def test_classes_the_encoders_leave_to_the_generic_path():
    assert _codec._compile(_OwnDict) is None  # its own to_dict is what the generic path calls
    _same(redacted_dict(_OwnDict(ts_ns=1, wall_time=1.0, x=3)), {"kind": "own_dict", "x": 3, "api_key": MASK})
    _check(_Slots(ts_ns=1, wall_time=1.0, path=f"/x?key={SECRET}"))  # no __dict__: the generic path


def test_an_instance_of_a_subclass_is_not_encoded_as_its_base():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Sub(LlmCall):
        kind = "llm_call_sub"
        api_key: str = ""

    base = sample_calls()[0]
    ev = Sub(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, api_key=SECRET)
    assert _codec._compile(LlmCall)(ev) is None
    assert _check(ev)["api_key"] == MASK


# -- the store's rows: values left to SQLite's own binding, and the strict path when it refuses -----

_TABLES = ("events", "flows", "dns_answers", "tls_hellos", "losses", "llm_calls", "mcp_messages", "flow_summaries")


def _dump(path) -> dict[str, list]:
    import sqlite3

    with sqlite3.connect(path) as db:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in _TABLES}


def _odd_values(ev: Event) -> Event:
    """Values _row leaves to SQLite that it refuses (beyond int64, lone surrogates), or not."""
    if not isinstance(ev, E.FlowEvent):
        return ev
    if ev.flow_id % 3 == 0:
        return dataclasses.replace(ev, cgroup_id=2**64 + ev.flow_id, comm="bad\udcff")
    if ev.flow_id % 3 == 1:
        return dataclasses.replace(ev, exe="/usr/bin/\u00e9", cmdline=("a", "\u00e9", ""), preexisting=True)
    return ev


@pytest.mark.parametrize("odd", [False, True])
def test_store_rows_as_every_value_made_strict(tmp_path, monkeypatch, odd):
    """Rows whose ints and strs go to SQLite as they are store what rows made value by value (the
    code before) stored; with values SQLite refuses in the batch, the whole batch is redone strictly."""
    from busted.sinks import Store, store_rows
    from busted.sinks import sqlite as store_sqlite

    evs = [ev for i in range(6) for ev in (*sample_events(flow_id=i), *sample_calls(flow_id=i, secret=SECRET))]
    if odd:
        evs = [_odd_values(ev) for ev in evs]
    with Store(tmp_path / "fast.db", batch_size=10_000) as s:
        s.write_encoded([encode(ev) for ev in evs])
    strict = lambda *values: store_rows._strict(values)  # noqa: E731 - every value through _sql
    monkeypatch.setattr(store_rows, "_row", strict)
    monkeypatch.setattr(store_sqlite, "_row", strict)
    with Store(tmp_path / "strict.db", batch_size=10_000) as s:
        s.write_encoded([encode(ev) for ev in evs])
        assert s.stats()["invalid"] == 0
    assert _dump(tmp_path / "fast.db") == _dump(tmp_path / "strict.db")
    if odd:
        flows = _dump(tmp_path / "fast.db")["flows"]
        assert sum("bad\\udcff" in row and float(2**64) in row for row in flows) == 2


def test_list_json_remembered_is_the_json(monkeypatch):
    from busted.sinks import store_rows

    for v in (["h2", "http/1.1"], ["caf\u00e9", "\ud800"], [], ["a"] * 3, [1, "a"], [True], [{"pid": 1}]):
        want = json.dumps(v, default=str)
        assert store_rows._sql(v) == want and store_rows._sql(v) == want  # computed, then remembered
    monkeypatch.setattr(store_rows, "_JSON_SEEN", {str(i): "" for i in range(4096)})
    assert store_rows._sql(["x"]) == '["x"]' and len(store_rows._JSON_SEEN) == 1  # full: cleared, bounded


_JSONABLE = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3), max_leaves=12)


@settings(max_examples=300)
@given(v=st.lists(_JSONABLE, max_size=4))
def test_list_json_is_json_dumps(v):
    """The prebuilt C encoder (when this Python has it) and the remembered string lists write
    what json.dumps(v, default=str) writes: the store's list columns keep their format."""
    from busted.sinks import store_rows

    assert store_rows._sql(v) == json.dumps(v, default=str)


def test_list_json_cycle_is_refused_as_before():
    from busted.sinks import store_rows

    v: list = [1]
    v.append(v)
    with pytest.raises(ValueError, match="Circular"):
        store_rows._sql(v)


def test_the_list_columns_made_first_are_the_lists():
    from busted.sinks import store_rows as R

    def cols(sql: str) -> list[str]:
        return [c.strip() for c in sql[sql.index("(") + 1:sql.index(")")].split(",")]

    assert [cols(R._SQL_DNS)[i] for i in R._LISTS_AT] == ["answers", "cname_chain"]
    assert [cols(R._SQL_TLS)[i] for i in R._LISTS_AT] == ["alpn", "versions"]
    assert {R._FLOW_COLS[i] for i in R._FLOW_AT} == {"cmdline", "ancestry", "preexisting"}


def test_remembered_text_redaction_is_the_function():
    """Paths and user agents repeat: their redaction is remembered, bounded, and the same."""
    from busted.redact import redact_text, redact_url

    path, ua = _codec._TEXT_KEYS["path"], _codec._TEXT_KEYS["user_agent"]
    texts = ["/v1/chat/completions", f"/v1/x?key={SECRET}&alt=sse", f"/v1/{SECRET}/y", "", "x" * 300 + " " + SECRET,
             f"OpenAI/Python 1.54.0 {SECRET}", f"Bearer {SECRET}"]
    for _ in range(2):  # computed, then remembered
        for t in texts:
            assert path(t) == redact_url(t) and ua(t) == redact_text(t)
            assert SECRET not in path(t) and SECRET not in ua(t)
    small = _codec._remembered(redact_text, longest=8, most=3)
    for i in range(10):
        assert small(f"t{i}") == f"t{i}"
    assert small(SECRET) == MASK and small(SECRET) == MASK


def test_backfill_of_an_old_store_makes_every_value(tmp_path):
    """The v3 -> v4 backfill spreads calls read back from `events.json`, whose ints and strings may
    be anything (beyond int64, lone surrogates): they are made as the writer makes them."""
    import sqlite3

    from test_sinks_sqlite import _V2, old_store

    from busted.sinks import Store

    call = dataclasses.replace(sample_calls(flow_id=1)[0], cgroup_id=2**64 + 5, exe="/bin/bad\udcff")
    p = tmp_path / "v3.db"
    db = old_store(p, _V2.split("CREATE TABLE IF NOT EXISTS llm_calls")[0], 3, [call])
    db.commit()
    db.close()
    with Store(p):
        pass
    with sqlite3.connect(p) as db:
        assert db.execute("SELECT cgroup_id, exe FROM llm_calls").fetchall() == [(float(2**64), "/bin/bad\\udcff")]

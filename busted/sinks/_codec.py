"""Events to and from JSON-safe dicts (exact round trip), and defensive secret redaction.

``event_from_dict(ev.to_dict()) == ev`` for every event kind: enums come back from their lower-case
names, lists become tuples where the field is a tuple, nested dataclasses (``DnsRecord``) are
rebuilt, hex strings become ``bytes`` where the field is ``bytes``. Keys the class does not know are
ignored (a newer busted may add fields); a kind no imported class claims raises ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import itertools
import json
import math
import operator
import types
import typing
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

from busted.events import Event, _jsonable
from busted.redact import MASK, SECRET_HEADERS, redact_id, redact_text, redact_url

__all__ = ["MASK", "Encoded", "dumps", "encode", "event_from_dict", "event_kinds", "redact"]

_orjson: types.ModuleType | None
try:  # optional (busted[fast]): ~10x faster than json.dumps on an event; the same JSON values
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

_STDLIB = json.JSONEncoder(separators=(",", ":"), default=str)  # ensure_ascii: only printable ASCII out
_ORJSON_OPTS = (_orjson.OPT_PASSTHROUGH_DATETIME | _orjson.OPT_PASSTHROUGH_DATACLASS) if _orjson else 0


def _nonfinite(v: Any) -> bool:
    """A NaN or infinite float in ``v``, at any depth (orjson writes null for them, json NaN)."""
    if type(v) is float:
        return not math.isfinite(v)
    if isinstance(v, dict):
        return any(_nonfinite(x) for x in v.values())
    if isinstance(v, list | tuple):
        return any(_nonfinite(x) for x in v)
    return False


_NONE = type(None)


_PLAIN_TYPES = (int, str, float, bool, bytes, type(None))


def _plain_type(tp: Any, seen: frozenset[type] = frozenset()) -> bool:
    """Whether a declared field type only holds what ``to_dict()`` turns into plain JSON values
    (scalars, enum names, lists, dataclass dicts): nothing orjson would write differently."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType, tuple):
        return all(a is Ellipsis or _plain_type(a, seen) for a in typing.get_args(tp))
    if not isinstance(tp, type):
        return False  # Any, TypeVars, dict[...], list[...]: anything may be in them
    if issubclass(tp, enum.Enum) or tp in _PLAIN_TYPES:
        return True
    if dataclasses.is_dataclass(tp):
        return tp in seen or _plain_class(tp, seen | {tp})
    return False


@functools.cache
def _plain_class(cls: type, seen: frozenset[type] = frozenset()) -> bool:
    try:
        hints = _hints(cls)
        return all(_plain_type(hints[f.name], seen | {cls}) for f in dataclasses.fields(cls))
    except Exception:  # noqa: BLE001 - unresolvable annotations: not known to be plain
        return False


def dumps(d: dict[str, Any], *, cls: type | None = None) -> str:
    """Compact JSON of a ``to_dict()``-shaped dict, only printable ASCII (like ``json.dumps`` with
    ``ensure_ascii=True``, ``separators=(",", ":")``, ``default=str``): the one encoding of every
    output line (``--json`` stdout, JSONL, the store's ``events.json``).

    With orjson installed and ``cls`` the event class ``d`` is the ``to_dict()`` of, orjson
    encodes, if every field of ``cls`` is declared with types ``to_dict()`` makes plain JSON values
    of (every class in ``busted.events`` but ``PolicyDecision``, whose ``matched`` holds anything:
    orjson writes a plain ``Enum`` nested in a dict as its value, json as ``str()``). Whatever orjson
    would still write differently goes to the standard library instead: non-ASCII text (orjson
    writes UTF-8, not ``\\uXXXX``), lone surrogates, integers beyond 64 bits, NaN/infinity (orjson
    writes null). Values are equal either way; only float spelling may differ (``1e16`` vs
    ``1e+16``)."""
    if _orjson is not None and cls is not None and _plain_class(cls):
        try:
            b: bytes = _orjson.dumps(d, default=str, option=_ORJSON_OPTS)
        except (TypeError, ValueError):  # orjson.JSONEncodeError is a TypeError
            pass
        else:
            # orjson writes null for None and for NaN/infinity. As many nulls as top-level Nones
            # (a C-level count): every null is one of those, so no NaN hides in it; else look.
            if b.isascii() and (b.count(b"null") == tuple(map(type, d.values())).count(_NONE)
                                or not _nonfinite(d)):
                return b.decode("ascii")
    return _STDLIB.encode(d)


class Encoded(NamedTuple):
    """One event, encoded once for every output that writes it: ``data`` is ``redact(to_dict())``,
    ``line`` its compact JSON (``dumps``), without a newline."""

    event: Any
    data: dict[str, Any]
    line: str


def encode(ev: Event, d: dict[str, Any] | None = None) -> Encoded:
    """``ev`` encoded for the file outputs; ``d`` is its ``to_dict()`` if the caller has it."""
    data = redacted_dict(ev) if d is None else redact(d)
    return Encoded(ev, data, dumps(data, cls=type(ev)))

_T = TypeVar("_T")
_SECRET_KEYS = frozenset(SECRET_HEADERS) | {"set-cookie", "x-auth-token", "api-token"}
# Free-text fields read from the wire (an LlmCall's path, user agent, captured content): the events
# are made with credentials masked; the sinks mask them again by name and shape (defence in depth).
# The same functions the events are built with (busted.classify.llm), by field name.
def _remembered(fn: Callable[[str], str], longest: int = 256, most: int = 1024) -> Callable[[str], str]:
    """``fn`` (a pure function of the text that never raises: busted.redact's), its results for
    texts up to ``longest`` characters remembered: request paths and user agents repeat from call
    to call (``redact_url`` of ``/v1/chat/completions`` is ~6 µs). At most ``most`` of them; the
    memory is cleared when full."""
    seen: dict[str, str] = {}

    def remembered(text: str) -> str:
        out = seen.get(text)
        if out is None:
            out = fn(text)
            if len(text) <= longest and type(text) is str:
                if len(seen) >= most:
                    seen.clear()
                seen[text] = out
        return out

    remembered.__wrapped__ = fn  # type: ignore[attr-defined]
    return remembered


_TEXT_KEYS: dict[str, Callable[[str], str]] = {"path": _remembered(redact_url), "user_agent": _remembered(redact_text),
                                               "prompt": redact_text, "completion": redact_text,
                                               "response_id": redact_id}


def _subclasses(cls: type[_T]) -> list[type[_T]]:
    out: list[type[_T]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out


def event_kinds() -> dict[str, type[Event]]:
    """kind -> event class, for every Event subclass imported so far (future kinds register by import)."""
    return {c.kind: c for c in _subclasses(Event) if "kind" in c.__dict__}


_HINTS: dict[type, dict[str, Any]] = {}  # one entry per event or nested dataclass: bounded by the classes


def _hints(cls: type) -> dict[str, Any]:
    # Resolved per class in its own module, so event classes defined outside busted.events work too.
    # A dict, not functools.cache: mypy rejects a dataclass type as the cache's Hashable argument.
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _convert(tp: Any, v: Any) -> Any:
    if v is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(args[0], v) if len(args) == 1 else v
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp[v.upper()] if isinstance(v, str) else tp(v)
    if tp is bytes and isinstance(v, str):
        return bytes.fromhex(v)
    if origin is tuple:
        targs = typing.get_args(tp)
        inner = targs[0] if targs else Any
        return tuple(_convert(inner, x) for x in v)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(v, dict):
        hints = _hints(tp)
        return tp(**{k: _convert(hints[k], x) for k, x in v.items() if k in hints})
    return v


def event_from_dict(d: dict[str, Any]) -> Event:
    """Rebuild the event ``to_dict()`` produced. Raises ValueError for an unknown kind or a dict the
    kind's class cannot be built from."""
    kind = d.get("kind", "")
    cls = event_kinds().get(kind)
    if cls is None:
        raise ValueError(f"unknown event kind {kind!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: _convert(hints[k], v) for k, v in d.items() if k in names})
    except (TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"cannot rebuild a {kind} event from {sorted(d)}: {exc}") from exc


_PLAIN = frozenset({int, str, float, bool, type(None)})  # exact types redact() returns unchanged
_SECRET_CACHE: dict[str, bool] = {}  # key -> _secret(key); keys are mostly the events' field names


def _secret(k: Any) -> bool:
    if not isinstance(k, str):
        return False
    hit = _SECRET_CACHE.get(k)
    if hit is None:
        hit = k.strip().lower().replace("_", "-") in _SECRET_KEYS
        if len(_SECRET_CACHE) < 4096:  # bounded: keys from the wire (header names) could be many
            _SECRET_CACHE[k] = hit
    return hit


def _is_pair(x: Any) -> bool:
    return isinstance(x, list | tuple) and len(x) == 2 and isinstance(x[0], str)


def redact(d: Any) -> Any:
    """Mask (with ``"[REDACTED]"``) the values of credential keys -- authorization,
    proxy-authorization, x-api-key, api-key, x-goog-api-key, cookie, set-cookie; case-insensitive,
    ``_`` = ``-`` -- at any depth, in dicts and in header lists of ``(name, value)`` pairs.
    The values of free-text keys go through the functions the events were built with:
    ``path`` through ``busted.redact.redact_url``, ``user_agent``, ``prompt`` and ``completion``
    through ``busted.redact.redact_text`` (credential-named query parameters, key shapes, bearer tokens).
    Returns a new object; the input is not changed."""
    if isinstance(d, dict):
        return _redact_dict(d)
    if isinstance(d, list | tuple):
        if type(d) is list and all(map(_PLAIN.__contains__, map(type, d))):
            return d.copy()  # plain scalars only (a command line, ALPN ids): no pairs, nothing inside
        if d and all(_is_pair(x) for x in d):  # a header list: [(name, value), ...]
            return type(d)(type(x)((x[0], MASK)) if _secret(x[0]) else redact(x) for x in d)
        return type(d)(x if type(x) in _PLAIN else redact(x) for x in d)
    return d


# key tuple of a dict -> (its credential keys, its other free-text keys): dicts of one event kind
# share their keys, so redact() decides per key once, not per event. Bounded (dicts from the wire).
_PLANS: dict[tuple[Any, ...], tuple[tuple[Any, ...], tuple[Any, ...]]] = {}


def _redact_dict(d: dict[Any, Any]) -> dict[Any, Any]:
    keys = tuple(d)
    plan = _PLANS.get(keys)
    if plan is None:
        secret = tuple(k for k in keys if _secret(k))
        plan = (secret, tuple(k for k in keys if k in _TEXT_KEYS and k not in secret))
        if len(_PLANS) < 1024:
            _PLANS[keys] = plan
    out = dict(d)
    for k in plan[0]:
        out[k] = MASK
    for k in plan[1]:
        v = out[k]
        if isinstance(v, str):
            out[k] = _TEXT_KEYS[k](v)
    # The values that are not plain scalars (lists, nested dicts, ...), found without a Python
    # step per key; masked and text values are plain str by now.
    vals = tuple(out.values())
    if all(map(_PLAIN.__contains__, map(type, vals))):
        return out
    for i in itertools.compress(range(len(vals)), map(operator.not_, map(_PLAIN.__contains__, map(type, vals)))):
        out[keys[i]] = redact(vals[i])
    return out


# -- per-class encoders: redact(ev.to_dict()) in one step -----------------------------------------
# The generic path builds the event's dict field by field (to_dict), then copies it again while
# deciding per key what to mask (redact). Both decisions depend only on the class: a field's name
# says whether it is masked or passed through a text function, its declared type what its value
# usually is. So each event class gets one generated function (like dataclasses' own __init__)
# that builds the redacted dict in a single dict display, with each field's fast case inline and
# everything else -- a value of another type than usual, a field type it has no case for --
# through the generic code for that one key. Same dict, same key order, same masking: a unit test
# compares the two paths over every event class and random field values (tests/unit/test_sinks_encode.py).


def _slow_value(key: str, value: Any) -> Any:
    """What redact(to_dict()) makes of ``value`` under ``key``: the generic code, for one key."""
    return _redact_dict({key: _jsonable(value)})[key]


def _type_args(tp: Any) -> tuple[Any, ...]:
    """``tp`` without ``None``, as a tuple of the types a union allows (``tp`` alone if not a union)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(tp) if a is not _NONE)
    return (tp,)


def _field_expr(name: str, tp: Any, ns: dict[str, Any], compiling: frozenset[type]) -> str:
    """Python source of the redacted, JSON-safe value of field ``name`` (declared ``tp``), read as
    ``v[name]`` from the instance's ``__dict__``. Objects the source uses are put in ``ns``."""
    key = repr(name)
    i = len(ns)
    if _secret(name):
        return "MASK"  # masked whatever it holds, as redact() masks it
    if name in _TEXT_KEYS:
        ns[f"t{i}"] = _TEXT_KEYS[name]
        return f"t{i}(x) if type(x := v[{key}]) is str else S({key}, x)"
    (tp,) = _type_args(tp)[:1] or (Any,)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        # type() is, not a dict lookup alone: an int equal to a member would find the member's name
        ns[f"e{i}"], ns[f"n{i}"] = tp, {m: m.name.lower() for m in tp}
        return f"n{i}[x] if type(x := v[{key}]) is e{i} else S({key}, x)"
    if typing.get_origin(tp) is tuple:
        inner = typing.get_args(tp)[:1]
        sub = inner[0] if inner and isinstance(inner[0], type) else None
        if sub is not None and dataclasses.is_dataclass(sub) and sub not in compiling:
            enc = _compile(sub, compiling)
            if enc is not None:  # a tuple of dataclasses: each its own redacted dict
                ns[f"d{i}"] = enc
                return f"_dcs(x, d{i}) if type(x := v[{key}]) is tuple else S({key}, x)"
        # scalars only (a command line, ALPN ids): redact() copies such a list as it is
        return f"list(x) if type(x := v[{key}]) is tuple and all(map(P, map(type, x))) else S({key}, x)"
    return f"x if type(x := v[{key}]) in PLAIN else S({key}, x)"


def _dcs(items: tuple[Any, ...], enc: Callable[[Any], dict[str, Any] | None]) -> Any:
    out = [enc(x) for x in items]
    return out if None not in out else _redact_list(items)


def _redact_list(items: tuple[Any, ...]) -> Any:
    return redact(_jsonable(items))


def _compile(cls: type, compiling: frozenset[type] = frozenset()) -> Callable[[Any], dict[str, Any] | None] | None:
    """A function giving ``redact(ob.to_dict())`` (or, for a nested dataclass, what redact makes of
    its dict) for an ``ob`` of exactly ``cls``, or None when it cannot tell (then use the generic
    path); None instead of a function when ``cls`` is not one this handles."""
    event = issubclass(cls, Event)
    if event and getattr(cls, "to_dict", None) is not Event.to_dict:
        return None  # a class with its own to_dict: only the generic path calls it
    try:
        hints = _hints(cls)
        names = tuple(f.name for f in dataclasses.fields(cls))
    except Exception:  # noqa: BLE001 - unresolvable annotations: the generic path
        return None
    if not all(n.isidentifier() for n in names):
        return None
    ns: dict[str, Any] = {"MASK": MASK, "S": _slow_value, "PLAIN": _PLAIN, "P": _PLAIN.__contains__,
                          "_dcs": _dcs}
    items = [f"{n!r}: {_field_expr(n, hints.get(n, Any), ns, compiling | {cls})}" for n in names]
    if event:
        items.insert(0, "'kind': k")
    # Only for an instance of exactly cls whose __dict__ holds every field (as _dataclass_dict reads
    # it); kind is the instance's, as to_dict reads it, and a str. Anything else: None (generic path).
    src = (f"def enc(ob):\n"
           f"    try:\n"
           f"        v = ob.__dict__\n"
           f"        if type(ob) is not C or len(v) < {len(names)}"
           + (" or type(k := ob.kind) is not str" if event else "") + ":\n"
           f"            return None\n"
           f"        return {{{', '.join(items)}}}\n"
           f"    except (AttributeError, KeyError):\n"  # no __dict__ (slots), a field missing from it
           f"        return None\n")
    ns["C"] = cls
    exec(compile(src, f"<busted encoder for {cls.__qualname__}>", "exec"), ns)  # noqa: S102 - field names only
    fn: Callable[[Any], dict[str, Any] | None] = ns["enc"]
    return fn


_ENCODERS: dict[type, Callable[[Any], dict[str, Any] | None] | None] = {}  # bounded by the event classes


def redacted_dict(ev: Event) -> dict[str, Any]:
    """``redact(ev.to_dict())``, through the class's generated encoder when it has one."""
    cls = type(ev)
    try:
        enc = _ENCODERS[cls]
    except KeyError:
        enc = _compile(cls)
        if len(_ENCODERS) < 1024:
            _ENCODERS[cls] = enc
    if enc is not None:
        d = enc(ev)
        if d is not None:
            return d
    out: dict[str, Any] = redact(ev.to_dict())
    return out

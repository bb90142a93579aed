"""Events to and from JSON-safe dicts (exact round trip), and defensive secret redaction."""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any

from busted.events import Event
from busted.redact import MASK, SECRET_HEADERS

__all__ = ["event_from_dict", "event_kinds", "redact"]

_SECRET_KEYS = frozenset(SECRET_HEADERS)


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out


def event_kinds() -> dict[str, type[Event]]:
    """kind -> event class, for every Event subclass imported so far."""
    return {c.kind: c for c in _subclasses(Event) if "kind" in c.__dict__}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    import busted.events as ev_mod

    return typing.get_type_hints(cls, globalns=vars(ev_mod))


def _convert(tp: Any, v: Any) -> Any:
    if v is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(args[0], v) if len(args) == 1 else v
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp[v.upper()] if isinstance(v, str) else tp(v)
    if origin is tuple:
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_convert(inner, x) for x in v)
    if dataclasses.is_dataclass(tp) and isinstance(v, dict):
        hints = _hints(tp)
        return tp(**{k: _convert(hints[k], x) for k, x in v.items() if k in hints})
    return v


def event_from_dict(d: dict[str, Any]) -> Event:
    """Rebuild the event ``to_dict()`` produced. Raises ValueError for an unknown kind."""
    cls = event_kinds().get(d.get("kind", ""))
    if cls is None:
        raise ValueError(f"unknown event kind {d.get('kind')!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: _convert(hints[k], v) for k, v in d.items() if k in names})


def redact(d: Any) -> Any:
    """Mask values of credential keys (authorization, x-api-key, api-key, cookie, ...) at any depth,
    including header lists of (name, value) pairs. Returns a new object."""
    if isinstance(d, dict):
        return {k: (MASK if isinstance(k, str) and k.lower() in _SECRET_KEYS else redact(v)) for k, v in d.items()}
    if isinstance(d, list | tuple):
        if len(d) == 2 and isinstance(d[0], str) and d[0].lower() in _SECRET_KEYS:
            return type(d)([d[0], MASK])
        return type(d)(redact(x) for x in d)
    return d

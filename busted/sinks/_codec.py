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
import types
import typing
from typing import Any

from busted.events import Event
from busted.redact import MASK, SECRET_HEADERS, redact_text

__all__ = ["MASK", "event_from_dict", "event_kinds", "redact"]

_SECRET_KEYS = frozenset(SECRET_HEADERS) | {"set-cookie", "x-auth-token", "api-token"}
# Free-text fields read from the wire (an LlmCall's path, user agent, captured content): the events
# are made with credentials masked; the sinks mask them again by name and shape (defence in depth).
_TEXT_KEYS = frozenset({"path", "user_agent", "prompt", "completion"})


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out


def event_kinds() -> dict[str, type[Event]]:
    """kind -> event class, for every Event subclass imported so far (future kinds register by import)."""
    return {c.kind: c for c in _subclasses(Event) if "kind" in c.__dict__}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # Resolved per class in its own module, so event classes defined outside busted.events work too.
    return typing.get_type_hints(cls)


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
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_convert(inner, x) for x in v)
    if dataclasses.is_dataclass(tp) and isinstance(v, dict):
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


def _secret(k: Any) -> bool:
    return isinstance(k, str) and k.strip().lower().replace("_", "-") in _SECRET_KEYS


def _is_pair(x: Any) -> bool:
    return isinstance(x, list | tuple) and len(x) == 2 and isinstance(x[0], str)


def redact(d: Any) -> Any:
    """Mask (with ``"[REDACTED]"``) the values of credential keys -- authorization,
    proxy-authorization, x-api-key, api-key, x-goog-api-key, cookie, set-cookie; case-insensitive,
    ``_`` = ``-`` -- at any depth, in dicts and in header lists of ``(name, value)`` pairs.
    The values of free-text keys (``path``, ``user_agent``, ``prompt``, ``completion``) go through
    ``busted.redact.redact_text`` (credential-named query parameters, key shapes, bearer tokens).
    Returns a new object; the input is not changed."""
    if isinstance(d, dict):
        return {k: (MASK if _secret(k) else redact_text(v) if k in _TEXT_KEYS and isinstance(v, str)
                    else redact(v)) for k, v in d.items()}
    if isinstance(d, list | tuple):
        if d and all(_is_pair(x) for x in d):  # a header list: [(name, value), ...]
            return type(d)(type(x)((x[0], MASK)) if _secret(x[0]) else redact(x) for x in d)
        return type(d)(redact(x) for x in d)
    return d

"""OTLP trace requests written straight to protobuf wire bytes, for ``busted.sinks.otlp``.

Why: the official encoder (``opentelemetry-exporter-otlp-proto-common``) builds a protobuf object
per attribute, ~85 us a span of ~30 attributes here, 4x everything else an exported call costs.
busted's spans repeat most attribute pairs (process, model, host, provider), so each
``KeyValue`` is encoded once and kept (bounded); a span is then a join of cached bytes. The
request is the same message: tests/unit/test_sinks_otlp.py parses both with opentelemetry-proto
and compares them. Sending (HTTP retries, gRPC channel, headers, compression) stays the official
exporters'. Only what busted puts in a span is handled: str, bool, int, float and lists of them.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

__all__ = ["Group", "SpanAttrs", "encode_spans"]


class Group(dict):  # type: ignore[type-arg]
    """Attributes many spans share (a client's call shape, a process): encoded once, kept in ``wire``."""

    __slots__ = ("wire",)

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.wire: bytes | None = None


class SpanAttrs(dict):  # type: ignore[type-arg]
    """A span's attributes (all of them, as a dict), and ``parts``: the ``Group``s and the span's own
    dict they were made of, no key in two (None: encode it as any dict)."""

    __slots__ = ("parts",)

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.parts: tuple[dict[str, Any], ...] | None = None

_D = struct.Struct("<d").pack
_Q = struct.Struct("<Q").pack
_I = struct.Struct("<I").pack
_FLAGS = b"\x85\x01" + _I(0x100)  # Span.flags (16, fixed32): SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK, no parent
_KV: dict[str, dict[Any, bytes]] = {}  # key -> value (str) or (type, value) -> the Span.attributes field
_KV_MAX = 1024  # keys


def _varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF  # int64 two's complement, as protobuf writes negative numbers
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [_varint(i) for i in range(1 << 14)]  # the varints of 2 bytes or less, written once


def _field(num: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _any_value(v: Any) -> bytes:
    if isinstance(v, str):
        return _field(1, v.encode("utf-8", "replace"))
    if isinstance(v, bool):
        return b"\x10" + (b"\x01" if v else b"\x00")
    if isinstance(v, int):
        return b"\x18" + _varint(v)
    if isinstance(v, float):
        return b"\x21" + _D(v)
    if isinstance(v, list | tuple):
        return _field(5, b"".join(_field(1, _any_value(x)) for x in v))
    return _field(1, str(v).encode("utf-8", "replace"))


def _kv(num: int, k: str, v: Any) -> bytes:
    """Field ``num`` holding the KeyValue ``k``: ``v``."""
    return _field(num, _field(1, k.encode("utf-8", "replace")) + _field(2, _any_value(v)))


_KEYS: dict[str, bytes] = {}  # attribute key -> its KeyValue.key field, encoded


def _key(k: str) -> bytes:
    kb = _field(1, k.encode("utf-8", "replace"))
    if len(_KEYS) >= _KV_MAX:
        _KEYS.clear()
    _KEYS[k] = kb
    return kb


def _attr(k: str, v: Any, t: type) -> bytes:
    """The Span.attributes field for ``k``: ``v``. Strings and lists repeat across spans (models,
    hosts, processes) and are kept, per key; numbers (tokens, ids, times) mostly do not and are
    written directly."""
    if t is int and -1 < v < 16384:
        av = b"\x18" + _SMALL[v]
    elif t is float:
        av = b"\x21" + _D(v)
    elif t is bool:
        av = b"\x10\x01" if v else b"\x10\x00"
    elif t is int:
        av = b"\x18" + _varint(v)
    else:
        vk = v if t is str else (t, tuple(v) if t is list else v)
        by_value = _KV.get(k)
        if by_value is None:
            if len(_KV) >= _KV_MAX:
                _KV.clear()
            by_value = _KV[k] = {}
        b = by_value.get(vk)
        if b is None:
            b = _kv(9, k, v)
            if len(by_value) >= 4096:  # a key whose values do not repeat: start its cache over
                by_value.clear()
            by_value[vk] = b
        return b
    body = (_KEYS.get(k) or _key(k)) + b"\x12" + _SMALL[len(av)] + av
    n = len(body)
    return b"\x4a" + (_SMALL[n] if n < 16384 else _varint(n)) + body


def _attrs(attrs: Any) -> list[bytes]:
    """The Span.attributes fields of ``attrs``."""
    out = []
    kv = _KV
    for k, v in attrs.items():
        t = type(v)
        if t is str:
            d = kv.get(k)
            b = d.get(v) if d is not None else None
            out.append(b if b is not None else _attr(k, v, t))
        else:
            out.append(_attr(k, v, t))
    return out


def _span(s: Any) -> bytes:
    ctx = s.context
    parts = [b"\x0a\x10", ctx.trace_id.to_bytes(16, "big"), b"\x12\x08", ctx.span_id.to_bytes(8, "big"),
             _field(5, s.name.encode("utf-8", "replace")), b"\x30", _varint(s.kind.value + 1),
             b"\x39", _Q(s.start_time), b"\x41", _Q(s.end_time)]
    raw = getattr(s, "_attributes", None)  # ReadableSpan.attributes is a read-only view of it
    if type(raw) is SpanAttrs and raw.parts is not None:
        for part in raw.parts:
            if type(part) is Group:
                w = part.wire
                if w is None:
                    w = part.wire = b"".join(_attrs(part))  # once per group (a race writes the same)
                parts.append(w)
            else:
                parts.extend(_attrs(part))
    else:
        parts.extend(_attrs(s.attributes or {}))
    code = s.status.status_code.value
    parts.append(b"\x7a\x02\x18" + bytes((code,)) if code else b"\x7a\x00")
    parts.append(_FLAGS)
    return _field(2, b"".join(parts))


def _resource(resource: Any) -> bytes:
    return _field(1, b"".join(_kv(1, k, v) for k, v in resource.attributes.items()))


def _scope(scope: Any) -> bytes:
    body = _field(1, scope.name.encode()) + (_field(2, scope.version.encode()) if scope.version else b"")
    return _field(1, body)


_CACHE: dict[int, tuple[Any, bytes]] = {}  # id(resource) -> (it, its encoding): one per sink, bounded


def encode_spans(spans: Sequence[Any]) -> bytes:
    """An ``ExportTraceServiceRequest`` of ``spans`` (SDK ``ReadableSpan``s), serialized."""
    groups: dict[tuple[int, int], list[Any]] = {}
    heads: dict[tuple[int, int], tuple[Any, Any]] = {}
    for s in spans:
        key = (id(s.resource), id(s.instrumentation_scope))
        groups.setdefault(key, []).append(s)
        heads[key] = (s.resource, s.instrumentation_scope)
    out = []
    for key, group in groups.items():
        res, scope = heads[key]
        hit = _CACHE.get(id(res))
        if hit is not None and hit[0] is res:
            rb = hit[1]
        else:
            rb = _resource(res)
            if len(_CACHE) < 64:
                _CACHE[id(res)] = (res, rb)  # the reference keeps the id from being reused
        sb = _scope(scope)
        scope_spans = sb + b"".join(_span(s) for s in group)
        if scope.schema_url:
            scope_spans += _field(3, scope.schema_url.encode())
        rs = rb + _field(2, scope_spans)
        if res.schema_url:
            rs += _field(3, res.schema_url.encode())
        out.append(_field(1, rs))
    return b"".join(out)

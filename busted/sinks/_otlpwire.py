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

__all__ = ["encode_spans"]

_D = struct.Struct("<d").pack
_Q = struct.Struct("<Q").pack
_I = struct.Struct("<I").pack
_FLAGS = b"\x85\x01" + _I(0x100)  # Span.flags (16, fixed32): SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK, no parent
_KV: dict[tuple[str, type, Any], bytes] = {}  # (key, type, value) -> the Span.attributes field, encoded
_KV_MAX = 1 << 16


def _varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF  # int64 two's complement, as protobuf writes negative numbers
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


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
    key = (k, type(v), tuple(v) if isinstance(v, list) else v)
    b = _KV.get(key) if num == 9 else None
    if b is None:
        b = _field(num, _field(1, k.encode("utf-8", "replace")) + _field(2, _any_value(v)))
        if num == 9 and len(_KV) < _KV_MAX:
            _KV[key] = b
    return b


def _span(s: Any) -> bytes:
    ctx = s.context
    attrs = s.attributes or {}
    kv = _KV
    parts = [b"\x0a\x10", ctx.trace_id.to_bytes(16, "big"), b"\x12\x08", ctx.span_id.to_bytes(8, "big"),
             _field(5, s.name.encode("utf-8", "replace")), b"\x30", _varint(s.kind.value + 1),
             b"\x39", _Q(s.start_time), b"\x41", _Q(s.end_time)]
    for k, v in attrs.items():
        b = kv.get((k, type(v), tuple(v) if type(v) is list else v))
        parts.append(b if b is not None else _kv(9, k, v))
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

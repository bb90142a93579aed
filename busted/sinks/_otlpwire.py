"""OTLP trace requests written straight to protobuf wire bytes, for ``busted.sinks.otlp``.

Why: the official path (an attribute dict per span, a ``ReadableSpan``, then
``opentelemetry-exporter-otlp-proto-common`` building one protobuf object per attribute) cost
~100 us a span of ~30 attributes here, more than everything else an exported call costs. busted's
spans repeat most attribute pairs (process, model, host, provider): each ``KeyValue`` is encoded
once and kept (bounded), and the sink writes each span's ``Span`` message in ``write()`` from the
event itself (``WireSpan``: its bytes, nothing else), so a batch is a join of bytes
(``encode_request``). The request is the same message the official encoder builds:
tests/unit/test_sinks_otlp.py parses ours with opentelemetry-proto and compares it with the
official encoder's for the same spans. Sending (HTTP retries, gRPC channel, headers, compression)
stays the official exporters'. Only what busted puts in a span is handled: str, bool, int, float
and lists of them.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Sequence
from typing import Any

__all__ = ["Head", "WireSpan", "attrs", "encode_request", "float_attr", "int_attr", "key_field", "name_kind",
           "once_attr", "span", "status_flags", "str_attr"]


_D = struct.Struct("<d").pack
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
_MORE = [bytes(((i & 0x7F) | 0x80, (i >> 7) | 0x80)) for i in range(1 << 14)]  # 14 bits, more to come


def _uvarint(n: int) -> bytes:
    """``_varint`` of a non-negative ``n``, 14 bits a step (flow ids are 48-bit: 4 steps, not 7)."""
    if n < 16384:
        return _SMALL[n]
    out = []
    while n >= 16384:
        out.append(_MORE[n & 0x3FFF])
        n >>= 14
    out.append(_SMALL[n])
    return b"".join(out)


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
    av: bytes  # (``_SMALL[v]`` with ``v: Any`` would make it Any: the list's __getitem__ is overloaded)
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




def attrs(a: Any) -> bytes:
    """The Span.attributes fields of the dict ``a``, joined."""
    return b"".join(_attrs(a))


def str_attr(k: str, v: str) -> bytes:
    """One string attribute (kept per key and value: a host, a model repeats)."""
    d = _KV.get(k)
    b = d.get(v) if d is not None else None
    return b if b is not None else _attr(k, v, str)


def once_attr(kb: bytes, v: str) -> bytes:
    """A string attribute whose value does not repeat (a response id, captured content): written,
    not kept (``kb`` from ``key_field``)."""
    vb = v.encode("utf-8", "replace")
    n = len(vb)
    av = b"\x0a" + (_SMALL[n] if n < 16384 else _varint(n)) + vb
    n = len(av)
    body = b"".join((kb, b"\x12", _SMALL[n] if n < 16384 else _varint(n), av))
    n = len(body)
    return b"\x4a" + (_SMALL[n] if n < 16384 else _varint(n)) + body


def key_field(k: str) -> bytes:
    """The KeyValue.key field of ``k``: what ``int_attr``/``float_attr`` take, computed once per key."""
    kb = _field(1, k.encode("utf-8", "replace"))
    if len(kb) > 100:
        raise ValueError("attribute key too long for the one-byte lengths below")
    return kb


_INTS: dict[bytes, dict[int, bytes]] = {}  # key field -> small value -> its attribute field (token counts repeat)


def int_attr(kb: bytes, v: int) -> bytes:
    """The Span.attributes field ``key``: int ``v`` (``kb`` from ``key_field``)."""
    d = _INTS.get(kb)
    if d is not None:
        b = d.get(v)
        if b is not None:
            return b
    iv = _uvarint(v) if 0 <= v < 1 << 63 else _varint(v)  # int64 on the wire, as the official encoder
    n = len(iv) + 1
    b = b"\x4a" + _SMALL[len(kb) + n + 2] + kb + b"\x12" + _SMALL[n] + b"\x18" + iv
    if 0 <= v < 4096:
        if d is None:
            if len(_INTS) >= 64:
                _INTS.clear()
            d = _INTS[kb] = {}
        d[v] = b  # at most 4096 a key, 64 keys
    return b


def float_attr(kb: bytes, v: float) -> bytes:
    """The Span.attributes field ``key``: double ``v`` (``kb`` from ``key_field``)."""
    return b"\x4a" + _SMALL[len(kb) + 11] + kb + b"\x12\x09\x21" + _D(v)


def name_kind(name: str, kind: int) -> bytes:
    """Span.name and Span.kind (``kind``: opentelemetry.trace.SpanKind's value; the wire's is +1)."""
    return _field(5, name.encode("utf-8", "replace")) + b"\x30" + _varint(kind + 1)


def status_flags(error: bool) -> bytes:
    """Span.status (ERROR or UNSET) and Span.flags."""
    return (b"\x7a\x02\x18\x02" if error else b"\x7a\x00") + _FLAGS


_TIMES = struct.Struct("<BQBQ").pack  # Span.start_time_unix_nano (7) and end (8), fixed64
# Span and trace ids: a generator of our own (the application's seeded `random` sequence is not
# disturbed), seeded from the OS, and again in a forked child (which would otherwise repeat ours).
_rng = random.Random()
os.register_at_fork(after_in_child=_rng.seed)
_randbytes = _rng.randbytes
_Z16, _Z8 = bytes(16), bytes(8)


def span(head: bytes, start: int, end: int, parts: list[bytes], tail: bytes) -> bytes:
    """A ScopeSpans.spans field: random trace and span ids (never all zero, as the SDK's
    generator), ``head`` (``name_kind``), the times, the attribute ``parts``, ``tail``
    (``status_flags``)."""
    ids = _randbytes(24)
    while ids[:16] == _Z16 or ids[16:] == _Z8:
        ids = _randbytes(24)
    body = b"".join((b"\x0a\x10", ids[:16], b"\x12\x08", ids[16:], head, _TIMES(0x39, start, 0x41, end), *parts,
                     tail))
    n = len(body)
    return b"\x12" + (_SMALL[n] if n < 16384 else _varint(n)) + body


class _Flags:
    sampled = True


class _Context:
    trace_flags = _Flags()


class Head:
    """The resource and the instrumentation scope of a sink's spans, encoded once."""

    __slots__ = ("resource", "scope", "scope_schema", "resource_schema")

    def __init__(self, resource: Any, scope: Any) -> None:
        self.resource = _field(1, b"".join(_kv(1, k, v) for k, v in resource.attributes.items()))
        body = _field(1, scope.name.encode()) + (_field(2, scope.version.encode()) if scope.version else b"")
        self.scope = _field(1, body)
        self.scope_schema = _field(3, scope.schema_url.encode()) if scope.schema_url else b""
        self.resource_schema = _field(3, resource.schema_url.encode()) if resource.schema_url else b""


class WireSpan:
    """A finished span as the batch processor carries it: its ScopeSpans.spans field (``wire``) and
    the ``Head`` it belongs under. ``context`` says "sampled", all a span processor reads."""

    __slots__ = ("wire", "head")
    context = _Context()

    def __init__(self, wire: bytes, head: Head) -> None:
        self.wire = wire
        self.head = head


def encode_request(spans: Sequence[WireSpan]) -> bytes:
    """An ``ExportTraceServiceRequest`` of ``spans``, serialized. One join: the enclosing messages'
    lengths are summed, not measured on copies (a batch is ~0.6 MB; each copy of it costs more
    than the join)."""
    groups: dict[int, tuple[Head, list[bytes]]] = {}
    for s in spans:
        g = groups.get(id(s.head))
        if g is None:
            g = groups[id(s.head)] = (s.head, [])
        g[1].append(s.wire)
    out: list[bytes] = []
    for head, wires in groups.values():
        ss_len = len(head.scope) + sum(map(len, wires)) + len(head.scope_schema)
        ss_len_b = _uvarint(ss_len)
        rs_len = len(head.resource) + 1 + len(ss_len_b) + ss_len + len(head.resource_schema)
        out += (b"\x0a", _uvarint(rs_len), head.resource, b"\x12", ss_len_b, head.scope, *wires, head.scope_schema,
                head.resource_schema)
    return b"".join(out)

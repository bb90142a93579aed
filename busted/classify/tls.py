"""A sans-I/O TLS ClientHello parser: SNI, ALPN, offered versions and the JA4 fingerprint.

Feed it the bytes a client wrote, in any split; it answers ``NEED_MORE`` until the handshake
message is whole (it may span several writes and several TLS records: post-quantum key shares
make hellos ~1.5-2 KB), then a ``ClientHelloInfo``, or ``NotTls`` with a reason. It never raises
on input and never buffers more than ``MAX_BUFFER`` bytes.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from functools import lru_cache

from busted.classify.names import normalize_name

__all__ = ["MAX_BUFFER", "NEED_MORE", "ClientHelloInfo", "ClientHelloParser", "NeedMore", "NotTls",
           "ja4", "parse_client_hello"]

MAX_BUFFER = 16384

_VERSIONS = {0x0304: "TLS1.3", 0x0303: "TLS1.2", 0x0302: "TLS1.1", 0x0301: "TLS1.0", 0x0300: "SSL3.0"}
_PARSED_EXTS = frozenset({0x0000, 0x0010, 0x000D, 0x002B})  # SNI, ALPN, signature algorithms, versions
_JA4_VER = {0x0304: "13", 0x0303: "12", 0x0302: "11", 0x0301: "10", 0x0300: "s3", 0x0002: "s2"}


def is_grease(v: int) -> bool:
    """RFC 8701 GREASE values (0x0a0a, 0x1a1a, ... 0xfafa): ignored by fingerprints."""
    return (v & 0x0F0F) == 0x0A0A and (v >> 8) == (v & 0xFF)


class NeedMore:
    """The hello is not whole yet: feed more bytes."""

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE = NeedMore()


@dataclass(frozen=True)
class NotTls:
    """The bytes are not (or no longer can be) a TLS ClientHello."""

    reason: str


@dataclass(frozen=True)
class ClientHelloInfo:
    sni: str | None
    alpn: tuple[str, ...]
    versions: tuple[str, ...]  # offered, best first ("TLS1.3", "TLS1.2"); from legacy_version if absent
    legacy_version: int
    cipher_suites: tuple[int, ...]
    extensions: tuple[int, ...]  # ids in wire order
    signature_algorithms: tuple[int, ...]
    supported_versions: tuple[int, ...]
    ja4: str


class _Reader:
    __slots__ = ("b", "i", "end")

    def __init__(self, b: bytes, start: int = 0, end: int | None = None) -> None:
        self.b, self.i, self.end = b, start, len(b) if end is None else end

    def take(self, n: int) -> bytes:
        if n < 0 or self.i + n > self.end:
            raise ValueError("truncated")
        v = self.b[self.i : self.i + n]
        self.i += n
        return v

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        v = self.take(2)
        return (v[0] << 8) | v[1]

    def vec(self, lenbytes: int) -> _Reader:
        n = int.from_bytes(self.take(lenbytes), "big")
        start = self.i
        self.take(n)
        return _Reader(self.b, start, start + n)

    def left(self) -> int:
        return self.end - self.i


def _u16s(r: _Reader) -> tuple[int, ...]:
    n = r.left()
    if n % 2:
        raise ValueError("odd list length")
    # One unpack for the whole list: hellos carry ~70 of these numbers, and this runs per connection.
    v = struct.unpack_from(f">{n // 2}H", r.b, r.i)
    r.i = r.end
    return v


def parse_client_hello(body: bytes) -> ClientHelloInfo:
    """Parse a ClientHello handshake body (after the 4-byte handshake header). Raises ValueError."""
    r = _Reader(body)
    legacy = r.u16()
    r.take(32)  # random
    r.vec(1)  # session id
    ciphers = _u16s(r.vec(2))
    r.vec(1)  # compression methods
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    sigalgs: tuple[int, ...] = ()
    supported: tuple[int, ...] = ()
    exts: list[int] = []
    if r.left():
        er = r.vec(2)
        b, i, end = er.b, er.i, er.end
        while i < end:  # indexes, not reader calls: ~20 extensions per hello, one hello per connection
            if i + 4 > end:
                raise ValueError("truncated")
            etype = (b[i] << 8) | b[i + 1]
            n = (b[i + 2] << 8) | b[i + 3]
            i += 4
            if i + n > end:
                raise ValueError("truncated")
            exts.append(etype)
            if etype not in _PARSED_EXTS:
                i += n
                continue
            data = _Reader(b, i, i + n)
            i += n
            if etype == 0x0000:  # server_name
                lst = data.vec(2)
                while lst.left():
                    kind = lst.u8()
                    name = lst.vec(2)
                    if kind == 0 and sni is None:
                        sni = normalize_name(name.take(name.left()).decode("ascii", "replace"))
            elif etype == 0x0010:  # ALPN
                lst = data.vec(2)
                protos = []
                while lst.left():
                    p = lst.vec(1)
                    protos.append(p.take(p.left()).decode("ascii", "replace"))
                alpn = tuple(protos)
            elif etype == 0x000D:  # signature_algorithms
                sigalgs = _u16s(data.vec(2))
            elif etype == 0x002B:  # supported_versions (client form: 1-byte length)
                supported = _u16s(data.vec(1))
    offered = [v for v in supported if not is_grease(v)]
    versions = tuple(_VERSIONS.get(v, f"0x{v:04x}") for v in sorted(offered, reverse=True))
    if not versions:
        versions = (_VERSIONS.get(legacy, f"0x{legacy:04x}"),)
    info = ClientHelloInfo(sni, alpn, versions, legacy, ciphers, tuple(exts), sigalgs, supported, "")
    return ClientHelloInfo(**{**info.__dict__, "ja4": ja4(info)})


def _hash12(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:12] if s else "000000000000"


def ja4(h: ClientHelloInfo, transport: str = "t") -> str:
    """The JA4 TLS client fingerprint (FoxIO spec), e.g. ``t13d1516h2_8daaf6152771_e5627efa2ab1``."""
    return _ja4(h.supported_versions, h.legacy_version, h.cipher_suites, h.extensions,
                h.alpn[0] if h.alpn else "", bool(h.sni), h.signature_algorithms, transport)


@lru_cache(maxsize=1024)  # a client stack sends the same hello shape over and over
def _ja4(supported_versions: tuple[int, ...], legacy_version: int, cipher_suites: tuple[int, ...],
         extensions: tuple[int, ...], alpn0: str, has_sni: bool, signature_algorithms: tuple[int, ...],
         transport: str) -> str:
    vers = [v for v in supported_versions if not is_grease(v)]
    ver = _JA4_VER.get(max(vers) if vers else legacy_version, "00")
    ciphers = [c for c in cipher_suites if not is_grease(c)]
    exts = [e for e in extensions if not is_grease(e)]
    if alpn0:
        a = alpn0
        if a[0].isascii() and a[0].isalnum() and a[-1].isascii() and a[-1].isalnum():
            alpn = a[0] + a[-1]
        else:
            hx = a.encode("ascii", "replace").hex()
            alpn = hx[0] + hx[-1]
    else:
        alpn = "00"
    part_a = f"{transport}{ver}{'d' if has_sni else 'i'}{min(len(ciphers), 99):02d}{min(len(exts), 99):02d}{alpn}"
    part_b = _hash12(",".join(f"{c:04x}" for c in sorted(ciphers)))
    ext_str = ",".join(f"{e:04x}" for e in sorted(e for e in exts if e not in (0x0000, 0x0010)))
    sig = [s for s in signature_algorithms if not is_grease(s)]
    if ext_str and sig:
        ext_str += "_" + ",".join(f"{s:04x}" for s in sig)
    return f"{part_a}_{part_b}_{_hash12(ext_str)}"


class ClientHelloParser:
    """Feed client bytes; get ``NEED_MORE``, a ``ClientHelloInfo`` or ``NotTls``. Results are final:
    once an answer other than NEED_MORE is given, later feeds return the same answer."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._result: ClientHelloInfo | NotTls | None = None

    def feed(self, data: bytes) -> ClientHelloInfo | NeedMore | NotTls:
        if self._result is not None:
            return self._result
        if len(self._buf) + len(data) > MAX_BUFFER:
            data = data[: MAX_BUFFER - len(self._buf)]
        self._buf += data
        res = self._try()
        if res is NEED_MORE and len(self._buf) >= MAX_BUFFER:
            res = NotTls(f"no complete ClientHello within {MAX_BUFFER} bytes")
        if res is not NEED_MORE:
            self._result = res  # type: ignore[assignment]
            self._buf = bytearray()
        return res

    def _try(self) -> ClientHelloInfo | NeedMore | NotTls:
        b = self._buf
        # Reassemble the handshake stream from consecutive handshake records.
        hs = bytearray()
        i = 0
        while True:
            if len(b) - i < 5:
                break
            ctype, major, length = b[i], b[i + 1], (b[i + 3] << 8) | b[i + 4]
            if ctype != 0x16:
                if i == 0:
                    return NotTls("not a TLS handshake record")
                return NotTls("handshake interrupted by another record type")
            if major != 3:
                return NotTls(f"unexpected record version {major}.{b[i + 2]}")
            if length == 0 or length > 16384 + 2048:
                return NotTls("bad record length")
            if len(b) - i - 5 < length:
                hs += b[i + 5 :]
                break
            hs += b[i + 5 : i + 5 + length]
            i += 5 + length
            if len(hs) >= 4 and len(hs) >= 4 + int.from_bytes(hs[1:4], "big"):
                break
        if i == 0 and len(b) >= 1 and b[0] != 0x16:
            return NotTls("not a TLS handshake record")
        if len(hs) >= 1 and hs[0] != 0x01:
            return NotTls("first handshake message is not a ClientHello")
        if len(hs) < 4:
            return NEED_MORE
        n = int.from_bytes(hs[1:4], "big")
        if n > MAX_BUFFER:
            return NotTls("ClientHello larger than the capture bound")
        if len(hs) < 4 + n:
            return NEED_MORE
        try:
            return parse_client_hello(bytes(hs[4 : 4 + n]))
        except (ValueError, IndexError) as exc:
            return NotTls(f"malformed ClientHello: {exc}")

"""DNS wire parsing (dnspython) and a sans-I/O framer for DNS over TCP."""

from __future__ import annotations

from dataclasses import dataclass

import dns.exception
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
from dns.rdtypes.ANY.CNAME import CNAME
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

from busted.classify.names import normalize_name
from busted.events import DnsRecord

__all__ = ["DnsInfo", "TcpDnsFramer", "parse_dns"]

# rdata type -> (label, the dnspython class its rdata must be). Records of another class than IN
# (ANY, NONE, CH...) decode as GenericRdata without .address/.target: they are skipped, not fatal.
_KEEP: dict[int, tuple[str, type[A | AAAA | CNAME]]] = {
    dns.rdatatype.A: ("A", A), dns.rdatatype.AAAA: ("AAAA", AAAA), dns.rdatatype.CNAME: ("CNAME", CNAME)}
# What a dnspython bug or an unforeseen record shape could raise while reading a decoded message.
_EXTRACT_ERRORS = (AttributeError, ValueError, TypeError, KeyError, IndexError, UnicodeError,
                   dns.exception.DNSException)


def _name(n: object) -> str:
    return normalize_name(str(n))


@dataclass(frozen=True)
class DnsInfo:
    id: int
    is_response: bool
    qname: str
    qtype: str
    rcode: str
    records: tuple[DnsRecord, ...]
    cname_chain: tuple[str, ...]  # qname, then each alias followed, in order
    addresses: tuple[str, ...]  # A/AAAA values held by the end of the chain


def parse_dns(wire: bytes) -> DnsInfo | None:
    """Parse one DNS message; None if it is not one (malformed, truncated, no question).

    Answer records that are not class IN, or not A/AAAA/CNAME, are skipped; the others are kept.
    Never raises."""
    try:
        msg = dns.message.from_wire(wire, ignore_trailing=True, one_rr_per_rrset=True)
    except (dns.exception.DNSException, ValueError, IndexError, UnicodeError, KeyError, TypeError):
        return None
    except Exception:  # dnspython raises assorted types on hostile input; none may escape
        return None
    try:
        return _extract(msg)
    except _EXTRACT_ERRORS:  # never out of the monitor: a message we cannot read is "not DNS"
        return None


def _extract(msg: dns.message.Message) -> DnsInfo | None:
    if not msg.question:
        return None
    q = msg.question[0]
    qname = _name(q.name)
    records: list[DnsRecord] = []
    cnames: dict[str, str] = {}
    addrs: dict[str, list[str]] = {}
    for rrset in msg.answer:
        keep = _KEEP.get(rrset.rdtype)
        if keep is None or rrset.rdclass != dns.rdataclass.IN:
            continue
        rtype, cls = keep
        owner = _name(rrset.name)
        for rd in rrset:
            if not isinstance(rd, cls):
                continue
            value = _name(rd.target) if isinstance(rd, CNAME) else rd.address
            records.append(DnsRecord(owner, rtype, value, int(rrset.ttl)))
            if rtype == "CNAME":
                cnames.setdefault(owner, value)
            else:
                addrs.setdefault(owner, []).append(value)
    # Follow the chain from the question, whatever order the answer lists it in; stop on loops.
    chain = [qname]
    seen = {qname}
    while chain[-1] in cnames and cnames[chain[-1]] not in seen and len(chain) < 16:
        nxt = cnames[chain[-1]]
        chain.append(nxt)
        seen.add(nxt)
    return DnsInfo(
        id=msg.id,
        is_response=bool(msg.flags & 0x8000),
        qname=qname,
        qtype=dns.rdatatype.to_text(q.rdtype),
        rcode=dns.rcode.to_text(msg.rcode()),
        records=tuple(records),
        cname_chain=tuple(chain),
        addresses=tuple(addrs.get(chain[-1], ())),
    )


class TcpDnsFramer:
    """DNS over TCP: 2-byte big-endian length, then the message. ``feed`` returns whole messages.

    Bounded: at most one maximal message (65,535 bytes) plus its prefix is ever buffered.
    """

    MAX = 65535 + 2

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip = 0  # bytes still to come of a message whose middle was lost
        self.lost = False  # framing lost for good (bytes we never saw held a length prefix)

    def feed(self, data: bytes, missing: int = 0) -> list[bytes]:
        """Whole messages completed by ``data``. ``missing`` > 0 says that many bytes followed
        ``data`` on the wire but were not captured (a truncated copy): the message they fall in
        is dropped and framing continues after it; if they reach past it (or hold a length
        prefix), the stream cannot be followed and later feeds return nothing (``lost`` is set)."""
        if self.lost:
            return []
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= 2:
            n = (self._buf[0] << 8) | self._buf[1]
            if n == 0:  # no DNS message is empty: garbage, resynchronising is hopeless
                self._buf.clear()
                break
            if len(self._buf) < 2 + n:
                break
            out.append(bytes(self._buf[2 : 2 + n]))
            del self._buf[: 2 + n]
        if len(self._buf) > self.MAX:  # cannot happen with a valid prefix; keep the bound anyway
            self._buf.clear()
        if missing > 0:
            rest = 2 + ((self._buf[0] << 8) | self._buf[1]) - len(self._buf) if len(self._buf) >= 2 else 0
            if 0 < missing <= rest:
                self._skip = rest - missing
            else:
                self.lost = True
            self._buf.clear()
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)

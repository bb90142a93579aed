"""The lab's authoritative DNS server: UDP and TCP, A/AAAA/CNAME chains, NXDOMAIN for the rest.

Run as ``python -m busted.lab.dns_server --config <json>`` inside the servers netns. The config::

    {"listen": [["10.231.7.53", 53], ["fd6c:6162:7:100::53", 53]],
     "ttl": 60,
     "max_seconds": 3600,
     "records": {"api.openai.com.": {"A": ["10.231.7.65"], "AAAA": ["fd6c:..."]},
                 "x.openai.azure.com.": {"CNAME": "x.privatelink.openai.azure.com."}}}

Every name it knows is answered authoritatively with the configured TTL; a CNAME chain is followed
(at most 8 links) and every link put in the answer section, as a real resolver would see it. A name
it does not know is NXDOMAIN; a known name without the asked type is NOERROR with no answer (NODATA).
SIGHUP re-reads the records; SIGTERM (or ``max_seconds``) stops it. One JSON line per query goes
to stdout; the first line is ``READY`` once every socket is bound.
"""

from __future__ import annotations

import argparse
import json
import selectors
import signal
import socket
import sys
import threading
import time

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

MAX_CNAME_CHAIN = 8
MAX_TCP_THREADS = 32
MAX_TCP_MESSAGES = 64
TCP_IDLE_SECONDS = 3.0


class Zone:
    def __init__(self, records: dict[str, dict], ttl: int) -> None:
        self.ttl = ttl
        self.records: dict[str, dict] = {}
        for name, rr in records.items():
            key = name.lower()
            if not key.endswith("."):
                key += "."
            self.records[key] = rr

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        resp = dns.message.make_response(query)
        resp.flags |= dns.flags.AA | dns.flags.RA
        if query.opcode() != dns.opcode.QUERY:
            resp.set_rcode(dns.rcode.NOTIMP)
            return resp
        if len(query.question) != 1:
            resp.set_rcode(dns.rcode.FORMERR)
            return resp
        q = query.question[0]
        if q.rdclass != dns.rdataclass.IN:
            resp.set_rcode(dns.rcode.REFUSED)
            return resp
        name = q.name
        for _ in range(MAX_CNAME_CHAIN + 1):
            entry = self.records.get(name.to_text().lower())
            if entry is None:
                resp.set_rcode(dns.rcode.NXDOMAIN)
                return resp
            cname = entry.get("CNAME")
            if cname and q.rdtype not in (dns.rdatatype.CNAME,):
                target = dns.name.from_text(cname)
                resp.answer.append(self._rrset(name, "CNAME", [target.to_text()]))
                name = target
                continue
            types = ["A", "AAAA", "CNAME"] if q.rdtype == dns.rdatatype.ANY else [
                dns.rdatatype.to_text(q.rdtype)
            ]
            for t in types:
                values = entry.get(t)
                if values:
                    resp.answer.append(self._rrset(name, t, [values] if isinstance(values, str) else values))
            return resp
        resp.set_rcode(dns.rcode.SERVFAIL)  # CNAME chain too long (a loop in the config)
        return resp

    def _rrset(self, name: dns.name.Name, rtype: str, values: list[str]) -> dns.rrset.RRset:
        rrset = dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.from_text(rtype))
        for v in values:
            rrset.add(dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rtype), v), self.ttl)
        return rrset


class Server:
    def __init__(self, config_path: str) -> None:
        self.config_path = config_path
        self.config = self._load()
        self.zone = Zone(self.config["records"], int(self.config.get("ttl", 60)))
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.out_lock = threading.Lock()
        self.tcp_threads: set[threading.Thread] = set()

    def _load(self) -> dict:
        with open(self.config_path, encoding="utf-8") as fh:
            return json.load(fh)

    def log(self, **kw: object) -> None:
        with self.out_lock:
            sys.stdout.write(json.dumps(kw, sort_keys=True) + "\n")
            sys.stdout.flush()

    def handle(self, wire: bytes, peer: tuple, proto: str) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception as exc:  # malformed: answer FORMERR if the header at least parses
            self.log(proto=proto, peer=str(peer[0]), error=type(exc).__name__)
            if len(wire) >= 12:
                err = bytearray(wire[:12])
                err[2] = (err[2] | 0x80) & 0xF9  # QR=1, keep opcode/RD, clear AA/TC
                err[3] = (err[3] & 0xF0) | dns.rcode.FORMERR
                err[4:12] = b"\x00" * 8
                return bytes(err)
            return None
        resp = self.zone.answer(query)
        q = query.question[0] if query.question else None
        self.log(
            proto=proto,
            peer=str(peer[0]),
            qname=q.name.to_text() if q else None,
            qtype=dns.rdatatype.to_text(q.rdtype) if q else None,
            rcode=dns.rcode.to_text(resp.rcode()),
            answers=[rr.to_text() for rr in resp.answer],
        )
        max_size = 65535 if proto == "tcp" else max(512, query.payload if query.edns >= 0 else 512)
        return resp.to_wire(max_size=max_size)

    def serve_tcp(self, conn: socket.socket, peer: tuple) -> None:
        try:
            conn.settimeout(TCP_IDLE_SECONDS)
            for _ in range(MAX_TCP_MESSAGES):
                head = _recv_exact(conn, 2)
                if head is None:
                    return
                body = _recv_exact(conn, int.from_bytes(head, "big"))
                if body is None:
                    return
                out = self.handle(body, peer, "tcp")
                if out is None:
                    return
                conn.sendall(len(out).to_bytes(2, "big") + out)
        except OSError:
            pass
        finally:
            conn.close()

    def bind(self) -> list[tuple[str, str, int]]:
        """Bind every configured address (UDP and TCP); returns (proto, host, port) per socket.

        Port 0 binds an ephemeral port, different for UDP and TCP (tests query each on its own).
        """
        self._sel = selectors.DefaultSelector()
        self._socks: list[socket.socket] = []
        bound = []
        for host, port in self.config["listen"]:
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            u = socket.socket(fam, socket.SOCK_DGRAM)
            u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            u.bind((host, port))
            t = socket.socket(fam, socket.SOCK_STREAM)
            t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            t.bind((host, port))
            t.listen(64)
            for s, proto in ((u, "udp"), (t, "tcp")):
                s.setblocking(False)
                self._sel.register(s, selectors.EVENT_READ)
                self._socks.append(s)
                bound.append((proto, host, s.getsockname()[1]))
        return bound

    def run(self) -> None:
        self.bind()
        print("READY", flush=True)
        self.serve()

    def serve(self) -> None:
        """Answer until ``stop`` is set or ``max_seconds`` pass (checked every 0.5 s), then close."""
        sel, socks = self._sel, self._socks
        deadline = time.monotonic() + float(self.config.get("max_seconds", 3600))
        while not self.stop.is_set() and time.monotonic() < deadline:
            if self.reload.is_set():
                self.reload.clear()
                try:
                    cfg = self._load()
                    self.zone = Zone(cfg["records"], int(cfg.get("ttl", 60)))
                    self.log(event="reloaded", names=len(self.zone.records))
                except (OSError, ValueError, KeyError) as exc:
                    self.log(event="reload-failed", error=str(exc))
            for key, _ in sel.select(timeout=0.5):
                s: socket.socket = key.fileobj  # type: ignore[assignment]
                if s.type == socket.SOCK_DGRAM:
                    try:
                        wire, peer = s.recvfrom(65535)
                    except OSError:
                        continue
                    out = self.handle(wire, peer, "udp")
                    if out is not None:
                        try:
                            s.sendto(out, peer)
                        except OSError:
                            pass
                else:
                    try:
                        conn, peer = s.accept()
                    except OSError:
                        continue
                    self.tcp_threads = {th for th in self.tcp_threads if th.is_alive()}
                    if len(self.tcp_threads) >= MAX_TCP_THREADS:
                        conn.close()
                        continue
                    conn.setblocking(True)
                    th = threading.Thread(target=self.serve_tcp, args=(conn, peer), daemon=True)
                    th.start()
                    self.tcp_threads.add(th)
        for s in socks:
            s.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    args = ap.parse_args(argv)
    server = Server(args.config)
    signal.signal(signal.SIGTERM, lambda *_: server.stop.set())
    signal.signal(signal.SIGINT, lambda *_: server.stop.set())
    signal.signal(signal.SIGHUP, lambda *_: server.reload.set())
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

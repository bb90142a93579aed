"""A byte-exact TCP sink: read everything until the client's FIN, then send exactly M bytes, close.

Run as ``python -m busted.lab.tcp_sink --port P --reply-bytes M`` inside the servers netns. It
listens on ``[::]:P`` (dual stack, so every lab IPv4 and IPv6 address), serves connections one at a
time, and for each prints one JSON line ``{"peer", "port", "received", "sent"}`` to stdout once the
connection is closed; the first line is ``READY``. The reply is ``M`` bytes of the repeating
pattern ``b"0123456789"`` so a test can check both the count and the content.

Bounded: each connection may idle at most ``--idle`` seconds, the sink lives at most
``--max-seconds`` and serves at most ``--max-conns`` connections.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import time

PATTERN = b"0123456789"


def reply_payload(n: int) -> bytes:
    return (PATTERN * (n // len(PATTERN) + 1))[:n]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--reply-bytes", type=int, default=0)
    ap.add_argument("--idle", type=float, default=10.0)
    ap.add_argument("--max-seconds", type=float, default=3600.0)
    ap.add_argument("--max-conns", type=int, default=10_000)
    args = ap.parse_args(argv)

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ls.bind(("::", args.port))
    ls.listen(64)
    ls.settimeout(0.5)
    print("READY", flush=True)
    payload = reply_payload(args.reply_bytes)
    deadline = time.monotonic() + args.max_seconds
    served = 0
    while not stopping and served < args.max_conns and time.monotonic() < deadline:
        try:
            conn, peer = ls.accept()
        except TimeoutError:
            continue
        except OSError:
            continue
        served += 1
        received = 0
        sent = 0
        error = None
        try:
            conn.settimeout(args.idle)
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                received += len(chunk)
            conn.sendall(payload)
            sent = len(payload)
            conn.shutdown(socket.SHUT_WR)
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
        host = peer[0][7:] if peer[0].startswith("::ffff:") else peer[0]
        rec = {"peer": host, "port": peer[1], "received": received, "sent": sent}
        if error:
            rec["error"] = error
        print(json.dumps(rec, sort_keys=True), flush=True)
    ls.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

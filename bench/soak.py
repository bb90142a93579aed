"""Soak: a Monitor under steady traffic for a long window; its memory over time and every loss.

    sudo .venv/bin/python bench/soak.py [--minutes 10] [--rate 500] [--sample 10]

Runs bench/busted_consumer.py (busted.Monitor() with its defaults, consuming every event) and a
paced loopback workload: ``--rate`` TCP connections per second (connect, 8 bytes each way, close)
from two client processes, plus one DNS-over-UDP query to a local responder per second. Samples the
consumer's RSS (VmRSS) every ``--sample`` seconds, then prints the samples, the first/last/peak RSS,
the events received and the losses by place (EventsLost events and Monitor.stats()). Traffic is
loopback only; every loop is bounded by the window.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from churn import ping, server  # noqa: E402 - the same loopback server and connection as the churn bench


def dns_responder(port_q: mp.Queue, stop_at: float) -> None:
    """Answers any query on 127.0.0.1:53 (UDP) with one A record: DNS capture stays exercised."""
    import dns.message
    import dns.rrset

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 53))
    s.settimeout(0.5)
    port_q.put(53)
    while time.monotonic() < stop_at:
        try:
            data, peer = s.recvfrom(2048)
            q = dns.message.from_wire(data)
            r = dns.message.make_response(q)
            r.answer = [dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "127.0.0.9")]
            s.sendto(r.to_wire(), peer)
        except Exception:
            continue


def client(port: int, rate: float, stop_at: float, out: mp.Queue) -> None:
    n = 0
    t = time.monotonic()
    while t < stop_at:
        n += ping(port)
        t += 1.0 / rate
        delay = t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    out.put(n)


def dns_client(stop_at: float, out: mp.Queue) -> None:
    import dns.message
    import dns.query

    n = 0
    while time.monotonic() < stop_at:
        try:
            dns.query.udp(dns.message.make_query(f"api{n % 50}.openai.com", "A"), "127.0.0.1", timeout=1)
            n += 1
        except Exception:
            pass
        time.sleep(1.0)
    out.put(n)


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=500.0, help="connections per second, in all")
    ap.add_argument("--sample", type=float, default=10.0)
    ap.add_argument("--out", default=str(HERE / "results" / "soak.json"))
    a = ap.parse_args()
    cons = subprocess.Popen([sys.executable, str(HERE / "busted_consumer.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = cons.stdout.readline()
    if not line.startswith("READY"):
        raise SystemExit(f"consumer failed: {line} {cons.stderr.read()}")
    window = a.minutes * 60
    start = time.monotonic()
    stop_at = start + window
    q: mp.Queue = mp.Queue()
    out: mp.Queue = mp.Queue()
    srv = mp.Process(target=server, args=(q, stop_at + 3))
    srv.start()
    port = q.get(timeout=10)
    dns_srv = mp.Process(target=dns_responder, args=(q, stop_at + 3))
    dns_srv.start()
    q.get(timeout=10)
    clients = [mp.Process(target=client, args=(port, a.rate / 2, stop_at, out)) for _ in range(2)]
    clients.append(mp.Process(target=dns_client, args=(stop_at, out)))
    for p in clients:
        p.start()
    samples = []
    while time.monotonic() < stop_at:
        samples.append((round(time.monotonic() - start), round(rss_mb(cons.pid), 1)))
        time.sleep(min(a.sample, max(0.0, stop_at - time.monotonic())))
    counts = [out.get(timeout=60) for _ in clients]
    for p in [*clients, srv, dns_srv]:
        p.join(10)
        if p.is_alive():
            p.kill()
    time.sleep(1.0)  # let the consumer drain
    samples.append((round(time.monotonic() - start), round(rss_mb(cons.pid), 1)))
    cons.send_signal(signal.SIGTERM)
    summary = json.loads(cons.communicate(timeout=60)[0].strip().splitlines()[-1])
    rss = [r for _t, r in samples]
    res = {
        "minutes": a.minutes, "rate": a.rate, "connections": sum(counts[:2]), "dns_queries": counts[2],
        "events": summary["events"], "lost_events": summary["lost_events"], "lost_by_place": summary["lost_by_place"],
        "rss_first_mb": rss[0], "rss_last_mb": rss[-1], "rss_peak_mb": max(rss),
        "rss_after_1min_min_mb": min(r for t, r in samples if t >= 60) if window > 60 else None,
        "peak_rss_mb_process": summary["peak_rss_mb"], "samples": samples, "kernel": os.uname().release,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "samples"}, indent=1))
    print("RSS samples (s, MB):", " ".join(f"{t}:{r}" for t, r in samples))


if __name__ == "__main__":
    main()

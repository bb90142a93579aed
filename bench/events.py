"""Python CPU per delivered event, all-in (decode -> typed event -> consumer), two ways.

    .venv/bin/python bench/events.py offline [--seconds 2] [--mix churn|tls]
    sudo .venv/bin/python bench/events.py live [--seconds 20] [--procs 4] [--configs busted,busted-noplaintext]

offline: kernel records built with busted/wire/layout.py, as the kernel emits them for loopback
  connections (client open, [client ClientHello], client close, server open, server close), fed
  through ``busted.pipeline.flows.FlowTable`` with classification (``Enricher``) and a counting consumer loop,
  in a tight loop for at least ``--seconds`` of process CPU (time.process_time). No root, no kernel:
  the Python floor of the pipeline, without the ring buffer, the queue and the thread hand-off.
live: a counting ``Monitor()`` consumer in its own process (bench/busted_consumer.py) while churn
  traffic (bench/churn.py's server and clients, as fast as they go) runs; CPU per event = the
  consumer's own rusage (getrusage(RUSAGE_SELF), every thread) over the window / events it received
  in the window. EventsLost are counted in the window ("lost") and over the whole run, start-up under
  load and shutdown included ("lost_total", with the places).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def records(conns: int, mix: str = "churn") -> list[bytes]:
    """Kernel records for ``conns`` loopback connections, in the order the kernel submits them."""
    from harness import HELLO

    from busted.wire.layout import CAP_HDR, FL, FLOW, REC_CLOSE, REC_HDR, REC_OPEN, REC_TLS

    attributed = FL.ATTRIBUTED | FL.HAVE_TUPLE | FL.OPEN_SENT
    lo = bytes((127, 0, 0, 1))
    out = []
    ts = 1_000_000
    for i in range(conns):
        sk_c, sk_s = 0xFFFF_8880_0000_0000 + 2 * i, 0xFFFF_8880_0000_0001 + 2 * i
        cport, sport = 32768 + i % 28000, 40000
        pid_c, pid_s = 2000 + i % 4, 1999

        def flow(typ: int, sk: int, t: int, *, pid: int, local: int, remote: int, direction: int,
                 open_ns: int, sent: int = 0, recv: int = 0, comm: bytes = b"python3") -> bytes:
            return REC_HDR.pack(type=typ, ts_ns=t, sk=sk) + FLOW.pack(
                open_ns=open_ns, cgroup=1, sent=sent, recv=recv, pid=pid, tid=pid, uid=0, family=socket.AF_INET,
                sport=local, dport=remote, direction=direction, flags=attributed, saddr=lo, daddr=lo, comm=comm)

        t0 = ts
        out.append(flow(REC_OPEN, sk_c, t0, pid=pid_c, local=cport, remote=sport, direction=1, open_ns=t0))
        out.append(flow(REC_OPEN, sk_s, t0 + 20_000, pid=pid_s, local=sport, remote=cport, direction=2,
                        open_ns=t0 + 20_000))
        if mix == "tls":
            out.append(CAP_HDR.pack(type=REC_TLS, len=len(HELLO), ts_ns=t0 + 30_000, sk=sk_c, pid=pid_c, tid=pid_c,
                                    fd=3, wire_len=len(HELLO), family=socket.AF_INET, port=sport, transport=0,
                                    addr=bytes(16), comm=b"python3") + HELLO)
        out.append(flow(REC_CLOSE, sk_c, t0 + 60_000, pid=pid_c, local=cport, remote=sport, direction=1,
                        open_ns=t0, sent=8, recv=8))
        out.append(flow(REC_CLOSE, sk_s, t0 + 70_000, pid=pid_s, local=sport, remote=cport, direction=2,
                        open_ns=t0 + 20_000, sent=8, recv=8))
        ts += 100_000
    return out


def offline(seconds: float = 2.0, mix: str = "churn", conns: int = 5000) -> dict[str, Any]:
    from busted import EventsLost
    from busted.host.procinfo import ProcInfo
    from busted.pipeline.enrich import Enricher
    from busted.pipeline.flows import FlowTable

    recs = records(conns, mix)
    # What the Monitor's /proc cache answers for a live process (a dict hit on the hot path).
    info = ProcInfo(1, "/usr/bin/python3", ("python3", "client.py"), 4026531840, 12345, "python3")
    table = FlowTable(enricher=Enricher(), proc=lambda _pid: info, salt=0x5A17)
    n_rec = n_ev = lost = loops = 0
    feed = table.feed
    t0 = time.process_time()
    deadline = t0 + seconds
    while time.process_time() < deadline and loops < 10_000:  # bounded in CPU time and in count
        for r in recs:
            for ev in feed(r):  # the consumer: count, and watch for losses as a real one must
                n_ev += 1
                if type(ev) is EventsLost:
                    lost += ev.count
        n_rec += len(recs)
        loops += 1
    cpu = time.process_time() - t0
    return {"mix": mix, "records": n_rec, "events": n_ev, "lost": lost, "cpu_s": cpu,
            "us_per_record": cpu / n_rec * 1e6, "us_per_event": cpu / n_ev * 1e6, "events_per_record": n_ev / n_rec}


def live(seconds: float = 20.0, procs: int = 4, config: str = "busted") -> dict[str, Any]:
    from harness import Tracer, Workload

    with Workload(procs=procs, max_seconds=seconds + 120) as w:
        w.start_clients()
        t = Tracer(config, extra=["--control"]).start()
        try:
            time.sleep(1.0)  # the pre-existing dump and the first records are not the steady state
            s0, c0 = t.stats(), w.count()
            time.sleep(seconds)
            s1, c1 = t.stats(), w.count()
        finally:
            w.stop()
            time.sleep(1.0)  # losses are reported within 0.5 s
            res = t.stop()
    ev = s1["events"] - s0["events"]
    cpu = s1["cpu_s"] - s0["cpu_s"]
    wall = (s1["ns"] - s0["ns"]) / 1e9
    return {"config": config, "seconds": wall, "events": ev, "events_per_s": ev / wall,
            "conn_per_s": (c1 - c0) / wall, "cpu_s": cpu, "cpu_cores": cpu / wall,
            "us_per_event": cpu / ev * 1e6 if ev else None, "lost": s1["lost"] - s0["lost"],
            "lost_total": res["lost"], "lost_by_place": res["lost_by_place"]}


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    o = sub.add_parser("offline", allow_abbrev=False)
    o.add_argument("--seconds", type=float, default=2.0)
    o.add_argument("--mix", choices=("churn", "tls"), default="churn")
    li = sub.add_parser("live", allow_abbrev=False)
    li.add_argument("--seconds", type=float, default=20.0)
    li.add_argument("--procs", type=int, default=4)
    li.add_argument("--configs", default="busted")
    a = ap.parse_args()
    if a.mode == "offline":
        print(json.dumps(offline(a.seconds, a.mix), indent=1))
    else:
        for c in a.configs.split(","):
            print(json.dumps(live(a.seconds, a.procs, c), indent=1))


if __name__ == "__main__":
    main()

"""Connection-churn benchmark: throughput of many short TCP connections with and without tracers.

    sudo .venv/bin/python bench/churn.py [--rounds 3] [--seconds 6] [--procs 4]

Configurations, interleaved (rotating order each round, so the VM's noise hits all alike):
  none               no tracer
  busted             bench/busted_consumer.py: busted.Monitor() consuming every event
  busted-noclassify  the same with Monitor(classify=False) (no DNS/TLS payload capture probes)
  busted-noplaintext the same with Monitor(llm_calls=False) (no TLS-library uprobes, no HTTP capture)
  busted-busy        busted with Monitor(busy_host=True): after the first flow to the bench server is
                     judged non-LLM, its flows are summed in the kernel (FlowSummary events)
  tcplife            Debian's tcplife-bpfcc, output to /dev/null
  busted-base        with --baseline DIR: the same consumer importing busted from DIR (a checkout
                     of an earlier commit), for before/after comparisons in one run
  busted-policy      busted with a policy, dry run (user-space decisions only)
  busted-enforce     busted with the same policy enforced (cgroup connect/egress/sock_ops programs
                     at the cgroup v2 root, DNS parser): its cost on flows the policy does not deny
  busted-enforce-exe the same plus a kernel exe rule (each connect looks its process's exe up and
                     notes it for the socket)
Throughput ratio = connections/s with the tracer / connections/s with none, in the same round.
Traffic is loopback only; every loop is bounded by --seconds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
CLK = os.sysconf("SC_CLK_TCK")


def server(port_q: mp.Queue, stop_at: float) -> None:
    import selectors

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4096)
    srv.setblocking(False)
    port_q.put(srv.getsockname()[1])
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    while time.monotonic() < stop_at:
        for key, _ in sel.select(0.2):
            if key.fileobj is srv:
                while True:
                    try:
                        c, _ = srv.accept()
                    except BlockingIOError:
                        break
                    c.setblocking(False)
                    sel.register(c, selectors.EVENT_READ)
            else:
                c = key.fileobj
                try:
                    data = c.recv(64)
                except (BlockingIOError, ConnectionError):
                    data = b""
                if data:
                    try:
                        c.send(b"pong1234")
                    except OSError:
                        pass
                sel.unregister(c)
                c.close()


def ping(port: int) -> bool:
    """One connection: connect, 8 bytes each way, close (bench/soak.py uses it too)."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"ping1234")
        s.recv(8)
        s.close()
        return True
    except OSError:
        return False


def client(port: int, start_at: float, stop_at: float, out: mp.Queue) -> None:
    while time.monotonic() < start_at:
        time.sleep(0.001)
    n = 0
    while time.monotonic() < stop_at:
        n += ping(port)
    out.put(n)


def workload(seconds: float, procs: int) -> float:
    port_q: mp.Queue = mp.Queue()
    out: mp.Queue = mp.Queue()
    start_at = time.monotonic() + 1.0
    stop_at = start_at + seconds
    srv = mp.Process(target=server, args=(port_q, stop_at + 2))
    srv.start()
    port = port_q.get(timeout=10)
    cl = [mp.Process(target=client, args=(port, start_at, stop_at, out)) for _ in range(procs)]
    for p in cl:
        p.start()
    total = sum(out.get(timeout=seconds + 30) for _ in cl)
    for p in cl:
        p.join(10)
    srv.join(10)
    if srv.is_alive():
        srv.kill()
    return total / seconds


def cpu_s(pid: int) -> float:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / CLK


def hwm_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


BASELINE: str | None = None


def run_config(name: str, seconds: float, procs: int) -> dict:
    res: dict = {"config": name}
    proc = None
    if name.startswith("busted"):
        extra = {"busted-noclassify": ["--no-classify"], "busted-noplaintext": ["--no-llm-calls"],
                 "busted-policy": ["--policy"], "busted-enforce": ["--policy", "--enforce"],
                 "busted-enforce-exe": ["--policy", "--enforce", "--exe-rule"],
                 "busted-busy": ["--busy-host"]}.get(name, [])
        argv = [PY, str(HERE / "busted_consumer.py"), *extra]
        env = dict(os.environ)
        if name == "busted-base":
            env["PYTHONPATH"] = BASELINE or ""
        t = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = proc.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"busted consumer failed: {line} {proc.stderr.read()}")
        res["startup_wall_s"] = time.monotonic() - t
    elif name == "tcplife":
        exe = shutil.which("tcplife-bpfcc") or "/usr/sbin/tcplife-bpfcc"
        t = time.monotonic()
        proc = subprocess.Popen([exe], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        proc.stdout.readline()  # its header line: attached
        res["startup_wall_s"] = time.monotonic() - t
        drain = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)
    cpu0 = cpu_s(proc.pid) if proc else 0.0
    res["conn_per_s"] = workload(seconds, procs)
    if proc:
        res["tracer_cpu_s"] = cpu_s(proc.pid) - cpu0
        res["peak_rss_mb"] = hwm_mb(proc.pid)
        time.sleep(1.0)  # let the tracer drain
        proc.send_signal(signal.SIGTERM if name != "tcplife" else signal.SIGINT)
        if name.startswith("busted"):
            out, _ = proc.communicate(timeout=60)
            summary = json.loads(out.strip().splitlines()[-1])
            res.update(events=summary["events"], lost=max(summary["lost_events"], summary["lost_stats"]),
                       lost_by_place=summary["lost_by_place"], startup_s=summary["startup_s"],
                       summarised_flows=summary.get("summarised_flows", 0), full_flows=summary.get("full_flows", 0),
                       events_per_s=summary["events"] / seconds,  # nearly all of them arrive in the window
                       peak_rss_mb=max(res["peak_rss_mb"], summary["peak_rss_mb"]))
        else:
            proc.wait(30)
            drain.wait(10)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--configs", default="none,busted,busted-noclassify,tcplife")
    ap.add_argument("--baseline", help="a checkout of an earlier busted: adds the config busted-base")
    ap.add_argument("--out", default=str(HERE / "results" / "churn.json"))
    a = ap.parse_args()
    configs = a.configs.split(",")
    if a.baseline:
        global BASELINE
        BASELINE = str(Path(a.baseline).resolve())
        if "busted-base" not in configs:
            configs.append("busted-base")
    rounds = []
    for r in range(a.rounds):
        order = configs[r % len(configs):] + configs[: r % len(configs)]
        got = {}
        for c in order:
            got[c] = run_config(c, a.seconds, a.procs)
            print(f"round {r} {c}: {got[c]['conn_per_s']:.0f} conn/s", file=sys.stderr, flush=True)
        rounds.append(got)
    table = []
    for c in configs:
        runs = [rd[c] for rd in rounds]
        row = {"config": c, "conn_per_s": statistics.median(x["conn_per_s"] for x in runs)}
        if c != "none":
            row["ratio"] = statistics.median(rd[c]["conn_per_s"] / rd["none"]["conn_per_s"] for rd in rounds)
            for k in ("events_per_s", "lost", "startup_s", "startup_wall_s", "peak_rss_mb", "tracer_cpu_s"):
                vals = [x[k] for x in runs if k in x]
                if vals:
                    row[k] = max(vals) if k in ("lost", "peak_rss_mb") else statistics.median(vals)
        table.append(row)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "rounds": rounds, "table": table}, indent=1))
    print(f"\n{a.rounds} rounds x {a.seconds:.0f} s, {a.procs} client processes, kernel {os.uname().release}\n")
    print("| config | conn/s (median) | ratio vs none | events/s | lost (max of rounds) | start-up s (Monitor / wall) "
          "| peak RSS MB | tracer CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in table:
        def f(k: str, fmt: str, row: dict = row) -> str:
            return fmt.format(row[k]) if k in row else "–"

        su = (f"{row['startup_s']:.2f} / {row['startup_wall_s']:.2f}" if "startup_s" in row
              else f("startup_wall_s", "– / {:.2f}"))
        print(f"| {row['config']} | {row['conn_per_s']:.0f} | {f('ratio', '{:.3f}')} | {f('events_per_s', '{:.0f}')} | "
              f"{f('lost', '{}')} | {su} | {f('peak_rss_mb', '{:.0f}')} | {f('tracer_cpu_s', '{:.2f}')} |")
    b = next((r for r in table if r["config"] == "busted"), None)
    if b:
        print("\ntargets for busted:")
        for name, ok, detail in (
            ("ratio >= 0.97", b["ratio"] >= 0.97, f"{b['ratio']:.3f}"),
            ("0 lost", b.get("lost", 0) == 0, str(b.get("lost"))),
            ("start-up <= 1.5 s", b["startup_s"] <= 1.5, f"{b['startup_s']:.2f} s"),
            ("peak RSS <= 150 MB", b["peak_rss_mb"] <= 150, f"{b['peak_rss_mb']:.0f} MB"),
        ):
            print(f"  {name}: {'met' if ok else 'MISSED'} ({detail})")


if __name__ == "__main__":
    main()

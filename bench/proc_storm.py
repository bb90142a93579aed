"""Process storm: as many short-lived processes per second as this machine can make, each making
one loopback TCP connection, with ``busted.Monitor`` running (issue 12, acceptance 3: 5,000/s for
10 s, every flow with its exe and ppid, the process table bounded, anything dropped an EventsLost).

    sudo .venv/bin/python bench/proc_storm.py                       # calibrate, then the fastest spawner
    sudo .venv/bin/python bench/proc_storm.py --spawner fork --seconds 10 --rate 5000
    .venv/bin/python bench/proc_storm.py --calibrate-only           # no root: spawners alone

Spawners (no compiler needed; ``--calibrate-only`` measures each without busted):

* ``fork``: Python workers ``os.fork()``; each child connects once and ``os._exit``s (a fork-only
  child: its program is its parent's).
* ``subshell``: a bash loop starting ``( exec 3<>/dev/tcp/127.0.0.1/PORT )`` subshells (fork-only;
  as fast as bash forks: ``--rate`` only sets the count, ``rate x seconds``).
* ``exec``: Python workers ``os.posix_spawn`` ``bash -c 'exec 3<>/dev/tcp/...'`` (fork + exec).

Each child is one process and one connection. ``--rate`` is a ceiling (per second, all workers
together), ``--seconds`` the length; both bound the run, and the total count is ``rate x seconds``.
A listener process (not the Monitor's) accepts and closes. The report: processes/s reached,
connections made, client flows seen, flows with exe and with ppid, the lineage table's largest
size (of ``--max-procs``), and the EventsLost by place.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

SPAWNERS = ("fork", "subshell", "exec")
BASH = "/bin/bash"


def _name(comm: str) -> None:
    """Name this process (its children inherit it), so its rows are recognisable."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(comm)
    except OSError:
        pass


def _listener(deadline: float) -> tuple[int, int]:
    """A forked process accepting on 127.0.0.1 until SIGTERM or ``deadline``: (pid, port)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4096)
    port = srv.getsockname()[1]
    pid = os.fork()
    if pid:
        srv.close()
        return pid, port
    _name("bst-listen")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    srv.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            c, _ = srv.accept()
        except TimeoutError:
            continue
        except OSError:
            break
        c.close()
    os._exit(0)


def _connect(port: int) -> int:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return 0
    except OSError:
        return 1


def _reap(block: bool = False) -> int:
    n = 0
    while True:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return n
        if pid == 0:
            return n
        n += 1


def _py_worker(kind: str, port: int, count: int, seconds: float, rate: float, out: int) -> None:
    """Child worker: ``count`` children at most ``rate``/s for at most ``seconds``; writes
    "spawned elapsed_s" to ``out`` and exits."""
    _name("bst-storm")
    argv = [BASH, "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"]
    env = {"PATH": "/usr/bin:/bin"}
    t0 = time.monotonic()
    end = t0 + seconds
    spawned = running = 0
    while spawned < count:
        now = time.monotonic()
        if now >= end:
            break
        if spawned > rate * (now - t0) + 64:  # ahead of the ceiling: wait (by the ceiling's clock)
            time.sleep(0.002)
            continue
        try:
            if kind == "fork":
                pid = os.fork()
                if pid == 0:
                    os._exit(_connect(port))
            else:
                os.posix_spawn(BASH, argv, env)
        except OSError:  # EAGAIN: too many processes: let some finish
            running -= _reap(block=True) if running else 0
            continue
        spawned += 1
        running += 1
        if running >= 256:
            running -= _reap()
    while running > 0 and _reap(block=True):
        running = 0
    os.write(out, f"{spawned} {time.monotonic() - t0:.3f}\n".encode())
    os._exit(0)


def _subshell_worker(port: int, count: int, seconds: float) -> subprocess.Popen:
    # bash's own loop (no rate ceiling: as fast as bash forks); SECONDS is bash's clock.
    script = (f"n=0; while (( n < {count} && SECONDS < {int(max(1, seconds))} )); do "
              f"( exec 3<>/dev/tcp/127.0.0.1/{port} ) & n=$((n+1)); "
              "if (( n % 128 == 0 )); then wait; fi; done; wait; "
              "echo $n $SECONDS")
    return subprocess.Popen([BASH, "-c", script], stdout=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin"})


class Storm:
    """``workers`` spawner processes of one kind; ``done()`` polls, ``result()`` -> (spawned, seconds)."""

    def __init__(self, kind: str, port: int, *, workers: int, seconds: float, rate: float) -> None:
        self.kind = kind
        self.t0 = time.monotonic()
        per = int(rate * seconds / workers)
        self._pipes: list[int] = []
        self._pids: list[int] = []
        self._procs: list[subprocess.Popen] = []
        for _ in range(workers):
            if kind == "subshell":
                self._procs.append(_subshell_worker(port, per, seconds))
                continue
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                _py_worker(kind, port, per, seconds, rate / workers, w)
            os.close(w)
            self._pipes.append(r)
            self._pids.append(pid)
        self._results: list[tuple[int, float]] = []

    def done(self) -> bool:
        if self.kind == "subshell":
            return all(p.poll() is not None for p in self._procs)
        ready, _, _ = select.select(self._pipes, [], [], 0)
        for r in ready:
            line = os.read(r, 100).decode().split()
            if line:
                self._results.append((int(line[0]), float(line[1])))
            self._pipes.remove(r)
            os.close(r)
        return not self._pipes

    def result(self) -> tuple[int, float]:
        if self.kind == "subshell":
            outs = [p.communicate(timeout=60)[0].split() for p in self._procs]
            spawned = sum(int(o[0]) for o in outs if o)
            return spawned, time.monotonic() - self.t0
        for pid in self._pids:
            os.waitpid(pid, 0)
        return sum(n for n, _ in self._results), max((s for _, s in self._results), default=0.0)


def calibrate(seconds: float, rate: float, workers: int) -> dict[str, float]:
    """Processes/s each spawner reaches without busted."""
    rates = {}
    for kind in SPAWNERS:
        lpid, port = _listener(time.monotonic() + seconds + 30)
        try:
            storm = Storm(kind, port, workers=workers, seconds=seconds, rate=rate)
            deadline = time.monotonic() + seconds + 30
            while not storm.done() and time.monotonic() < deadline:
                time.sleep(0.05)
            n, s = storm.result()
        finally:
            os.kill(lpid, signal.SIGTERM)
            os.waitpid(lpid, 0)
        rates[kind] = n / s if s else 0.0
        print(f"calibrate {kind:<8} {n} processes in {s:.2f} s = {rates[kind]:.0f}/s (no busted)", file=sys.stderr)
    return rates


def run(kind: str, seconds: float, rate: float, workers: int, max_procs: int, lineage: str | None = None,
        ringbuf_mb: int = 0) -> dict:
    import busted
    from busted import Direction, EventsLost, FlowOpened

    lpid, port = _listener(time.monotonic() + seconds + 120)
    opened = with_exe = with_ppid = with_both = with_argv = 0
    lost: Counter[str] = Counter()
    biggest = 0
    exes: Counter[str] = Counter()
    try:
        with busted.Monitor(classify=False, preexisting=False, llm_calls=False, max_procs=max_procs,
                            port=port, probes={"lineage": lineage} if lineage else None,
                            **({"ringbuf_bytes": ringbuf_mb << 20} if ringbuf_mb else {})) as mon:
            def take(ev: object) -> None:
                nonlocal opened, with_exe, with_ppid, with_both, with_argv
                if isinstance(ev, FlowOpened) and ev.direction == Direction.CONNECT and ev.dport == port:
                    opened += 1
                    with_exe += ev.exe is not None
                    with_ppid += ev.ppid is not None
                    with_both += ev.exe is not None and ev.ppid is not None
                    with_argv += bool(ev.cmdline)
                    exes[ev.exe or "?"] += 1
                elif isinstance(ev, EventsLost):
                    lost[ev.where.name] += ev.count

            storm = Storm(kind, port, workers=workers, seconds=seconds, rate=rate)
            deadline = time.monotonic() + seconds + 60
            n = 0
            while not storm.done() and time.monotonic() < deadline:
                for ev in mon.events(timeout=0.2):
                    take(ev)
                    n += 1
                    if len(mon.lineage or ()) > biggest:
                        biggest = len(mon.lineage)
                    if n % 512 == 0 and (storm.done() or time.monotonic() >= deadline):
                        break
            spawned, elapsed = storm.result()
            # the last children's flows and losses: until 2 s pass without one (bounded)
            quiet_until = time.monotonic() + 2.0
            hard = time.monotonic() + 30
            while time.monotonic() < min(quiet_until, hard):
                for ev in mon.events(timeout=0.2):
                    take(ev)
                    quiet_until = time.monotonic() + 2.0
            table = mon.lineage
            biggest = max(biggest, len(table or ()))
            st = mon.stats()
            lost_stats = dict(st.lost)
            plan = st.plan
    finally:
        os.kill(lpid, signal.SIGTERM)
        os.waitpid(lpid, 0)
    return {
        "spawner": kind, "workers": workers, "seconds": seconds, "rate_ceiling": rate,
        "processes": spawned, "elapsed_s": round(elapsed, 2),
        "processes_per_s": round(spawned / elapsed) if elapsed else 0,
        "client_flows_seen": opened, "flows_with_exe": with_exe, "flows_with_ppid": with_ppid,
        "flows_with_exe_and_ppid": with_both, "flows_with_argv": with_argv, "top_exes": dict(exes.most_common(3)),
        "lineage_table_max": biggest, "max_procs": max_procs,
        "lineage_records": table.records if table else 0,
        "live_evictions": table.evicted_live if table else 0,
        # exec records without argv (every exec on the default tier): read from /proc, or lost
        "argv_from_proc": table.argv_from_proc if table else 0,
        "argv_lost": table.argv_lost if table else 0,
        "events_lost": dict(lost), "stats_lost": lost_stats, "plan": plan,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--spawner", choices=(*SPAWNERS, "fastest"), default="fastest")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=5000.0, help="ceiling, processes/s (all workers)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-procs", type=int, default=4096, help="Monitor(max_procs=...): the table's bound")
    ap.add_argument("--lineage", help="force the lineage tier (busted.ebpf.plan.LINEAGE_TIERS), e.g. syscall")
    ap.add_argument("--ringbuf-mb", type=int, default=0, help="Monitor(ringbuf_bytes=...) in MiB (0: the default)")
    ap.add_argument("--calibrate-seconds", type=float, default=3.0)
    ap.add_argument("--calibrate-only", action="store_true")
    a = ap.parse_args(argv)
    a.seconds = min(max(a.seconds, 1.0), 60.0)
    a.workers = min(max(a.workers, 1), 16)
    kind = a.spawner
    rates: dict[str, float] = {}
    if a.calibrate_only or kind == "fastest":
        rates = calibrate(a.calibrate_seconds, a.rate, a.workers)
        if a.calibrate_only:
            print(json.dumps({"calibrate": {k: round(v) for k, v in rates.items()}}))
            return 0
        kind = max(rates, key=rates.__getitem__)
    if os.geteuid() != 0:
        print("proc_storm: the Monitor needs root (or --calibrate-only)", file=sys.stderr)
        return 2
    result = run(kind, a.seconds, a.rate, a.workers, a.max_procs, a.lineage, a.ringbuf_mb)
    result["calibrate_no_busted"] = {k: round(v) for k, v in rates.items()}
    result["loadavg_after"] = os.getloadavg()[0]
    result["ringbuf_mb"] = a.ringbuf_mb or None
    result["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the Monitor ran in this process
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

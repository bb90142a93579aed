"""A busted Monitor consuming events until SIGTERM/SIGINT, then a JSON summary on stdout.

    python bench/busted_consumer.py [--no-classify] [--no-llm-calls] [--busy-host] [--policy [--enforce [--exe-rule]]]
                                    [--capture-syscall]
                                    [--control] [--arrivals-port PORT --arrivals FILE]

Prints "READY <since_spawn_s> <monitor_start_s>" once the probes are attached (the first: process
spawn -> ready, imports included; the second: ``Monitor()`` -> ``start()`` returned).
``--busy-host`` asks for ``Monitor(busy_host=True)``; a busted without that option makes the script
print "UNSUPPORTED <why>" instead of READY and exit 3 (the benchmarks skip that configuration).
``--control``: each line read on stdin is answered with "STATS <json>" (events, lost, own CPU
seconds, monotonic ns), for windowed figures without restarting the monitor.
``--arrivals-port PORT``: remembers when each FlowOpened / FlowClassified of an outgoing flow to
that port was seen here (time.monotonic_ns(), comparable across processes) and writes
[[sport, ns, kind], ...] to ``--arrivals FILE`` at the end (bench/latency.py).
BUSTED_PROFILE=FILE dumps cProfile stats.
"""

import dataclasses
import inspect
import json
import os
import resource
import signal
import sys
import threading
import time

t_spawn = time.monotonic()
import busted  # noqa: E402
from busted import EventsLost  # noqa: E402

stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
signal.signal(signal.SIGINT, lambda *a: stop.set())


def arg(name: str) -> str | None:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else None


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


prof = None
if os.environ.get("BUSTED_PROFILE"):
    import cProfile

    prof = cProfile.Profile()

classify = "--no-classify" not in sys.argv
kw = {}
if "--policy" in sys.argv:  # a policy that denies a provider the workload never calls
    rules = [{"name": "no-deepseek", "action": "deny", "provider": "deepseek"}]
    if "--exe-rule" in sys.argv:  # a kernel exe rule: every TCP connect notes its socket's exe bits
        rules.insert(0, {"name": "no-curl-deepseek", "action": "deny", "provider": "deepseek",
                         "exe": "/usr/bin/curl"})
    kw["policy"] = busted.Policy.from_dict({"default": "audit", "rules": rules})
    kw["enforce"] = "--enforce" in sys.argv
if "--no-llm-calls" in sys.argv:
    kw["llm_calls"] = False
if "--busy-host" in sys.argv:
    takes = set(inspect.signature(busted.Monitor).parameters)  # an older busted: keywords on Monitor
    if hasattr(busted, "MonitorOptions"):
        takes |= {f.name for f in dataclasses.fields(busted.MonitorOptions)}
    if "busy_host" not in takes:
        print("UNSUPPORTED Monitor(busy_host=...) is not an option of this busted", flush=True)
        sys.exit(3)
    kw["busy_host"] = True
if "--capture-syscall" in sys.argv:  # the capture tier of syscall tracepoints (the default before the cgroup tier)
    kw["probes"] = {"capture": "syscall"}
arr_port = int(arg("--arrivals-port") or 0)
arrivals: list = []

t_mon = time.monotonic()
mon = busted.Monitor(classify=classify, **kw).start()
now = time.monotonic()
print("READY", round(now - t_spawn, 3), round(now - t_mon, 3), flush=True)
cpu_ready = cpu_s()
events = lost = full = summarised = 0
lost_drain = 0  # KERNEL_RING + USER_QUEUE: what a faster consumer would have kept (P2's criterion)


def control() -> None:
    # Reads of two ints the main thread updates: a racy snapshot is fine for windowed rates.
    for _line in sys.stdin:
        print("STATS", json.dumps({"events": events, "lost": lost, "lost_drain": lost_drain, "cpu_s": cpu_s(),
                                   "ns": time.monotonic_ns()}), flush=True)


if "--control" in sys.argv:
    threading.Thread(target=control, daemon=True).start()
t0 = time.monotonic()
if prof:
    prof.enable()
DRAIN_PLACES = ("KERNEL_RING", "USER_QUEUE")


def count(evs) -> None:
    """Count events (and losses by kind, flows in summaries, full flow ends) as they come."""
    global events, lost, lost_drain, summarised, full
    if arr_port:
        from busted import Direction, FlowClassified, FlowOpened
    for ev in evs:
        events += 1
        if isinstance(ev, EventsLost):
            lost += ev.count
            if ev.where.name in DRAIN_PLACES:
                lost_drain += ev.count
        elif arr_port and isinstance(ev, FlowOpened | FlowClassified):
            if ev.dport == arr_port and ev.direction == Direction.CONNECT:
                arrivals.append((ev.sport, time.monotonic_ns(), type(ev).__name__))
        elif type(ev).__name__ == "FlowSummary":
            summarised += ev.count
        elif type(ev).__name__ == "FlowClosed":
            full += 1


count(mon.events(stop_event=stop))
if prof:
    prof.disable()
    prof.dump_stats(os.environ["BUSTED_PROFILE"])
elapsed = time.monotonic() - t0
cpu_end = cpu_s()
mon.close()
count(mon.events())  # what close() drained last (flows that ended since the last drain, summaries)
st = mon.stats()
if arr_port and arg("--arrivals"):
    with open(arg("--arrivals"), "w") as f:
        json.dump(arrivals, f)
print(json.dumps({
    "events": events, "lost_events": lost, "lost_stats": sum(st.lost.values()), "lost_by_place": st.lost,
    "startup_s": st.startup_s, "events_per_s": events / elapsed if elapsed else 0,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "records": st.records,
    "cpu_ready_s": cpu_ready, "cpu_consuming_s": cpu_end - cpu_ready,
    "full_flows": full, "summarised_flows": summarised,
}), flush=True)

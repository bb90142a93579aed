"""A busted Monitor consuming events until SIGTERM/SIGINT, then a JSON summary on stdout.

    python bench/busted_consumer.py [--no-classify] [--no-llm-calls] [--policy [--enforce]] [--busy-host]
Prints "READY <startup_s>" once the probes are attached. BUSTED_PROFILE=FILE dumps cProfile stats.
"""

import json
import os
import resource
import signal
import sys
import threading
import time

t_spawn = time.monotonic()
import busted  # noqa: E402
from busted import EventsLost, FlowClosed  # noqa: E402

# An earlier busted (churn.py --baseline) has no FlowSummary: nothing is an instance of this then.
FlowSummary = getattr(busted, "FlowSummary", type("NoFlowSummary", (), {}))

stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
signal.signal(signal.SIGINT, lambda *a: stop.set())

prof = None
if os.environ.get("BUSTED_PROFILE"):
    import cProfile

    prof = cProfile.Profile()

classify = "--no-classify" not in sys.argv
kw = {}
if "--policy" in sys.argv:  # a policy that denies a provider the workload never calls
    kw["policy"] = busted.Policy.from_dict({"default": "audit", "rules": [
        {"name": "no-deepseek", "action": "deny", "provider": "deepseek"}]})
    kw["enforce"] = "--enforce" in sys.argv
if "--no-llm-calls" in sys.argv:
    kw["llm_calls"] = False
if "--busy-host" in sys.argv:
    kw["busy_host"] = True
mon = busted.Monitor(classify=classify, **kw).start()
print("READY", round(time.monotonic() - t_spawn, 3), flush=True)
events = lost = summarised = full = 0
t0 = time.monotonic()
if prof:
    prof.enable()


def count(evs) -> None:
    global events, lost, full, summarised
    for ev in evs:
        events += 1
        if isinstance(ev, EventsLost):
            lost += ev.count
        elif isinstance(ev, FlowClosed):
            full += 1
        elif isinstance(ev, FlowSummary):
            summarised += ev.count


count(mon.events(stop_event=stop))
if prof:
    prof.disable()
    prof.dump_stats(os.environ["BUSTED_PROFILE"])
elapsed = time.monotonic() - t0
mon.close()
count(mon.events())  # what close() drained last (flows that ended since the last drain, summaries)
st = mon.stats()
print(json.dumps({
    "events": events, "lost_events": lost, "lost_stats": sum(st.lost.values()), "lost_by_place": st.lost,
    "startup_s": st.startup_s, "events_per_s": events / elapsed if elapsed else 0,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "records": st.records,
    "full_flows": full, "summarised_flows": summarised,
}), flush=True)

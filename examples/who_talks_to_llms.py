"""Print every finished connection to an LLM provider: which process, which provider, how many bytes.

    sudo .venv/bin/python examples/who_talks_to_llms.py [SECONDS]
"""

import sys
import time

import busted

seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
end = time.monotonic() + seconds
with busted.Monitor() as mon:
    print(f"watching for {seconds:.0f} s (plan: {mon.plan.describe()})", flush=True)
    while time.monotonic() < end:
        for ev in mon.events(timeout=min(1.0, max(0.01, end - time.monotonic()))):
            if isinstance(ev, busted.FlowClosed) and ev.provider:
                print(f"{ev.comm}[{ev.pid}] -> {ev.provider} {ev.hostname or ev.daddr} "
                      f"(evidence {ev.evidence.name.lower()}, {ev.confidence:.2f}): "
                      f"sent {ev.bytes_sent} B, received {ev.bytes_received} B in {ev.duration_ns / 1e6:.1f} ms",
                      flush=True)
            elif isinstance(ev, busted.EventsLost):
                print(f"LOST {ev.count} events at {ev.where.name.lower()}", flush=True)
    print("stats:", mon.stats().to_dict())

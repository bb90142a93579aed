"""Outputs for people: an embedded SQLite store, JSONL files, a Prometheus endpoint.

Every sink has ``write(event)`` and ``close()`` (and ``flush()`` where it buffers); the CLI's
``--store``/``--jsonl``/``--metrics`` feed them every event. Unknown event kinds are kept
generically (the store's ``events`` table, JSONL lines), so new kinds need no schema change.
"""

from typing import Protocol

from busted.events import Event
from busted.sinks._codec import event_from_dict, redact
from busted.sinks.jsonl import JsonlSink
from busted.sinks.prometheus import PrometheusExporter
from busted.sinks.sqlite import Store


class Sink(Protocol):
    def write(self, event: Event) -> None: ...

    def close(self) -> None: ...


__all__ = ["JsonlSink", "PrometheusExporter", "Sink", "Store", "event_from_dict", "redact"]

"""Outputs for people: an embedded SQLite store, JSONL files, a Prometheus endpoint, OTLP export.

Every sink has ``write(event)`` and ``close()`` (and ``flush()`` where it buffers); the CLI's
``--store``/``--jsonl``/``--metrics`` feed them every event. Unknown event kinds are kept
generically (the store's ``events`` table, JSONL lines), so new kinds need no schema change.
Credential-named keys are masked (``redact``) before anything is written or exported.
``encode(event)`` does that and the JSON once (``Encoded``: the redacted dict and its line), for
every output that writes it (``JsonlSink.write_encoded``, ``Store.write_encoded``; ``dumps`` is
the one JSON encoding, with orjson when installed). ``OtlpSink`` (``busted[otlp]``) sends calls to
an OpenTelemetry collector as GenAI spans and metrics (``busted.sinks.otlp``).
"""

from typing import Protocol, runtime_checkable

from busted.events import Event
from busted.sinks._codec import Encoded, dumps, encode, event_from_dict, event_kinds, redact
from busted.sinks.jsonl import JsonlSink
from busted.sinks.otlp import OtlpSink
from busted.sinks.prometheus import PrometheusExporter
from busted.sinks.sqlite import (
    DEFAULT_MAX_BYTES,
    DEFAULT_RETENTION_SECONDS,
    SCHEMA_VERSION,
    Store,
    parse_age,
    parse_size,
)


@runtime_checkable
class Sink(Protocol):
    """What the CLI (and you) feed events to. ``flush()`` is optional: call it if present."""

    def write(self, event: Event) -> None: ...

    def close(self) -> None: ...


def flush(sink: Sink) -> None:
    """Flush ``sink`` if it buffers (has ``flush()``); a no-op otherwise."""
    f = getattr(sink, "flush", None)
    if callable(f):
        f()


__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_RETENTION_SECONDS", "SCHEMA_VERSION", "Encoded", "JsonlSink",
           "OtlpSink", "PrometheusExporter", "Sink", "Store", "dumps", "encode", "event_from_dict", "event_kinds",
           "flush", "parse_age", "parse_size", "redact"]

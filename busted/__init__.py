"""busted: audit a Linux host's traffic to LLM providers with eBPF.

    import busted
    with busted.Monitor() as m:
        for ev in m.events():
            print(ev.to_dict())
"""

from collections.abc import Iterable
from typing import Any

from busted.errors import (
    BccNotInstalled,
    BustedError,
    CatalogError,
    EnvironmentProblem,
    KernelHeadersMissing,
    LabError,
    MissingDependency,
    MonitorClosed,
    PermissionDenied,
    PolicyError,
    ProbeLoadError,
    ProbeUnavailable,
    StoreError,
    TracefsNotMounted,
    UsageError,
)
from busted.events import (
    Ancestor,
    BudgetExceeded,
    BudgetSpend,
    Direction,
    DnsAnswer,
    DnsRecord,
    Event,
    EventsLost,
    Evidence,
    FlowClassified,
    FlowClosed,
    FlowEvent,
    FlowIdentity,
    FlowOpened,
    FlowSummary,
    LlmCall,
    LossPlace,
    McpMessage,
    PolicyDecision,
    TlsClientHello,
)
from busted.monitor import Monitor, MonitorStats
from busted.options import MonitorOptions
from busted.policy.rules import Policy

__version__ = "0.1.0"


def to_dataframe(events: Iterable[Event]) -> Any:  # a pandas DataFrame: pandas is an optional extra
    """One row per event (``to_dict()`` flattened) as a pandas DataFrame; needs ``busted[pandas]``."""
    from busted.sinks.dataframe import to_dataframe as _to_dataframe

    return _to_dataframe(events)


__all__ = [
    "Ancestor",
    "BudgetExceeded",
    "BudgetSpend",
    "BccNotInstalled",
    "BustedError",
    "CatalogError",
    "Direction",
    "DnsAnswer",
    "DnsRecord",
    "EnvironmentProblem",
    "Event",
    "EventsLost",
    "Evidence",
    "FlowClassified",
    "FlowClosed",
    "FlowEvent",
    "FlowIdentity",
    "FlowOpened",
    "FlowSummary",
    "KernelHeadersMissing",
    "LabError",
    "LlmCall",
    "LossPlace",
    "McpMessage",
    "MissingDependency",
    "Monitor",
    "MonitorOptions",
    "MonitorStats",
    "MonitorClosed",
    "PermissionDenied",
    "Policy",
    "PolicyDecision",
    "PolicyError",
    "ProbeLoadError",
    "ProbeUnavailable",
    "StoreError",
    "TlsClientHello",
    "TracefsNotMounted",
    "UsageError",
    "__version__",
    "to_dataframe",
]

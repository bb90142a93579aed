"""The public names are pinned: adding or removing one is a deliberate change."""

import re

import busted

EXPECTED = [
    "Ancestor", "BccNotInstalled", "BudgetExceeded", "BudgetSpend", "BustedError", "CatalogError", "Direction",
    "DnsAnswer", "DnsRecord",
    "EnvironmentProblem",
    "Event", "EventsLost", "Evidence", "FlowClassified", "FlowClosed", "FlowEvent", "FlowIdentity",
    "FlowOpened", "FlowSummary", "KernelHeadersMissing", "LabError", "LlmCall", "LossPlace", "McpMessage",
    "MissingDependency", "Monitor", "MonitorClosed", "MonitorOptions", "MonitorStats",
    "PermissionDenied", "ProbeLoadError", "ProbeUnavailable", "StoreError", "TlsClientHello", "TracefsNotMounted",
    "UsageError", "__version__", "to_dataframe", "Policy", "PolicyDecision", "PolicyError",
]


def test_all_is_pinned_and_importable():
    assert sorted(busted.__all__) == sorted(EXPECTED)
    for name in busted.__all__:
        assert getattr(busted, name) is not None


# The flow identity every flow event, LLM call and MCP message carries, in order: a field added or
# renamed changes the store's columns, the JSONL keys and people's queries.
IDENTITY = [
    "ts_ns", "wall_time", "flow_id", "direction", "pid", "tid", "uid", "comm", "ppid", "exe", "cmdline", "cgroup_id",
    "netns", "family", "saddr", "sport", "daddr", "dport", "preexisting", "hostname", "provider", "evidence",
    "confidence", "ancestry", "agent", "agent_pid", "agent_evidence", "container_id", "container_runtime",
    "pod_uid", "pod_qos", "proc_start_time",
]


def test_the_flow_identity_is_pinned():
    from busted.events import FLOW_IDENTITY

    assert list(FLOW_IDENTITY) == IDENTITY
    assert [f for f in busted.Ancestor.__dataclass_fields__] == ["pid", "comm", "exe"]


def test_every_error_is_a_busted_error_with_advice():
    for name in busted.__all__:
        obj = getattr(busted, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, busted.BustedError)
    assert "apt-get install python3-bpfcc" in str(busted.BccNotInstalled())
    assert "mount -t tracefs" in str(busted.TracefsNotMounted())
    assert "pip install 'busted[pandas]'" in str(busted.MissingDependency("pandas", "pandas"))
    assert isinstance(busted.CatalogError("x"), ValueError)  # what catalog loading raised before


def test_the_lab_error_is_the_one_in_the_tree():
    from busted.lab import LabError

    assert LabError is busted.LabError and issubclass(LabError, busted.BustedError)


def test_the_docstring_tree_draws_every_error():
    import busted.errors

    drawn = busted.errors.__doc__
    for name in busted.errors.__all__:
        assert re.search(rf"[ ─]{name}\b", drawn), name

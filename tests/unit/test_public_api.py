"""The public names are pinned: adding or removing one is a deliberate change."""

import busted

EXPECTED = [
    "BccNotInstalled", "BustedError", "Direction", "DnsAnswer", "DnsRecord", "EnvironmentProblem", "Event",
    "EventsLost", "Evidence", "FlowClassified", "FlowClosed", "FlowEvent", "FlowOpened", "KernelHeadersMissing",
    "LossPlace", "Monitor", "MonitorClosed", "MonitorStats", "PermissionDenied", "ProbeLoadError",
    "ProbeUnavailable", "StoreError", "TlsClientHello", "TracefsNotMounted", "__version__", "to_dataframe",
    "Policy", "PolicyDecision", "PolicyError",
]


def test_all_is_pinned_and_importable():
    assert sorted(busted.__all__) == sorted(EXPECTED)
    for name in busted.__all__:
        assert getattr(busted, name) is not None


def test_every_error_is_a_busted_error_with_advice():
    for name in busted.__all__:
        obj = getattr(busted, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, busted.BustedError)
    assert "apt-get install python3-bpfcc" in str(busted.BccNotInstalled())
    assert "mount -t tracefs" in str(busted.TracefsNotMounted())

"""busted.to_dataframe: one row per event, flattened, kind and time columns."""

import builtins
from dataclasses import dataclass
from typing import ClassVar

import needs
import pytest
from events_factory import sample_events

import busted
from busted.errors import EnvironmentProblem
from busted.events import Event
from busted.sinks.dataframe import frame_from_dicts, to_dataframe

pd = needs.module("pandas", module_level=True)


def test_columns_and_rows():
    evs = sample_events()
    df = busted.to_dataframe(evs)
    assert len(df) == len(evs)
    assert list(df.columns[:4]) == ["time", "kind", "ts_ns", "wall_time"]
    assert list(df["kind"]) == ["dns_answer", "flow_opened", "tls_client_hello", "flow_classified",
                                "flow_closed", "events_lost"]
    for col in ("flow_id", "pid", "comm", "provider", "evidence", "bytes_sent", "bytes_received",
                "duration_ns", "qname", "answers", "sni", "alpn", "ja4", "where", "count"):
        assert col in df.columns, col
    closed = df[df["kind"] == "flow_closed"].iloc[0]
    assert closed["bytes_received"] == 2233 and closed["evidence"] == "sni"
    assert closed["direction"] == "connect"
    assert df.loc[df["kind"] == "events_lost", "where"].iloc[0] == "kernel_ring"
    assert pd.isna(df.loc[df["kind"] == "dns_answer", "bytes_sent"].iloc[0])
    assert df.loc[df["kind"] == "dns_answer", "answers"].iloc[0][0]["value"] == "10.231.1.65"


def test_time_is_utc_datetime_from_wall_time():
    df = to_dataframe(sample_events())
    assert str(df["time"].dtype) == "datetime64[ns, UTC]"
    assert df["time"].iloc[0] == pd.Timestamp(1_700_000_000.0, unit="s", tz="UTC")


def test_empty_and_groupby():
    df = to_dataframe([])
    assert len(df) == 0 and {"time", "kind", "wall_time"} <= set(df.columns)
    df = to_dataframe(sample_events(flow_id=1) + sample_events(flow_id=2))
    by = df[df.kind == "flow_closed"].groupby("provider")["bytes_received"].sum()
    assert by["openai"] == 2 * 2233


def test_unknown_kinds_and_nested_dicts():
    @dataclass(frozen=True, kw_only=True)
    class Future(Event):
        kind: ClassVar[str] = "test_future_df"
        usage: dict
        token: str = ""

        def to_dict(self):
            return {**super().to_dict(), "usage": self.usage,
                    "headers": [["authorization", self.token]]}

    df = to_dataframe([Future(ts_ns=1, wall_time=2.0, usage={"input": 3, "output": 4}, token="sk-x"),
                       *sample_events()[:1]])
    assert df["usage.input"].iloc[0] == 3 and df["usage.output"].iloc[0] == 4
    assert df["headers"].iloc[0] == [["authorization", "[REDACTED]"]]
    assert frame_from_dicts([{"kind": "raw", "wall_time": 1.5}])["kind"].iloc[0] == "raw"


def test_missing_pandas_is_a_clear_error(monkeypatch):
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "pandas":
            raise ImportError("No module named 'pandas'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(EnvironmentProblem, match=r"pip install 'busted\[pandas\]'"):
        to_dataframe(sample_events())


def test_llm_calls_and_mcp_messages():
    from dataclasses import replace

    from events_factory import SECRET, sample_calls

    call, req, resp = sample_calls(secret=SECRET)
    local = replace(call, comm="ollama-cli", input_tokens=None, output_tokens=9, cost_usd=None, provider=None)
    df = to_dataframe([*sample_events(), call, local, req, resp])
    calls = df[df["kind"] == "llm_call"]
    assert str(calls["input_tokens"].dtype) == "Int64"
    assert calls["input_tokens"].isna().tolist() == [False, True]  # unknown stays unknown
    assert int(calls["output_tokens"].sum()) == 54 and int(calls["input_tokens"].sum()) == 120
    by = calls.groupby("comm")["output_tokens"].sum()
    assert by.to_dict() == {"ollama-cli": 9, "python3": 45}
    assert calls.iloc[0]["cost_usd"] == pytest.approx(0.0000435)
    assert calls.iloc[0]["path"] == "/v1/chat/completions?key=[REDACTED]"
    assert SECRET not in df.to_csv()
    mcp = df[df["kind"] == "mcp_message"]
    assert mcp["jsonrpc_method"].iloc[0] == "tools/call" and mcp["jsonrpc_method"].isna().tolist() == [False, True]
    assert mcp["tool"].iloc[0] == "search" and pd.isna(mcp["tool"].iloc[1])
    assert mcp["error_code"].isna().tolist() == [True, False]


def test_spend_per_agent_from_events_and_from_the_store(tmp_path):
    from dataclasses import replace

    from events_factory import sample_calls

    from busted.sinks import Store
    from busted.sinks.dataframe import spend_by

    call = sample_calls()[0]  # 120 in, 45 out, $0.0000435
    evs = [*sample_events(),
           replace(call, agent="claude-code"), replace(call, agent="claude-code", cost_usd=None, input_tokens=None),
           replace(call, agent="aider", output_tokens=None, cost_usd=0.00001),
           call]  # no agent
    df = busted.to_dataframe(evs)
    got = spend_by(df)
    assert list(got.index) == ["claude-code", "(none)", "aider"]  # most spend first, then most calls
    assert got.loc["claude-code"].tolist()[:3] == [2, 120, 90] and got.loc["claude-code", "unpriced"] == 1
    assert got.loc["claude-code", "cost_usd"] == pytest.approx(0.0000435)
    assert got.loc["aider", "output_tokens"] is pd_na()  # only unreported counts: unknown, not 0
    assert got["calls"].sum() == 4
    # the same from the store's llm_calls table, and grouped by two columns
    with Store(tmp_path / "s.db") as s:
        s.write_many(evs)
    with Store.open_readonly(tmp_path / "s.db") as r:
        stored = spend_by(r.dataframe("llm_calls"))
    assert stored.loc["claude-code", "calls"] == 2 and stored.loc["(none)", "input_tokens"] == 120
    two = spend_by(df, ["agent", "provider"])
    assert two.loc[("claude-code", "openai"), "calls"] == 2
    empty = spend_by(busted.to_dataframe(sample_events()))
    assert empty.empty and list(empty.columns) == ["calls", "input_tokens", "output_tokens", "cost_usd", "unpriced"]


def pd_na():
    import pandas as pd

    return pd.NA

"""Realistic synthetic events of every kind, for sink tests (no kernel needed)."""

from busted.events import (
    Direction,
    DnsAnswer,
    DnsRecord,
    EventsLost,
    Evidence,
    FlowClassified,
    FlowClosed,
    FlowOpened,
    LlmCall,
    LossPlace,
    McpMessage,
    TlsClientHello,
)

IDENT = dict(flow_id=4242, direction=Direction.CONNECT, pid=100, tid=101, uid=1000, comm="curl", ppid=1,
             exe="/usr/bin/curl", cmdline=("curl", "-H", "Authorization: [REDACTED]", "https://api.openai.com"),
             cgroup_id=7, netns=4026531840, family=4, saddr="10.0.0.1", sport=40000, daddr="10.231.1.65", dport=443)


def sample_events(t0: float = 1_700_000_000.0, flow_id: int = 4242, pid: int = 100) -> list:
    ident = {**IDENT, "flow_id": flow_id, "pid": pid}
    return [
        DnsAnswer(ts_ns=1, wall_time=t0, pid=pid, tid=pid + 1, comm="curl", netns=4026531840, transport="udp",
                  server="10.231.1.80", qname="api.openai.com", qtype="A", rcode="NOERROR",
                  answers=(DnsRecord("api.openai.com", "A", "10.231.1.65", 60),), cname_chain=("api.openai.com",)),
        FlowOpened(ts_ns=2, wall_time=t0 + 0.1, **ident, hostname="api.openai.com", provider="openai",
                   evidence=Evidence.DNS, confidence=0.8),
        TlsClientHello(ts_ns=3, wall_time=t0 + 0.2, flow_id=flow_id, pid=pid, comm="curl", saddr="10.0.0.1",
                       sport=40000, daddr="10.231.1.65", dport=443, sni="api.openai.com", alpn=("h2", "http/1.1"),
                       versions=("TLS1.3", "TLS1.2"), ja4="t13d3112h2_e8f1e7e78f70_b26ce05bbdd6"),
        FlowClassified(ts_ns=3, wall_time=t0 + 0.2, **ident, hostname="api.openai.com", provider="openai",
                       evidence=Evidence.SNI, confidence=0.95),
        FlowClosed(ts_ns=4, wall_time=t0 + 1.1, **ident, hostname="api.openai.com", provider="openai",
                   evidence=Evidence.SNI, confidence=0.95, bytes_sent=811, bytes_received=2233,
                   duration_ns=1_000_000_000),
        EventsLost(ts_ns=5, wall_time=t0 + 1.2, where=LossPlace.KERNEL_RING, count=3, detail="ring buffer full"),
    ]


# A key-shaped secret the sinks must never write (the events' own redaction is bypassed on purpose).
SECRET = "sk-proj-Zq3xW9vT1bN7mK2pL5hR8cY4dF6gJ0sA"


def sample_calls(t0: float = 1_700_000_000.5, flow_id: int = 4242, pid: int = 100, secret: str = "") -> list:
    """An LlmCall (every field set; ``secret`` planted in its free-text fields) and an MCP pair."""
    ident = {**IDENT, "flow_id": flow_id, "pid": pid, "comm": "python3", "hostname": "api.openai.com",
             "provider": "openai", "evidence": Evidence.SNI, "confidence": 0.95}
    q = f"?key={secret}" if secret else ""
    return [
        LlmCall(ts_ns=10, wall_time=t0, **ident, api="openai.chat", operation="chat", method="POST",
                path="/v1/chat/completions" + q, http_version="2", stream_id=3, request_model="gpt-4o-mini",
                response_model="gpt-4o-mini-2024-07-18", stream=True, status=200, error_type=None,
                input_tokens=120, output_tokens=45, cache_read_tokens=100, cache_write_tokens=None,
                reasoning_tokens=7, total_tokens=165, finish_reason="stop", tool_calls=1, request_bytes=512,
                response_bytes=2048, time_to_first_token_ns=150_000_000, ttft_source="socket", duration_ns=900_000_000,
                user_agent="OpenAI/Python 1.54.0" + (f" {secret}" if secret else ""), complete=True,
                cost_usd=0.0000435, price_source="builtin:2025-06", prompt=f"hello {secret}".strip(),
                completion="hi",
                response_id="chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG" + (f"-{secret}" if secret else "")),
        McpMessage(ts_ns=11, wall_time=t0 + 0.1, **{**ident, "provider": None, "hostname": "mcp.lab"},
                   direction_sent=True, jsonrpc_method="tools/call", jsonrpc_id="7", session_id="s-1",
                   tool="search", error_code=None, is_notification=False),
        McpMessage(ts_ns=12, wall_time=t0 + 0.2, **{**ident, "provider": None, "hostname": "mcp.lab"},
                   direction_sent=False, jsonrpc_method=None, jsonrpc_id="7", session_id="s-1",
                   error_code=-32601),
    ]

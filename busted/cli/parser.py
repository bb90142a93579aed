"""The command line: every subcommand's flags, defined once (filters, outputs, policy)."""

from __future__ import annotations

import argparse
from typing import Any

from busted import sinks
from busted.cli.top import TOP_BY

# -- entry -------------------------------------------------------------------------------------


def _age(text: str) -> float | None:
    try:
        return sinks.parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int | None:
    try:
        return sinks.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _nonneg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a byte count >= 0, got {text!r}")
    return n


class _Parser(argparse.ArgumentParser):
    """Every busted parser: no abbreviations, so a prefix (``--ui``) is refused instead of silently
    meaning another option (``--uid``), today or when an option is added. Subcommand parsers are
    made of this class too (``add_subparsers`` uses the parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def _filter_flags() -> _Parser:
    """The filter flags, defined once: monitor, top, lab and query take the same ones."""
    fp = _Parser(add_help=False)
    g = fp.add_argument_group("filters (a flow must match every one given; repeatable ones match any value)")
    g.add_argument("-p", "--pid", type=int, action="append", help="only this process id (repeatable)")
    g.add_argument("-u", "--uid", type=int, action="append", help="only this user id (repeatable)")
    g.add_argument("-c", "--comm", action="append", help="only this command name, exact (repeatable)")
    g.add_argument("-P", "--port", type=int, action="append", help="only flows with this port at either end "
                   "(repeatable)")
    fam = g.add_mutually_exclusive_group()
    fam.add_argument("-4", "--ipv4", dest="family", action="store_const", const=4, help="only IPv4")
    fam.add_argument("-6", "--ipv6", dest="family", action="store_const", const=6, help="only IPv6")
    g.add_argument("--provider", action="append", help="only flows to this provider id ('none' = non-LLM; "
                   "repeatable)")
    return fp


def _live_flags() -> _Parser:
    """Flags of the commands that load probes and write outputs (monitor, top, lab)."""
    lp = _Parser(add_help=False)
    lp.add_argument("--probes", help="force tiers, e.g. bytes=syscall,lifecycle=tracepoint")
    lp.add_argument("--json", action="store_true", help="NDJSON (default when stdout is not a terminal)")
    g = lp.add_argument_group("outputs (checked before the probes load; a bad one exits 2 and creates nothing)")
    g.add_argument("--store", help="also write every event to this SQLite file")
    g.add_argument("--retention-age", type=_age, default=sinks.DEFAULT_RETENTION_SECONDS, metavar="AGE",
                   help="--store keeps events this long (e.g. 7d, 12h; 'off': forever; default 7d)")
    g.add_argument("--retention-size", type=_size, default=sinks.DEFAULT_MAX_BYTES, metavar="SIZE",
                   help="--store keeps at most this much data (e.g. 1GiB, 500MiB; 'off'; default 1GiB)")
    g.add_argument("--jsonl", help="also append every event to this JSONL file (rotated)")
    g.add_argument("--metrics", help="serve Prometheus metrics on ADDR (e.g. 127.0.0.1:9464)")
    g.add_argument("--ui", nargs="?", const="127.0.0.1:8765", metavar="ADDR",
                   help="serve the web page on ADDR (default 127.0.0.1:8765); the URL to open, with its access "
                   "token, is printed on stderr (docs/outputs.md)")
    g.add_argument("--otlp", nargs="?", const="", metavar="ENDPOINT", help="also export calls as OpenTelemetry "
                   "GenAI spans + metrics to this OTLP collector (e.g. http://127.0.0.1:4318; without ENDPOINT: "
                   "OTEL_EXPORTER_OTLP_ENDPOINT, else localhost; needs busted[otlp]; docs/outputs.md)")
    g.add_argument("--otlp-protocol", choices=("http/protobuf", "grpc"), help="with --otlp: http/protobuf "
                   "(default, or OTEL_EXPORTER_OTLP_PROTOCOL) or grpc")
    from busted.cli.policy import add_policy_options  # --policy/--enforce: busted/cli/policy.py

    add_policy_options(lp)
    c = lp.add_argument_group("LLM calls (read from TLS plaintext and plain HTTP; docs/llm.md)")
    c.add_argument("--no-llm-calls", dest="llm_calls", action="store_false",
                   help="flows, DNS and TLS hellos only: no plaintext probes, no call/MCP events")
    c.add_argument("--capture-content", type=_nonneg, default=0, metavar="N",
                   help="keep the first N bytes of each prompt and completion, secrets masked (default 0: none)")
    c.add_argument("--prices", metavar="FILE", help="price overrides (JSON or TOML: provider -> model -> "
                   "input_per_mtok/output_per_mtok/...), consulted before genai-prices (docs/llm.md)")
    return lp


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="busted", description="Audit this host's traffic to LLM providers (eBPF).")
    sub = p.add_subparsers(dest="cmd", required=True)
    filters, live = _filter_flags(), _live_flags()

    d = sub.add_parser("doctor", help="what this kernel offers and which probe tiers would be used")
    d.add_argument("--json", action="store_true")
    d.add_argument("--ebpf", action="store_true", help="print the BPF program Monitor() would load and exit")
    d.add_argument("--probes", help="force tiers, e.g. bytes=syscall,lifecycle=tracepoint")
    s = d.add_argument_group("--security: the installation as a root monitor trusts it (docs/security.md); "
                             "give the options the monitor will run with to check them too")
    s.add_argument("--security", action="store_true", help="only these checks: OK/WARN/FAIL, each with what "
                   "to do; exit 1 if one FAILs")
    for flag, what in (("--policy", "policy file"), ("--prices", "price file"), ("--store", "store path"),
                       ("--jsonl", "JSONL path"), ("--metrics", "metrics address"), ("--ui", "UI address")):
        s.add_argument(flag, metavar="FILE" if "file" in what else "ADDR" if "addr" in what else "PATH",
                       help=f"with --security: check this {what}")

    m = sub.add_parser("monitor", help="live view of flows", parents=[filters, live])
    m.add_argument("--duration", type=float, help="stop after this many seconds")
    m.add_argument("--busy-host", action="store_true", help="flows to peers judged non-LLM (not a provider, "
                   "not MCP) are summed in the kernel per process x peer for 60 s and reported every 5 s as "
                   "flow_summary events (docs/outputs.md)")

    t = sub.add_parser("top", help="refreshing per-process x provider table", parents=[filters, live])
    t.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    t.add_argument("--duration", type=float, help="stop after this many seconds")
    t.add_argument("--by", choices=TOP_BY, default="comm", help="group rows by command name (default), "
                   "agent (docs/agents.md) or container id")

    lab = sub.add_parser("lab", help="network lab with demo LLM traffic, monitored", parents=[filters, live])
    lab.add_argument("--rounds", type=int, default=1)

    from busted.cli.policy import add_policy_parser  # policy: busted/cli/policy.py

    add_policy_parser(sub)

    q = sub.add_parser("query", help="read a store written with --store", parents=[filters])
    q.add_argument("--store", required=True)
    q.add_argument("--table", choices=("flows", "events", "llm_calls", "mcp_messages", "flow_summaries"),
                   default="flows", help="flows (one row per flow), events (every event; see --kind), llm_calls, "
                   "mcp_messages, flow_summaries (busy-host mode)")
    q.add_argument("--kind", action="append", help="with --table events: only this kind, e.g. llm_call "
                   "(repeatable)")
    q.add_argument("--since", type=float, help="only the last N seconds")
    q.add_argument("--json", action="store_true", help="NDJSON, as monitor --json (the default)")
    q.add_argument("--format", choices=("json", "csv"), default="json", help="json (= --json) or csv")

    u = sub.add_parser("ui", help="serve the web page from a store written with --store (read-only, no root)")
    u.add_argument("--store", required=True)
    u.add_argument("--addr", default="127.0.0.1:8765", help="HOST:PORT to listen on (default 127.0.0.1:8765)")
    u.add_argument("--since", type=float, help="only the last N seconds of the store")
    u.add_argument("--duration", type=float, help="stop after this many seconds")
    return p

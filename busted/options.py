"""What a Monitor can be told, with every default in one place.

    busted.Monitor(pid=1234, busy_host=True)                 # keywords build the options
    busted.Monitor(MonitorOptions(pid=1234), busy_host=True)  # or pass them, and override some

The CLI builds one from its flags (busted/cli/outputs.py); nothing else repeats a default.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from busted.ebpf.loader import CHUNK_BYTES, MAX_FLOWS, RINGBUF_BYTES

__all__ = ["MonitorOptions"]


@dataclass(frozen=True, kw_only=True)
class MonitorOptions:
    """Every option of ``busted.Monitor``.

    Filters (all optional; a flow must match every one given): ``pid``, ``uid``, ``comm`` (exact),
    ``cgroup`` (cgroup v2 id), ``port`` (either end), ``netns`` (inode), ``family`` (4 or 6).
    ``probes`` forces tiers, e.g. ``{"bytes": "syscall"}`` (see ``busted doctor``).
    ``agents`` (an ``AgentCatalog``) names the agents on flows and ``max_procs`` bounds the process
    lineage table (``Monitor.lineage``, when the lineage probe runs; docs/agents.md).
    ``busy_host=True``: flows to peers judged "no LLM provider, not MCP" are summed in the kernel
    per process x peer for ``quiet_ttl`` seconds after the judgement and delivered as
    ``FlowSummary`` events every ``summary_interval`` seconds (docs/outputs.md, "Busy-host mode").
    """

    # -- probes ------------------------------------------------------------------------------
    probes: Mapping[str, str] | Any = None  # forced tiers ({"bytes": "syscall"}) or a ProbePlan
    mount_tracefs: bool = False  # mount debugfs/tracefs if it is not (needs root)
    ringbuf_bytes: int = RINGBUF_BYTES  # the kernel ring buffer
    max_flows: int = MAX_FLOWS  # the kernel's flow map
    chunk_bytes: int = CHUNK_BYTES  # plaintext copied per TLS/HTTP call (head and tail)
    # -- filters: a flow must match every one given (repeatable ones: any value) ----------------
    pid: int | Iterable[int] | None = None
    uid: int | Iterable[int] | None = None
    comm: str | Iterable[str] | None = None  # exact
    cgroup: int | None = None  # cgroup v2 id
    port: int | Iterable[int] | None = None  # either end
    netns: int | None = None  # network namespace inode
    family: int | None = None  # 4 or 6
    # -- what to report ----------------------------------------------------------------------
    preexisting: bool = True  # flows open before the Monitor started (sock_diag)
    classify: bool = True  # providers from DNS/SNI/catalog
    catalog: Any = None  # a busted.classify.Catalog (None: the built-in one)
    llm_calls: bool = True  # LlmCall/McpMessage from TLS plaintext and plain HTTP
    capture_content: int = 0  # bytes of each prompt/completion kept, secrets masked
    prices: Any = None  # a PriceBook or a JSON/TOML override file (None: genai-prices)
    agents: Any = None  # a busted.classify.agents.AgentCatalog (None: the built-in one)
    max_procs: int = 32768  # the process lineage table
    # -- the reader ----------------------------------------------------------------------------
    queue_size: int = 16384  # events waiting for your loop; beyond, the kernel ring buffers
    drain_interval: float = 0.01  # seconds between drains of the ring (at most)
    sweep_interval: float = 30.0  # seconds between checks for flow ends the kernel missed
    # -- policy (docs/policy.md) -----------------------------------------------------------------
    policy: Any = None  # a busted.policy.Policy or a path
    enforce: bool = False  # deny in the kernel (needs a policy)
    policy_scope: str | None = None  # cgroup v2 path the kernel enforces under (None: all)
    budget_spend: Any = ()  # stored BudgetSpend records: spend restored at start
    # -- busy-host mode (docs/outputs.md) --------------------------------------------------------
    busy_host: bool = False  # flows to non-LLM peers summed in the kernel
    summary_interval: float = 5.0  # seconds between FlowSummary batches
    quiet_ttl: float = 60.0  # seconds a peer judged quiet stays aggregated

    def __post_init__(self) -> None:
        from busted.errors import UsageError

        if self.queue_size < 1:
            raise UsageError(f"queue_size={self.queue_size}: the Monitor needs a queue of at least 1 event")
        if self.enforce and self.policy is None:
            raise ValueError("enforce=True needs a policy")
        if self.busy_host and not self.classify:
            raise ValueError("busy_host=True needs classification (classify=True): it judges peers")

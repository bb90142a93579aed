"""Every event busted yields: frozen dataclasses with ``to_dict()``.

Conventions (kept for the life of the schema):

* Enums start at ``UNKNOWN = 0``; new members are appended.
* Addresses: ``saddr``/``sport`` are always *this host's* socket, ``daddr``/``dport`` the peer,
  for both directions (like tcplife's LADDR/RADDR). ``direction`` says who initiated.
* Times: ``ts_ns`` is CLOCK_MONOTONIC nanoseconds (the kernel's ``bpf_ktime_get_ns``);
  ``wall_time`` is UNIX seconds derived from it. Durations carry their unit (``duration_ns``).
* ``None`` means "not known" and differs from zero/false (e.g. ``ppid`` of a process that exited
  before we could read /proc).
* Loss is data: ``EventsLost`` travels in the same stream as everything else.
* ``flow_id`` joins every event about one TCP flow (open, classification, TLS hello, close).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "FLOW_IDENTITY",
    "Ancestor",
    "BudgetExceeded",
    "BudgetSpend",
    "Direction",
    "DnsAnswer",
    "DnsRecord",
    "Event",
    "EventsLost",
    "Evidence",
    "FlowClassified",
    "FlowClosed",
    "FlowEvent",
    "FlowIdentity",
    "LlmCall",
    "McpMessage",
    "FlowOpened",
    "FlowSummary",
    "LossPlace",
    "PolicyDecision",
    "TlsClientHello",
]


class Direction(enum.IntEnum):
    UNKNOWN = 0
    CONNECT = 1  # this host initiated (connect())
    ACCEPT = 2  # the peer initiated (accept())


class Evidence(enum.IntEnum):
    """Why a flow was tied to a hostname/provider. Stronger evidence wins: SNI > DNS > HTTP_HOST >
    CIDR > PORT (the values are not that order: HTTP_HOST came last)."""

    UNKNOWN = 0  # nothing tied it yet
    PORT = 1  # a distinctive local-server port (Ollama :11434) on a local address
    CIDR = 2  # the peer address lies in a provider's published range
    DNS = 3  # a DNS answer seen on this host mapped the peer address to a name
    SNI = 4  # the client's TLS ClientHello named the server
    HTTP_HOST = 5  # the Host header (:authority) of a request on this flow named the server


class LossPlace(enum.IntEnum):
    UNKNOWN = 0
    KERNEL_RING = 1  # ring buffer full when BPF tried to emit
    KERNEL_MAP = 2  # a BPF map was full: a flow could not be tracked
    USER_QUEUE = 3  # the Monitor's bounded queue was full (consumer too slow)
    PARSE = 4  # captured bytes that no parser could read (malformed or truncated)
    USER_TABLE = 5  # the flow table's bound: a flow's identity evicted before its end was seen
    KERNEL_MISS = 6  # the kernel skipped a BPF program (recursion), or a flow end it never reported
    PLAINTEXT = 7  # plaintext not followed: a call larger than the copy limit, or never joined to a flow
    SINK = 8  # an output (store, JSONL file) could not keep them: disk full, I/O error, its backlog full
    TLS_LIBRARY = 9  # a TLS library not probed for plaintext (the bound on probed files), or a process not scanned


# Values to_dict() passes through as they are (exact types: an IntEnum is an int subclass and is
# not one of them). Checked first because they are almost every field of almost every event.
_PLAIN = frozenset({int, str, float, bool, type(None)})
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}  # dataclass -> its field names (fields() is slow)
_ENUM_NAMES: dict[type, dict[Any, str]] = {}  # enum class -> member -> lower-case name


def _names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def _dataclass_dict(v: Any, names: tuple[str, ...]) -> dict[str, Any]:
    vals = getattr(v, "__dict__", None)  # faster than getattr per field; absent with slots
    if vals is None or len(vals) < len(names):
        vals = {n: getattr(v, n) for n in names}
    out = {}
    for n in names:
        x = vals[n]
        out[n] = x if type(x) in _PLAIN else _jsonable(x)
    return out


def _jsonable(v: Any) -> Any:
    t = type(v)
    if t in _PLAIN:
        return v
    if isinstance(v, enum.Enum):
        members = _ENUM_NAMES.get(t)
        if members is None:  # members of one enum class are distinct keys (IntEnums of two classes may be ==)
            members = _ENUM_NAMES[t] = {m: m.name.lower() for m in t}
        return members.get(v) or v.name.lower()
    if isinstance(v, tuple | list):
        return [x if type(x) in _PLAIN else _jsonable(x) for x in v]
    names = _FIELD_NAMES.get(t)  # a dataclass seen before (Ancestor, DnsRecord)
    if names is not None or dataclasses.is_dataclass(v) and not isinstance(v, type):
        return _dataclass_dict(v, names or _names(t))
    if isinstance(v, bytes):
        return v.hex()
    return v


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base of all events. ``kind`` names the concrete type in ``to_dict()`` output."""

    kind: ClassVar[str] = "event"
    ts_ns: int
    wall_time: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict: enums become lower-case names, tuples lists, bytes hex."""
        return {"kind": self.kind, **_dataclass_dict(self, _names(type(self)))}


@dataclass(frozen=True)
class Ancestor:
    """One process of a flow's ancestry (``FlowEvent.ancestry``): nearest first, the flow's own
    process at index 0. ``exe`` is the path the kernel executed (for a script: the script)."""

    pid: int
    comm: str
    exe: str | None = None


@dataclass(frozen=True, kw_only=True)
class FlowIdentity(Event):
    """Identity of a TCP flow: who (process) and where (4-tuple), plus what it was classified as.

    Declared once, here: flow events (``FlowEvent``) and events about what travels on a flow
    (``LlmCall``, ``McpMessage``) carry these fields, flat in ``to_dict()``.
    """

    kind: ClassVar[str] = "flow"
    flow_id: int
    direction: Direction
    # process (pid/tid/uid/comm/cgroup_id from BPF at attribution; the rest from /proc)
    pid: int
    tid: int
    uid: int
    comm: str
    ppid: int | None = None
    exe: str | None = None
    cmdline: tuple[str, ...] | None = None
    cgroup_id: int = 0
    netns: int | None = None
    # addresses: s* = this host's socket, d* = the peer
    family: int  # 4 or 6
    saddr: str
    sport: int
    daddr: str
    dport: int
    # True iff the flow was open before the Monitor started (found by a sock_diag dump)
    preexisting: bool = False
    # classification (issue: classification); None/UNKNOWN until something tied it
    hostname: str | None = None
    provider: str | None = None
    evidence: Evidence = Evidence.UNKNOWN
    confidence: float = 0.0
    # who is behind it (docs/agents.md); None: not known (lineage off, or the process unseen).
    # ancestry: the process, its parent, ... up to the first process of its container, or the
    # depth bound. agent: the nearest of those the agent catalog recognises (its id), which pid,
    # and the evidence ("exe:claude", "module:aider", ...).
    ancestry: tuple[Ancestor, ...] | None = None
    agent: str | None = None
    agent_pid: int | None = None
    agent_evidence: str | None = None
    # the container/pod of the process's cgroup v2 path (busted.classify.containers); pod_qos is the
    # pod's Kubernetes QoS class (guaranteed, burstable, besteffort), set iff pod_uid is
    container_id: str | None = None
    container_runtime: str | None = None
    pod_uid: str | None = None
    pod_qos: str | None = None
    # when the process started (fork), UNIX seconds: from the kernel's fork record, else from
    # /proc/<pid>/stat (10 ms resolution); None: not known (it exited before we looked)
    proc_start_time: float | None = None


@dataclass(frozen=True, kw_only=True)
class FlowEvent(FlowIdentity):
    """A change in a flow's life: opened, classified, closed."""

    kind: ClassVar[str] = "flow"


#: The fields that identify a flow (who, where, what it is), in ``FlowIdentity``'s order: every
#: flow event carries them, flat in ``to_dict()``.
FLOW_IDENTITY: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(FlowIdentity))


@dataclass(frozen=True, kw_only=True)
class FlowOpened(FlowEvent):
    kind: ClassVar[str] = "flow_opened"


@dataclass(frozen=True, kw_only=True)
class FlowClassified(FlowEvent):
    """The flow's hostname/provider became known (or stronger evidence arrived) after FlowOpened.

    Always delivered after the flow's FlowOpened and before its FlowClosed.
    """

    kind: ClassVar[str] = "flow_classified"


@dataclass(frozen=True, kw_only=True)
class FlowClosed(FlowEvent):
    kind: ClassVar[str] = "flow_closed"
    bytes_sent: int
    bytes_received: int
    duration_ns: int  # 0 for preexisting flows: their start is not known


@dataclass(frozen=True, kw_only=True)
class FlowSummary(Event):
    """Busy-host mode (``Monitor(busy_host=True)``, docs/outputs.md): ``count`` flows of one
    process with one quiet peer, summed in the kernel instead of reported one by one. A peer is
    quiet once a flow to it ended judged "no LLM provider, not MCP"; the judgement lasts a TTL.

    ``peer`` is the other end's address; ``port`` the service port: the peer's for
    ``direction`` CONNECT, this host's (the listening port) for ACCEPT. ``start_*`` is the earliest
    open, ``end_*`` the latest end among the flows; ``ts_ns`` when the summary was drained. ``exe``
    is None when the process was gone before the drain (``pid``, ``comm`` come from the kernel).
    """

    kind: ClassVar[str] = "flow_summary"
    pid: int
    uid: int
    comm: str
    exe: str | None = None
    cgroup_id: int = 0
    direction: Direction
    family: int  # 4 or 6
    peer: str
    port: int
    count: int
    bytes_sent: int
    bytes_received: int
    start_ns: int
    end_ns: int
    start_time: float  # UNIX seconds of start_ns / end_ns
    end_time: float


@dataclass(frozen=True, kw_only=True)
class EventsLost(Event):
    """``count`` events (or items) were lost at ``where``; counted, never silent."""

    kind: ClassVar[str] = "events_lost"
    where: LossPlace
    count: int
    detail: str = ""


@dataclass(frozen=True)
class DnsRecord:
    name: str
    rtype: str  # "A", "AAAA", "CNAME"
    value: str  # address, or CNAME target
    ttl: int


@dataclass(frozen=True, kw_only=True)
class DnsAnswer(Event):
    kind: ClassVar[str] = "dns_answer"
    pid: int | None
    tid: int | None = None
    comm: str | None = None
    netns: int | None = None
    transport: str = "udp"  # "udp" or "tcp"
    server: str | None = None  # resolver address the answer came from, when known
    qname: str
    qtype: str
    rcode: str
    answers: tuple[DnsRecord, ...] = ()
    cname_chain: tuple[str, ...] = ()  # qname, alias1, alias2, ... as followed
    # The catalog's provider for the name (or an alias on its chain); None: no provider's name.
    # Flows to the answer's addresses carry it once they open (their FlowOpened.provider).
    provider: str | None = None
    # DNS over TCP: the flow that carried the answer; None over UDP.
    flow_id: int | None = None

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(r.value for r in self.answers if r.rtype in ("A", "AAAA"))


@dataclass(frozen=True, kw_only=True)
class TlsClientHello(Event):
    """A TLS ClientHello parsed from the first bytes a client wrote on a flow.

    ``flow_id`` and the addresses join it to its flow; they are None when the flow's open was not
    seen (filtered or lost). ``hostname``/``provider`` are the flow's classification after the
    hello (the same values as the FlowClassified that may follow it).
    """

    kind: ClassVar[str] = "tls_client_hello"
    flow_id: int | None
    pid: int
    comm: str
    saddr: str | None = None
    sport: int | None = None
    daddr: str | None = None
    dport: int | None = None
    sni: str | None
    alpn: tuple[str, ...] = ()
    versions: tuple[str, ...] = ()  # offered, e.g. ("TLS1.3", "TLS1.2")
    ja4: str = ""
    hostname: str | None = None
    provider: str | None = None


@dataclass(frozen=True, kw_only=True)
class LlmCall(FlowIdentity):
    """One request/response exchange with an LLM API, read from TLS plaintext or plain HTTP.

    Emitted when the response completes, or when the flow ends mid-response (``complete`` False).
    ``api`` names the API shape recognised (e.g. "openai.chat", "anthropic.messages"); a call
    recognised by shape on a flow no catalog entry names has ``provider`` None. Every count is
    None when the API did not report it (never 0 for unknown). ``input_tokens`` follows OTel: it
    includes cache reads and writes where the API reports those apart (Anthropic), and the parts
    are given. ``cost_usd`` is tokens x the price of ``response_model`` (or ``request_model``)
    from ``price_source``; None when the model's price is unknown.
    """

    kind: ClassVar[str] = "llm_call"
    api: str
    operation: str | None = None  # OTel gen_ai.operation.name: chat, text_completion, embeddings, ...
    method: str = ""
    path: str = ""  # query-string credentials removed
    http_version: str = ""
    stream_id: int = 0  # the HTTP/2 stream, 0 for HTTP/1.x
    request_model: str | None = None
    response_model: str | None = None
    stream: bool | None = None
    status: int | None = None
    error_type: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    total_tokens: int | None = None
    finish_reason: str | None = None
    tool_calls: int | None = None
    request_bytes: int | None = None  # decoded body bytes
    response_bytes: int | None = None
    time_to_first_token_ns: int | None = None  # first content for streams, first body byte otherwise
    # what time_to_first_token_ns ends at: "socket" (the kernel saw the response's first bytes
    # arrive on the socket, earlier than the application read them) or "read" (the application's
    # read); None when there is no TTFT (docs/llm.md)
    ttft_source: str | None = None
    duration_ns: int | None = None  # request start to response end
    user_agent: str | None = None
    complete: bool = True
    cost_usd: float | None = None
    price_source: str | None = None
    prompt: str | None = None  # only with capture_content: the first N bytes, secrets masked
    completion: str | None = None
    # the provider's id of this answer (OTel gen_ai.response.id): chatcmpl-..., resp_..., msg_..., Gemini's
    # responseId; None where the API gives none (docs/llm.md)
    response_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class McpMessage(FlowIdentity):
    """One MCP JSON-RPC message seen over HTTP (Streamable HTTP or HTTP+SSE)."""

    kind: ClassVar[str] = "mcp_message"
    direction_sent: bool  # True: this process sent it (on the flow's own socket)
    jsonrpc_method: str | None = None
    jsonrpc_id: str | None = None
    session_id: str | None = None
    tool: str | None = None  # tools/call: the tool's name
    error_code: int | None = None
    is_notification: bool = False


@dataclass(frozen=True, kw_only=True)
class PolicyDecision(Event):
    """A policy rule decided about a flow (busted.policy.rules; docs/policy.md).

    ``point``: where it was decided: ``"connect"`` (the kernel refused connect(), or a flow opened),
    ``"tls_client_hello"`` (the SNI), ``"llm_request"``. ``enforced`` is True iff the kernel stopped
    the flow; a ``deny`` with ``enforced=False`` is a dry run or a rule the kernel cannot check.
    ``matched`` holds (key, value) pairs of what matched. ``flow_id`` is None when the flow never
    opened (refused at connect); the identity fields are what was known at that point.

    ``count``: how many identical decisions this event stands for. The kernel's decisions about one
    process x rule x point x destination are aggregated (busted/policy/enforce.py): the first is reported
    at once (``count`` 1), the rest of each 1 s window as one event carrying their ``count``, with
    ``first_ns``/``last_ns`` (monotonic, like ``ts_ns``) bounding them. A loop of denials cannot
    flood the history, and none goes uncounted.
    """

    kind: ClassVar[str] = "policy_decision"
    rule: str  # the rule's name, or "default"
    action: str  # "allow" | "audit" | "deny"
    enforced: bool
    point: str
    matched: tuple[tuple[str, Any], ...] = ()
    flow_id: int | None = None
    pid: int | None = None
    tid: int | None = None
    uid: int | None = None
    comm: str | None = None
    exe: str | None = None
    cgroup_id: int | None = None
    daddr: str | None = None
    dport: int | None = None
    hostname: str | None = None
    provider: str | None = None
    count: int = 1
    first_ns: int | None = None
    last_ns: int | None = None


@dataclass(frozen=True, kw_only=True)
class BudgetSpend(Event):
    """A budget's spend for one scope in the current window, after an LLM call counted against it
    (busted.policy.budgets; docs/policy.md "Budgets"). The store keeps these to restore spend at start.

    ``scope`` is the ``per`` value as text (a uid, an exe path, an agent id, a container id, a
    cgroup id, or ``"host"``). Windows are fixed and aligned to the UNIX epoch:
    ``[window_start, window_end)`` in UNIX seconds. ``unpriced_calls``: calls counted whose cost is
    not known (no price for the model): they add tokens but no dollars.
    """

    kind: ClassVar[str] = "budget_spend"
    budget: str
    per: str
    scope: str
    window_start: float
    window_end: float
    tokens: int
    usd: float
    calls: int
    unpriced_calls: int = 0
    limit_tokens: int | None = None
    limit_usd: float | None = None


@dataclass(frozen=True, kw_only=True)
class BudgetExceeded(Event):
    """A budget is exhausted for one scope until ``window_end`` (UNIX seconds): who (``per`` and
    ``scope``, and the process of the call that exhausted it), which budget, spent vs limit.

    ``enforced`` is True iff the kernel now refuses that scope's new connections to the budget's
    providers (action ``deny`` on a scope the kernel can key); refused connections are then
    ``PolicyDecision``s with rule ``"budget:<name>"``. ``note`` says why not, when not.
    """

    kind: ClassVar[str] = "budget_exceeded"
    budget: str
    action: str  # "deny" | "audit"
    enforced: bool
    per: str
    scope: str
    window_start: float
    window_end: float
    tokens: int
    usd: float
    limit_tokens: int | None = None
    limit_usd: float | None = None
    note: str | None = None
    # the call that exhausted it
    flow_id: int | None = None
    pid: int | None = None
    uid: int | None = None
    comm: str | None = None
    exe: str | None = None
    cgroup_id: int | None = None
    agent: str | None = None
    container_id: str | None = None
    provider: str | None = None
    model: str | None = None

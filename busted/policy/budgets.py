"""Budgets: how many tokens or dollars a scope may spend on LLM calls per window. Sans-I/O.

    [[budgets]]
    name = "team-a-daily"
    provider = "anthropic"          # the same match keys as rules, plus agent
    per = "uid"                     # uid | exe | agent | container | cgroup | host
    limit_tokens = 200000           # and/or limit_usd = 20.0
    window = "1d"                   # <n>s | m | h | d | w
    action = "deny"                 # deny | audit

Spend is counted from the client side's ``LlmCall`` events (``direction`` CONNECT) whose subject
the budget's match keys hold, per budget x scope value, in fixed windows aligned to the UNIX epoch
(``1d`` runs from 00:00 UTC to 00:00 UTC). Tokens are the call's ``total_tokens`` or, when the
API gave no total, ``input_tokens + output_tokens``; dollars are its ``cost_usd`` (the price table).
A scope is exhausted when its spend reaches a limit (>=); ``BudgetBook`` then emits one
``BudgetExceeded`` for that window and, for a kernel-enforced budget, a ``Block`` command: the
runtime (busted.policy.enforce) writes it to the kernel's budget map, and the connect programs refuse
that scope's next connections to the budget's destinations until the window ends.

What the kernel can key at connect: ``per`` = uid, cgroup (the caller's own cgroup) or host, and
destination keys ``provider`` and compilable ``hostname`` patterns. A ``deny`` budget with anything
else (``per`` exe/agent/container, a ``model``/``exe``/``container``/``agent`` match key, a uid or
cgroup key that is not its own ``per``) is counted and reported, and enforced as ``audit``
(``kernel_reason`` says why; ``busted policy check`` prints it).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from busted.errors import PolicyError
from busted.events import BudgetExceeded, BudgetSpend, Direction, Event, LlmCall

__all__ = ["BUDGET_KEYS", "PER", "Block", "Budget", "BudgetBook", "Unblock", "c_definitions", "describe_budgets",
           "kernel_bit", "kernel_budgets", "parse_budgets", "parse_window", "window_of"]

PER = ("uid", "exe", "agent", "container", "cgroup", "host")
BUDGET_MATCH_KEYS = ("provider", "hostname", "model", "exe", "uid", "cgroup", "container", "agent")
BUDGET_KEYS = ("name", "per", "limit_tokens", "limit_usd", "window", "action", *BUDGET_MATCH_KEYS)
BUDGET_ACTIONS = ("deny", "audit")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_WINDOW = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
MAX_WINDOW_S = 366 * 86400

# The kernel side (busted/ebpf/policy_enforce.c): kernel budget j owns destination-mask bit
# BUDGET_TOP_BIT - j (rules take bits from 0 up); refusals carry rule BUDGET_RULE_BASE + j.
MAX_KERNEL_BUDGETS = 8
BUDGET_TOP_BIT = 61
BUDGET_RULE_BASE = 0x10000
MAX_BUDGET_SCOPES = 4096  # pol_budget map entries (scopes blocked at once)
KIND_UID, KIND_CGROUP, KIND_HOST, KIND_EXE, KIND_CONTAINER = 1, 2, 3, 4, 5
_KIND = {"uid": KIND_UID, "cgroup": KIND_CGROUP, "host": KIND_HOST, "exe": KIND_EXE, "container": KIND_CONTAINER}
EXE_KEPT = 127  # bytes of an exe path the kernel keeps (busted.enforce.EXE_MAX - 1)


def scope_hash(path: str) -> int:
    """The kernel's key for an exe or container scope: 64-bit FNV-1a over the string's first
    EXE_KEPT bytes (pol_exe_hash in policy_enforce.c hashes the exec'd filename the kernel holds;
    user space writes a container id's hash into pol_ctr)."""
    h = 0xCBF29CE484222325
    for c in os.fsencode(path)[:EXE_KEPT].split(b"\0", 1)[0]:
        h = ((h ^ c) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def c_definitions() -> str:
    """The constants policy_enforce.c shares with this module."""
    consts = {"POL_MAX_BUDGETS": MAX_KERNEL_BUDGETS, "POL_BUDGET_TOP_BIT": BUDGET_TOP_BIT,
              "POL_BUDGET_BASE": BUDGET_RULE_BASE, "POL_MAX_BUDGET_SCOPES": MAX_BUDGET_SCOPES,
              "BK_UID": KIND_UID, "BK_CGROUP": KIND_CGROUP, "BK_HOST": KIND_HOST,
              "BK_EXE": KIND_EXE, "BK_CONTAINER": KIND_CONTAINER}
    return "\n".join(f"#define {k} {v}" for k, v in consts.items()) + "\n"


def kernel_bit(j: int) -> int:
    return BUDGET_TOP_BIT - j


def parse_window(text: Any) -> int:
    """``"1h"`` -> 3600. Raises ValueError with the reason."""
    if not isinstance(text, str):
        raise ValueError(f"window must be a string like '1h' or '1d', not {text!r}")
    m = _WINDOW.match(text)
    if not m:
        raise ValueError(f"window {text!r}: expected a number and a unit (s, m, h, d, w), e.g. '1h', '1d'")
    s = int(m.group(1)) * _UNITS[m.group(2)]
    if s <= 0 or s > MAX_WINDOW_S:
        raise ValueError(f"window {text!r}: must be between 1s and 366d")
    return s


def window_of(wall: float, window_s: int) -> tuple[float, float]:
    """The fixed window holding UNIX time ``wall``: [start, end), aligned to the epoch."""
    start = math.floor(wall / window_s) * window_s
    return float(start), float(start + window_s)


@dataclass(frozen=True)
class Budget:
    """One budget as understood. ``match`` is a ``busted.policy.rules.Rule`` holding the rule match keys;
    ``agent`` the agent ids (exact) or None."""

    name: str
    per: str
    window_s: int
    action: str
    limit_tokens: int | None
    limit_usd: float | None
    match: Any  # busted.policy.rules.Rule
    agent: tuple[str, ...] | None = None
    window: str = ""
    line: int | None = field(default=None, compare=False)

    def kernel_reason(self) -> str | None:
        """Why the kernel cannot enforce this budget at connect, or None if it can (action aside)."""
        if self.per not in _KIND:
            return f"per={self.per}: the kernel cannot key a connection by {self.per}"
        m = self.match
        other = [k for k in ("model", "exe", "container") if getattr(m, k) is not None]
        if self.agent is not None:
            other.append("agent")
        if m.uid is not None and self.per != "uid":
            other.append("uid (not its per)")
        if m.cgroup is not None and self.per != "cgroup":
            other.append("cgroup (not its per)")
        for h in m.hostname or ():
            if any(c in (h[2:] if h.startswith("*.") else h) for c in "*?["):
                other.append(f"hostname {h}")
        if other:
            return f"match keys the kernel cannot check at connect: {', '.join(other)}"
        return None

    def scope_of(self, ev: LlmCall, cgroup_path: str | None) -> str | None:
        """The scope value a call counts against (None: not known, not counted)."""
        from busted.policy.rules import container_of

        if self.per == "uid":
            return str(ev.uid)
        if self.per == "exe":
            return ev.exe
        if self.per == "agent":
            return ev.agent
        if self.per == "container":
            return ev.container_id or container_of(cgroup_path)
        if self.per == "cgroup":
            return str(ev.cgroup_id) if ev.cgroup_id else None
        return "host"

    def limits(self) -> str:
        parts = []
        if self.limit_tokens is not None:
            parts.append(f"{self.limit_tokens} tokens")
        if self.limit_usd is not None:
            parts.append(f"${self.limit_usd:g}")
        return " or ".join(parts)

    def describe(self, enforced_note: str | None) -> str:
        keys = " ".join(f"{k}={'|'.join(map(str, v))}" for k, v in self.match.match_keys().items())
        if self.agent is not None:
            keys = (keys + " " if keys else "") + f"agent={'|'.join(self.agent)}"
        return (f"{self.action:<5} {self.name}: {self.limits()} per {self.per} per {self.window}"
                + (f"  [{keys}]" if keys else "  [any provider]")
                + (f"\n        {enforced_note}" if enforced_note else ""))


_HEADER = re.compile(r"^\s*\[\[\s*budgets\s*\]\]")
_TABLE = re.compile(r"^\s*\[")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=")


def _budget_lines(text: str) -> list[dict[str | None, int]]:
    """Line numbers of keys in each ``[[budgets]]`` table of TOML text (tomllib keeps none)."""
    tables: list[dict[str | None, int]] = []
    where: dict[str | None, int] | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if _HEADER.match(line):
            where = {None: n}
            tables.append(where)
        elif _TABLE.match(line):
            where = None
        elif where is not None and (m := _KEY.match(line)):
            where.setdefault(m.group(1).strip('"'), n)
    return tables


def parse_budgets(raw: Any, *, source: str | None = None, text: str = "",
                  rule_names: Iterable[str] = ()) -> tuple[Budget, ...]:
    """Validate the ``budgets`` array of a policy file; a ``PolicyError`` names the file, line, key."""
    from busted.policy.rules import _rule

    lines = _budget_lines(text)
    taken = set(rule_names)

    def err(msg: str, key: str | None, i: int | None) -> PolicyError:
        line = None
        if i is not None and i < len(lines):
            line = lines[i].get(key, lines[i].get(None))
        return PolicyError(msg, path=source, line=line, key=key)

    if not isinstance(raw, list):
        raise err("'budgets' must be an array of tables ([[budgets]])", "budgets", None)
    out: list[Budget] = []
    names: set[str] = set()
    for i, b in enumerate(raw):
        def e(msg: str, key: str | None = None, i: int = i) -> PolicyError:
            return err(msg, key, i)

        if not isinstance(b, Mapping):
            raise e(f"budgets[{i}] is not a table", "budgets")
        for k in b:
            if k not in BUDGET_KEYS:
                raise e(f"unknown key {k!r} in budgets[{i}] (keys: {', '.join(BUDGET_KEYS)})", k)
        name = b.get("name")
        if not isinstance(name, str) or not name.strip():
            raise e(f"budgets[{i}] needs a name (a non-empty string)", "name")
        if name in names:
            raise e(f"budget name {name!r} used twice", "name")
        if name in taken:
            raise e(f"budget name {name!r} is also a rule's name (decisions name either)", "name")
        names.add(name)
        per = b.get("per")
        if per not in PER:
            raise e(f"budget {name!r}: per must be one of {', '.join(PER)}, not {per!r}", "per")
        action = b.get("action", "audit")
        if action not in BUDGET_ACTIONS:
            raise e(f"budget {name!r}: action must be one of {', '.join(BUDGET_ACTIONS)}, not {action!r}", "action")
        if "window" not in b:
            raise e(f"budget {name!r} has no window (e.g. window = \"1d\")", "window")
        try:
            window_s = parse_window(b["window"])
        except ValueError as exc:
            raise e(f"budget {name!r}: {exc}", "window") from None
        lt, lu = b.get("limit_tokens"), b.get("limit_usd")
        if lt is None and lu is None:
            raise e(f"budget {name!r} has no limit: give limit_tokens and/or limit_usd", "limit_tokens")
        if lt is not None and (isinstance(lt, bool) or not isinstance(lt, int) or lt <= 0):
            raise e(f"budget {name!r}: limit_tokens must be a positive whole number, not {lt!r}", "limit_tokens")
        if lu is not None and (isinstance(lu, bool) or not isinstance(lu, int | float) or not math.isfinite(lu)
                               or lu <= 0):
            raise e(f"budget {name!r}: limit_usd must be a positive number of dollars, not {lu!r}", "limit_usd")
        agent = None
        if "agent" in b:
            vals = b["agent"] if isinstance(b["agent"], list) else [b["agent"]]
            if not vals or any(not isinstance(v, str) or not v for v in vals):
                raise e(f"budget {name!r}: agent is an agent id or a list of them (e.g. 'claude-code')", "agent")
            agent = tuple(vals)
        rule_keys = {k: v for k, v in b.items() if k in BUDGET_MATCH_KEYS and k != "agent"}
        match = _rule({"name": name, "action": "audit", **rule_keys}, i,
                      lambda msg, key=None: e(msg.replace("rule ", "budget ", 1).replace("rules[", "budgets["), key))
        out.append(Budget(name=name, per=per, window_s=window_s, action=action, limit_tokens=lt,
                          limit_usd=float(lu) if lu is not None else None, match=match, agent=agent,
                          window=b["window"].strip(), line=lines[i].get(None) if i < len(lines) else None))
    return tuple(out)


def describe_budgets(policy: Any) -> str:
    """The budgets as understood, and which the kernel enforces (``busted policy check``)."""
    budgets = policy.budgets
    idx, why = kernel_budgets(budgets, len(policy.rules))
    out = [f"{len(budgets)} budget(s), fixed windows aligned to the UNIX epoch (UTC):"]
    for i, b in enumerate(budgets, 1):
        at = f"  (line {b.line})" if b.line else ""
        if b.action == "audit":
            note = "reported when exhausted; nothing refused"
        elif b.name in idx:
            note = (f"with --enforce, held in the kernel: once exhausted, new connections of that {b.per} "
                    "to its destinations are refused until the window ends")
        else:
            note = why.get(b.name) or ""
        out.append(f"{i:>3}. {b.describe(None)}{at}\n        {note}")
    return "\n".join(out)


def kernel_budgets(budgets: Iterable[Budget], nrules: int) -> tuple[dict[str, int], dict[str, str]]:
    """Which budgets the kernel enforces: name -> kernel index j; and name -> why not (deny budgets
    the kernel cannot hold). Audit budgets are in neither."""
    idx: dict[str, int] = {}
    why: dict[str, str] = {}
    for b in budgets:
        if b.action != "deny":
            continue
        reason = b.kernel_reason()
        if reason is None and len(idx) >= MAX_KERNEL_BUDGETS:
            reason = f"more than {MAX_KERNEL_BUDGETS} deny budgets: the kernel holds the first {MAX_KERNEL_BUDGETS}"
        if reason is None and kernel_bit(len(idx)) < nrules:
            reason = "rules and budgets together need more than 62 destination bits"
        if reason is None:
            idx[b.name] = len(idx)
        else:
            why[b.name] = reason + ": enforced as audit"
    return idx, why


def compile_budgets(policy: Any, catalog: Any, add_name: Callable[..., None], add_cidr: Callable[[str, int], None],
                    notes: list[str]) -> dict[str, int]:
    """Give each kernel budget's destinations its bit (busted.policy.enforce.compile_policy calls this
    before folding names). Returns name -> kernel index."""
    budgets = getattr(policy, "budgets", ())
    idx, why = kernel_budgets(budgets, len(policy.rules))
    notes.extend(f"budget {n}: {w}" for n, w in why.items())
    for b in budgets:
        j = idx.get(b.name)
        if j is None:
            continue
        bit = 1 << kernel_bit(j)
        m = b.match
        provs = [catalog.providers[p] for p in (m.provider or ()) if p in catalog.providers]
        missing = [p for p in (m.provider or ()) if p not in catalog.providers]
        if missing:
            notes.append(f"budget {b.name}: provider {', '.join(missing)} is not in the catalog: never refused")
        if m.provider is None and m.hostname is None:
            provs = list(catalog.providers.values())
        if m.hostname is None:
            for p in provs:
                for h in p.hostnames:
                    add_name(h, bit, False)
                for s in p.suffixes:
                    add_name(s, bit, True)
                for cidr in p.cidrs:
                    add_cidr(cidr, bit)
        else:
            for h in m.hostname:
                if h.startswith("*."):
                    add_name(h[2:], bit, True, False)
                else:
                    add_name(h, bit, False)
    return idx


# -- accounting ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    """Refuse new connections of (``kind``, ``value``) to kernel budget ``index``'s destinations
    until UNIX time ``until``."""

    index: int
    kind: int
    value: int
    until: float
    budget: str


@dataclass(frozen=True)
class Unblock:
    index: int
    kind: int
    value: int


@dataclass
class _Spend:
    start: float
    end: float
    tokens: int = 0
    usd: float = 0.0
    calls: int = 0
    unpriced: int = 0
    exceeded: bool = False


def call_tokens(ev: LlmCall) -> int:
    if ev.total_tokens is not None:
        return max(0, ev.total_tokens)
    return max(0, ev.input_tokens or 0) + max(0, ev.output_tokens or 0)


class BudgetBook:
    """LlmCall events in; ``BudgetSpend``/``BudgetExceeded`` events and kernel commands out.

    ``kernel``: budget name -> kernel index, for the budgets the kernel enforces (empty in a dry
    run). ``cgroup_path`` maps a cgroup id to its path (for cgroup/container match keys).
    ``max_scopes`` bounds the scopes tracked per window (the oldest are forgotten; counted in
    ``dropped``).
    """

    def __init__(self, budgets: Iterable[Budget], *, kernel: Mapping[str, int] | None = None,
                 not_kernel: Mapping[str, str] | None = None,
                 cgroup_path: Callable[[int], str | None] | None = None, max_scopes: int = 65536) -> None:
        self.budgets = tuple(budgets)
        self.kernel = dict(kernel or {})
        self.not_kernel = dict(not_kernel or {})
        self._cgroup_path = cgroup_path
        self._spend: dict[tuple[str, str], _Spend] = {}
        self._blocked: dict[tuple[int, int, int], float] = {}  # (index, kind, value) -> until
        self.max_scopes = max_scopes
        self.dropped = 0
        self._needs_cgroup = any(b.match.cgroup is not None or b.match.container is not None
                                 or b.per == "container" for b in self.budgets)

    def __bool__(self) -> bool:
        return bool(self.budgets)

    def _note(self, b: Budget) -> str | None:
        if b.action != "deny":
            return None
        return self.not_kernel.get(b.name) or (None if b.name in self.kernel else "dry run: nothing is enforced")

    def _slot(self, b: Budget, scope: str, wall: float) -> _Spend:
        key = (b.name, scope)
        s = self._spend.get(key)
        if s is None or wall >= s.end:  # a late call (wall < s.start) counts in the current window
            start, end = window_of(wall, b.window_s)
            if s is None and len(self._spend) >= self.max_scopes:
                self._spend.pop(next(iter(self._spend)))
                self.dropped += 1
            s = self._spend[key] = _Spend(start, end)
        return s

    def feed(self, events: Iterable[Event]) -> tuple[list[Event], list[Block | Unblock]]:
        from busted.policy.rules import Subject

        out: list[Event] = []
        cmds: list[Block | Unblock] = []
        if not self.budgets:
            return out, cmds
        for ev in events:
            if not isinstance(ev, LlmCall) or ev.direction != Direction.CONNECT:
                continue
            path = self._cgroup_path(ev.cgroup_id) if self._needs_cgroup and self._cgroup_path and ev.cgroup_id \
                else None
            subj = None
            for b in self.budgets:
                if b.agent is not None and ev.agent not in b.agent:
                    continue
                if subj is None:
                    subj = Subject.of_flow(ev, _constant_path(path) if path else None,
                                           model=ev.request_model or ev.response_model)
                if b.match.matches(subj) is None:
                    continue
                scope = b.scope_of(ev, path)
                if scope is None:
                    continue
                s = self._slot(b, scope, ev.wall_time)
                s.tokens += call_tokens(ev)
                s.calls += 1
                if ev.cost_usd is None:
                    s.unpriced += 1
                else:
                    s.usd += max(0.0, ev.cost_usd)
                out.append(self._spend_event(b, scope, s, ev.ts_ns, ev.wall_time))
                if not s.exceeded and self._exhausted(b, s):
                    s.exceeded = True
                    out.append(self._exceeded(b, scope, s, ev))
                    cmds.extend(self._block(b, scope, s))
        return out, cmds

    @staticmethod
    def _exhausted(b: Budget, s: _Spend) -> bool:
        return ((b.limit_tokens is not None and s.tokens >= b.limit_tokens)
                or (b.limit_usd is not None and s.usd >= b.limit_usd))

    def _block(self, b: Budget, scope: str, s: _Spend) -> list[Block]:
        j = self.kernel.get(b.name)
        if j is None:
            return []
        kind = _KIND[b.per]
        value = 0 if b.per == "host" else scope_hash(scope) if b.per in ("exe", "container") else int(scope)
        self._blocked[(j, kind, value)] = s.end
        return [Block(j, kind, value, s.end, b.name)]

    def _spend_event(self, b: Budget, scope: str, s: _Spend, ts_ns: int, wall: float) -> BudgetSpend:
        return BudgetSpend(ts_ns=ts_ns, wall_time=wall, budget=b.name, per=b.per, scope=scope,
                           window_start=s.start, window_end=s.end, tokens=s.tokens, usd=round(s.usd, 9),
                           calls=s.calls, unpriced_calls=s.unpriced, limit_tokens=b.limit_tokens,
                           limit_usd=b.limit_usd)

    def _exceeded(self, b: Budget, scope: str, s: _Spend, ev: LlmCall) -> BudgetExceeded:
        return BudgetExceeded(
            ts_ns=ev.ts_ns, wall_time=ev.wall_time, budget=b.name, action=b.action,
            enforced=b.name in self.kernel, per=b.per, scope=scope, window_start=s.start, window_end=s.end,
            tokens=s.tokens, usd=round(s.usd, 9), limit_tokens=b.limit_tokens, limit_usd=b.limit_usd,
            note=self._note(b), flow_id=ev.flow_id, pid=ev.pid, uid=ev.uid, comm=ev.comm, exe=ev.exe,
            cgroup_id=ev.cgroup_id, agent=ev.agent, container_id=ev.container_id, provider=ev.provider,
            model=ev.request_model or ev.response_model)

    def expire(self, now_wall: float) -> list[Unblock]:
        """Forget windows that ended; the kernel entries of ended blocks go too (the kernel
        already ignores them past their end: this only frees map room)."""
        for key in [k for k, s in self._spend.items() if now_wall >= s.end]:
            del self._spend[key]
        gone = [k for k, until in self._blocked.items() if now_wall >= until]
        for k in gone:
            del self._blocked[k]
        return [Unblock(*k) for k in gone]

    def seed(self, spends: Iterable[BudgetSpend | Mapping[str, Any]], now_wall: float) -> list[Block]:
        """Restore spend from stored ``BudgetSpend`` records (the latest per budget x scope wins):
        only those of a budget with the same name, per and window, in the window holding
        ``now_wall``. Returns the blocks for scopes already exhausted."""
        by_name = {b.name: b for b in self.budgets}
        latest: dict[tuple[str, str], Mapping[str, Any]] = {}
        for r in spends:
            d = r.to_dict() if isinstance(r, BudgetSpend) else r
            b = by_name.get(d.get("budget"))  # type: ignore[arg-type]
            if b is None or d.get("per") != b.per:
                continue
            start, end = window_of(now_wall, b.window_s)
            if (d.get("window_start"), d.get("window_end")) != (start, end):
                continue
            key = (b.name, str(d.get("scope")))
            old = latest.get(key)
            if old is None or (d.get("calls") or 0) >= (old.get("calls") or 0):
                latest[key] = d
        cmds: list[Block] = []
        for (name, scope), d in latest.items():
            b = by_name[name]
            start, end = window_of(now_wall, b.window_s)
            s = self._spend[(name, scope)] = _Spend(start, end, int(d.get("tokens") or 0), float(d.get("usd") or 0.0),
                                                    int(d.get("calls") or 0), int(d.get("unpriced_calls") or 0))
            if self._exhausted(b, s):
                s.exceeded = True
                try:
                    cmds.extend(self._block(b, scope, s))
                except ValueError:
                    continue
        return cmds

    def rebuild(self, budgets: Iterable[Budget], kernel: Mapping[str, int], not_kernel: Mapping[str, str],
                now_wall: float) -> tuple[BudgetBook, list[Block]]:
        """A book for a reloaded policy that keeps this one's spend (budgets of the same name,
        per and window) and the blocks its exhausted scopes need under the new kernel indexes."""
        new = BudgetBook(budgets, kernel=kernel, not_kernel=not_kernel, cgroup_path=self._cgroup_path,
                         max_scopes=self.max_scopes)
        old = {b.name: b for b in self.budgets}
        rows = []
        for (name, scope), s in self._spend.items():
            b = old.get(name)
            if b is None:
                continue
            nb = next((x for x in new.budgets if x.name == name), None)
            if nb is None or (nb.per, nb.window_s) != (b.per, b.window_s):
                continue
            rows.append({"budget": name, "per": b.per, "scope": scope, "window_start": s.start,
                         "window_end": s.end, "tokens": s.tokens, "usd": s.usd, "calls": s.calls,
                         "unpriced_calls": s.unpriced})
        return new, new.seed(rows, now_wall)

    def snapshot(self) -> list[dict[str, Any]]:
        """Spend against limits, one dict per budget x scope with spend in the current window (for
        ``top``, Prometheus and the web page)."""
        by_name = {b.name: b for b in self.budgets}
        out = []
        for (name, scope), s in self._spend.items():
            b = by_name[name]
            out.append({"budget": name, "per": b.per, "scope": scope, "action": b.action,
                        "enforced": name in self.kernel, "window": b.window, "window_start": s.start,
                        "window_end": s.end, "tokens": s.tokens, "usd": round(s.usd, 9), "calls": s.calls,
                        "limit_tokens": b.limit_tokens, "limit_usd": b.limit_usd, "exceeded": s.exceeded})
        return out


def budget_table(rows: Iterable[Mapping[str, Any]], limit: int = 30) -> str:
    """``BudgetBook.snapshot()`` rows as text for ``busted top``: most used first (spend over limit).
    Scope values come from the wire and /proc: escaped for a terminal."""
    from busted._text import printable

    def used(r: Mapping[str, Any]) -> float:
        parts = [r["tokens"] / r["limit_tokens"] if r.get("limit_tokens") else 0.0,
                 r["usd"] / r["limit_usd"] if r.get("limit_usd") else 0.0]
        return max(parts)

    rows = sorted(rows, key=lambda r: -used(r))
    lines = [f"{'BUDGET':<20} {'PER':<9} {'SCOPE':<24} {'TOKENS':>15} {'USD':>17} {'USED':>5} {'WINDOW':>6}  STATE"]
    for r in rows[:limit]:
        tok = f"{r['tokens']}/{r['limit_tokens']}" if r.get("limit_tokens") else str(r["tokens"])
        usd = f"{r['usd']:.2f}/{r['limit_usd']:.2f}" if r.get("limit_usd") else f"{r['usd']:.2f}"
        state = ("refused" if r["enforced"] else "exceeded") if r["exceeded"] else "ok"
        scope = printable(str(r["scope"]))
        scope = scope if len(scope) <= 24 else "…" + scope[-23:]
        lines.append(f"{printable(r['budget'])[:20]:<20} {r['per']:<9} {scope:<24} {tok:>15} {usd:>17} "
                     f"{used(r):>5.0%} {r['window']:>6}  {state}")
    return "\n".join(lines)


def _constant_path(path: str) -> Callable[[int], str | None]:
    """A cgroup-path reader that knows one path: the call's, read once for every budget."""
    return lambda _cgroup_id: path

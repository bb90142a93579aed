"""Policies: which processes may talk to which LLM providers. Pure: no I/O beyond reading the file.

    default = "audit"                 # allow | audit | deny
    [[rules]]
    name = "nobody-calls-deepseek"
    action = "deny"
    provider = "deepseek"             # a string or a list

Rules are tried in order; the first whose match keys all hold decides, else ``default``. A
decision is made only for flows to an LLM provider (a ``provider`` is known) or to a host a rule
names (``hostname``): busted does not police the rest of the network. A rule without ``provider``
or ``hostname`` matches any provider.

Match keys (all optional; a list means "any of"):

* ``provider`` - catalog id (``openai``, ``anthropic``, ...)
* ``hostname`` - glob over the DNS/SNI name (``*`` spans labels: ``*.deepseek.com``)
* ``model``    - glob over the model of an LLM call; only known at the LLM request point, so a rule
  with ``model`` never matches at connect or ClientHello time
* ``comm``     - the process name (exact, as the kernel keeps it: at most 15 characters)
* ``exe``      - glob over the executable path
* ``uid``      - number or user name
* ``cgroup``   - cgroup v2 path prefix, whole components (``/system.slice`` holds
  ``/system.slice/a.service``, not ``/system.slicex``)
* ``container`` - container id prefix (from the cgroup path), when known

A value the monitor does not know (the exe of a process that exited) does not match.
``evaluate`` is the reference semantics; busted.policy.enforce compiles the same rules for the kernel.
"""

from __future__ import annotations

import difflib
import errno
import fnmatch
import pwd
import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from busted.classify.names import normalize_name
from busted.errors import PolicyError

__all__ = ["ACTIONS", "MATCH_KEYS", "MAX_KERNEL_ENTRIES", "MAX_RULES", "Decision", "Policy", "PolicyJudge", "Rule",
           "Subject", "container_of", "decision_event"]

ACTIONS = ("allow", "audit", "deny")
MATCH_KEYS = ("provider", "hostname", "model", "comm", "exe", "uid", "cgroup", "container")
_RULE_KEYS = ("name", "action", *MATCH_KEYS)
_TOP_KEYS = ("default", "rules", "budgets")
_COMM_MAX = 15  # TASK_COMM_LEN - 1
# What the kernel can hold (busted/policy/enforce.py): a rule is a bit of a 64-bit mask (two bits are
# reserved), and a rule with several uid/comm/cgroup values is one kernel entry per combination.
# Checked at every load, dry run included, so a policy that works in a dry run also enforces.
MAX_RULES = 62
MAX_KERNEL_ENTRIES = 64
_HOST_GLOB = re.compile(r"^[A-Za-z0-9*?.\-_\[\]!]+$")
_PROVIDER_ID = re.compile(r"^[a-z0-9][a-z0-9._\-]*$")


def container_of(cgroup_path: str | None) -> str | None:
    """The container id a cgroup path names, or None: the one parser events use
    (busted.classify.containers), so a rule and an event never disagree about a path."""
    from busted.classify.containers import container_of as _container_of

    return _container_of(cgroup_path).container_id


@dataclass(frozen=True)
class Subject:
    """What a decision looks at. None: not known (never matches a rule that asks for it)."""

    provider: str | None = None
    hostname: str | None = None
    model: str | None = None
    comm: str | None = None
    exe: str | None = None
    uid: int | None = None
    cgroup: str | None = None  # cgroup v2 path, e.g. "/system.slice/x.service"
    container: str | None = None

    @classmethod
    def of_flow(cls, ev: Any, cgroup_path: Callable[[int], str | None] | None = None,
                model: str | None = None) -> Subject:
        """The subject of a flow event (FlowOpened/FlowClassified/...); ``cgroup_path`` maps a
        cgroup id to its path."""
        path = cgroup_path(ev.cgroup_id) if cgroup_path is not None and ev.cgroup_id else None
        return cls(provider=ev.provider, hostname=ev.hostname, model=model, comm=ev.comm or None,
                   exe=ev.exe, uid=ev.uid, cgroup=path, container=container_of(path))


@dataclass(frozen=True)
class Rule:
    """One rule as understood. Match keys are tuples (any of) or None (not asked)."""

    name: str
    action: str
    provider: tuple[str, ...] | None = None
    hostname: tuple[str, ...] | None = None
    model: tuple[str, ...] | None = None
    comm: tuple[str, ...] | None = None
    exe: tuple[str, ...] | None = None
    uid: tuple[int, ...] | None = None
    cgroup: tuple[str, ...] | None = None
    container: tuple[str, ...] | None = None
    line: int | None = field(default=None, compare=False)
    _rx: dict[str, tuple[re.Pattern[str], ...]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for key in ("hostname", "model", "exe"):
            pats = getattr(self, key)
            if pats is not None:
                self._rx[key] = tuple(re.compile(fnmatch.translate(p.lower() if key == "hostname" else p))
                                      for p in pats)

    def match_keys(self) -> dict[str, tuple]:
        """The match keys this rule asks for."""
        return {k: getattr(self, k) for k in MATCH_KEYS if getattr(self, k) is not None}

    def matches(self, s: Subject) -> dict[str, Any] | None:
        """What matched (key -> the subject's value), or None if some key does not hold."""
        got: dict[str, Any] = {}
        if self.provider is not None:
            if s.provider not in self.provider:
                return None
            got["provider"] = s.provider
        for key in ("hostname", "model", "exe"):
            if getattr(self, key) is None:
                continue
            val = getattr(s, key)
            if val is None:
                return None
            v = normalize_name(val) if key == "hostname" else val
            if not any(rx.match(v) for rx in self._rx[key]):
                return None
            got[key] = val
        if self.comm is not None:
            if s.comm not in self.comm:
                return None
            got["comm"] = s.comm
        if self.uid is not None:
            if s.uid not in self.uid:
                return None
            got["uid"] = s.uid
        if self.cgroup is not None:
            if s.cgroup is None or not any(_under(s.cgroup, c) for c in self.cgroup):
                return None
            got["cgroup"] = s.cgroup
        if self.container is not None:
            if s.container is None or not any(s.container.startswith(c) for c in self.container):
                return None
            got["container"] = s.container
        if self.provider is None and self.hostname is None:
            if s.provider is None:  # no destination key: any provider, not the whole network
                return None
            got.setdefault("provider", s.provider)
        return got

    def describe(self) -> str:
        keys = " ".join(f"{k}={'|'.join(map(str, v))}" for k, v in self.match_keys().items())
        return f"{self.action:<5} {self.name}" + (f"  [{keys}]" if keys else "  [any provider]")


def _under(path: str, prefix: str) -> bool:
    p = prefix.rstrip("/")
    return p == "" or path == p or path.startswith(p + "/")


@dataclass(frozen=True)
class Decision:
    """The outcome of evaluating a policy: the deciding rule (``"default"`` if none) and why."""

    rule: str
    action: str
    matched: tuple[tuple[str, Any], ...] = ()


class Policy:
    """A validated policy. Build with ``load(path)``, ``loads(text)`` or ``from_dict(d)``."""

    def __init__(self, rules: tuple[Rule, ...] = (), default: str = "audit", source: str | None = None,
                 budgets: tuple[Any, ...] = ()) -> None:
        if default not in ACTIONS:
            raise PolicyError(f"default must be one of {', '.join(ACTIONS)}, not {default!r}",
                              path=source, key="default")
        self.rules = tuple(rules)
        self.default = default
        self.source = source
        self.budgets = tuple(budgets)  # busted.policy.budgets.Budget: spend limits (docs/policy.md "Budgets")
        # whether evaluating needs the flow's cgroup path (a /proc-free but not free lookup)
        self.needs_cgroup = any(r.cgroup is not None or r.container is not None for r in self.rules)

    def __repr__(self) -> str:
        return f"Policy(default={self.default!r}, rules={len(self.rules)}, source={self.source!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and (self.rules, self.default, self.budgets) == (
            other.rules, other.default, other.budgets)

    __hash__ = None  # type: ignore[assignment]

    # -- building ----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read and validate a TOML policy file. Errors (``PolicyError``) name the file, line, key.

        The file decides what root's monitor lets through, so it is read only if it and its
        directory pass the trust rule of the BPF bytecode cache: owned by this user, writable by
        no one else, not a symbolic link (busted/_safe.py)."""
        from busted._safe import Untrusted, read_text_trusted

        p = Path(path)
        try:
            text = read_text_trusted(str(p))
        except Untrusted as exc:
            raise PolicyError(f"not trusted: {exc}; fix its owner or mode (chown/chmod go-w)",
                              path=str(p)) from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PolicyError("is a symbolic link: give the file's own path (a link can be "
                                  "changed by whoever owns it)", path=str(p)) from exc
            raise PolicyError(f"cannot read policy file: {exc}", path=str(p)) from exc
        except ValueError as exc:
            raise PolicyError(f"cannot read policy file: {exc}", path=str(p)) from exc
        return cls.loads(text, source=str(p))

    @classmethod
    def loads(cls, text: str, source: str = "<string>") -> Policy:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            m = re.search(r"at line (\d+)", str(exc))
            raise PolicyError(f"not valid TOML: {exc}", path=source,
                              line=int(m.group(1)) if m else None) from exc
        return cls.from_dict(data, source=source, _lines=_KeyLines(text))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str | None = None, _lines: _KeyLines | None = None) -> Policy:
        """Validate a dict shaped like the TOML file (``{"default": ..., "rules": [...]}``)."""
        lines = _lines or _KeyLines("")

        def err(msg: str, key: str | None = None, rule: int | None = None) -> PolicyError:
            return PolicyError(msg, path=source, line=lines.line(rule, key), key=key)

        if not isinstance(d, Mapping):
            raise err("a policy is a table with 'default' and 'rules'")
        for k in d:
            if k not in _TOP_KEYS:
                raise err(f"unknown key {k!r} (expected {', '.join(_TOP_KEYS)})", key=k)
        default = d.get("default", "audit")
        if default not in ACTIONS:
            raise err(f"default must be one of {', '.join(ACTIONS)}, not {default!r}", key="default")
        raw_rules = d.get("rules", [])
        if not isinstance(raw_rules, list):
            raise err("'rules' must be an array of tables ([[rules]])", key="rules")
        rules: list[Rule] = []
        names: set[str] = set()
        for i, r in enumerate(raw_rules):
            if not isinstance(r, Mapping):
                raise err(f"rules[{i}] is not a table", key="rules")
            rule = _rule(r, i, lambda msg, key=None, i=i: err(msg, key, i))
            if rule.name in names:
                raise err(f"rule name {rule.name!r} used twice", key="name", rule=i)
            names.add(rule.name)
            rules.append(replace(rule, line=lines.line(i, None)))
        if len(rules) > MAX_RULES:
            raise err(f"{len(rules)} rules: at most {MAX_RULES} (what the kernel holds with --enforce; "
                      "the same limit applies to a dry run)", rule=MAX_RULES)
        entries = sum(len(r.uid or (0,)) * len(r.comm or ("",)) * len(r.cgroup or ("",)) for r in rules)
        if entries > MAX_KERNEL_ENTRIES:
            raise err(f"the rules expand to {entries} kernel rule entries (one per uid x comm x cgroup value "
                      f"of each rule); at most {MAX_KERNEL_ENTRIES}: split values across fewer rules", key="rules")
        return cls(tuple(rules), default, source, _budgets(d, names, source, lines.text))

    def check_providers(self, known: Collection[str]) -> None:
        """Refuse a ``provider`` that is not one of ``known`` (catalog ids): such a rule would
        silently never match. The error suggests the nearest id."""
        for r in self.rules:
            for pid in r.provider or ():
                if pid in known:
                    continue
                near = difflib.get_close_matches(pid, sorted(known), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f" (known: {', '.join(sorted(known))})"
                raise PolicyError(f"rule {r.name!r}: provider {pid!r} is not in the provider catalog{hint}",
                                  path=self.source, line=r.line, key="provider")

    # -- deciding ----------------------------------------------------------------------------

    def evaluate(self, s: Subject, *, known_model: bool = False) -> Decision | None:
        """The first matching rule's decision, the default for a provider flow, or None when the
        subject is not the policy's business (no provider, no rule names its host). Rules with
        ``model`` are skipped unless ``known_model`` (the LLM request point)."""
        for r in self.rules:
            if r.model is not None and not known_model:
                continue
            got = r.matches(s)
            if got is not None:
                return Decision(r.name, r.action, tuple(got.items()))
        if s.provider is None:
            return None
        return Decision("default", self.default, (("provider", s.provider),))

    def describe(self) -> str:
        """The rules as understood, one per line (what ``busted policy check`` prints)."""
        out = [f"policy {self.source or '<dict>'}: {len(self.rules)} rule(s), first match wins"]
        from busted.policy.enforce import exe_key

        for i, r in enumerate(self.rules, 1):
            at = f"  (line {r.line})" if r.line else ""
            out.append(f"{i:>3}. {r.describe()}{at}")
            bad = [p for p in r.exe or () if exe_key(p) is None]
            if bad:
                out.append(f"        exe {', '.join(bad)}: user space only (the kernel matches an exact path or a "
                           "path ending in one '*'): " + ("reported, not enforced" if r.action == "deny"
                                                          else "ends the kernel's search"))
        out.append(f"  -  {self.default:<5} default  [any other provider flow]")
        if self.budgets:
            from busted.policy.budgets import describe_budgets

            out.append(describe_budgets(self))
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"default": self.default, "rules": [
            {"name": r.name, "action": r.action, **{k: list(v) for k, v in r.match_keys().items()}}
            for r in self.rules]}


def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, list | tuple) else [v]


def _check_glob(p: str, what: str) -> str | None:
    """Why ``p`` is not a usable glob, or None."""
    if not p:
        return f"empty {what} pattern"
    depth = 0
    for ch in p:
        if ch == "[":
            if depth:
                return f"{what} pattern {p!r}: nested '['"
            depth = 1
        elif ch == "]" and depth:
            depth = 0
    if depth:
        return f"{what} pattern {p!r}: '[' without ']'"
    return None


def _rule(r: Mapping[str, Any], i: int, err: Callable[..., PolicyError]) -> Rule:
    for k in r:
        if k not in _RULE_KEYS:
            raise err(f"unknown key {k!r} in rules[{i}] (match keys: {', '.join(MATCH_KEYS)})", k)
    name = r.get("name", f"rule-{i + 1}")
    if not isinstance(name, str) or not name.strip():
        raise err("rule name must be a non-empty string", "name")
    if "action" not in r:
        raise err(f"rule {name!r} has no action (one of {', '.join(ACTIONS)})", "action")
    action = r["action"]
    if action not in ACTIONS:
        raise err(f"rule {name!r}: action must be one of {', '.join(ACTIONS)}, not {action!r}", "action")
    out: dict[str, Any] = {"name": name, "action": action}
    for key in MATCH_KEYS:
        if key not in r:
            continue
        vals = _as_list(r[key])
        if not vals:
            raise err(f"rule {name!r}: {key} is an empty list (leave the key out to match anything)", key)
        if key == "uid":
            uids = []
            for v in vals:
                if isinstance(v, bool) or not isinstance(v, int | str):
                    raise err(f"rule {name!r}: uid must be a number or user name, not {v!r}", key)
                if isinstance(v, str):
                    try:
                        v = pwd.getpwnam(v).pw_uid
                    except KeyError:
                        raise err(f"rule {name!r}: no user named {v!r}", key) from None
                if not 0 <= v < 2**32:
                    raise err(f"rule {name!r}: uid {v} out of range", key)
                uids.append(v)
            out[key] = tuple(uids)
            continue
        for v in vals:
            if not isinstance(v, str) or not v:
                raise err(f"rule {name!r}: {key} values must be non-empty strings, not {v!r}", key)
        if key == "provider":
            bad = [v for v in vals if not _PROVIDER_ID.match(v)]
            if bad:
                raise err(f"rule {name!r}: {bad[0]!r} is not a provider id (lower case, e.g. 'openai')", key)
        elif key == "hostname":
            vals = [normalize_name(v) for v in vals]  # IDNA to A-labels first: what the wire carries
            for v in vals:
                why = _check_glob(v, "hostname")
                if why is None and not _HOST_GLOB.match(v):
                    why = f"hostname pattern {v!r} has characters no host name has"
                if why:
                    raise err(f"rule {name!r}: {why}", key)
        elif key in ("exe", "model"):
            for v in vals:
                why = _check_glob(v, key)
                if why:
                    raise err(f"rule {name!r}: {why}", key)
            if key == "exe" and any(not (v.startswith("/") or v.startswith("*")) for v in vals):
                raise err(f"rule {name!r}: exe patterns are paths ('/usr/bin/curl', '*/python3*')", key)
        elif key == "comm":
            long = [v for v in vals if len(v.encode()) > _COMM_MAX]
            if long:
                raise err(f"rule {name!r}: comm {long[0]!r} is longer than the kernel's {_COMM_MAX} "
                          "characters (the kernel truncates process names; use exe for paths)", key)
        elif key == "cgroup":
            if any(not v.startswith("/") for v in vals):
                raise err(f"rule {name!r}: cgroup is a path under the cgroup v2 mount, starting with '/'", key)
            vals = [v.rstrip("/") or "/" for v in vals]
        elif key == "container":
            if any(not re.fullmatch(r"[0-9a-f]{1,64}", v) for v in vals):
                raise err(f"rule {name!r}: container is a hex id prefix", key)
        out[key] = tuple(vals)
    return Rule(**out)


def _budgets(d: Mapping[str, Any], rule_names: set[str], source: str | None, text: str) -> tuple[Any, ...]:
    """The ``[[budgets]]`` tables (busted.policy.budgets), if any."""
    if "budgets" not in d:
        return ()
    from busted.policy.budgets import parse_budgets

    return parse_budgets(d["budgets"], source=source, text=text, rule_names=rule_names)


class _KeyLines:
    """Line numbers of keys in TOML text, by rule index (tomllib keeps none). Covers the
    ``[[rules]]`` form; other forms fall back to the line of the rules table or no line."""

    _HEADER = re.compile(r"^\s*\[\[\s*rules\s*\]\]")
    _TABLE = re.compile(r"^\s*\[")
    _KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=")

    def __init__(self, text: str) -> None:
        self.text = text
        self.top: dict[str, int] = {}
        self.rules: list[dict[str | None, int]] = []
        where: dict[str | None, int] | None = self.top  # type: ignore[assignment]
        for n, line in enumerate(text.splitlines(), 1):
            if self._HEADER.match(line):
                where = {None: n}
                self.rules.append(where)
                continue
            if self._TABLE.match(line):
                where = None
                continue
            m = self._KEY.match(line)
            if m and where is not None:
                where.setdefault(m.group(1).strip('"'), n)

    def line(self, rule: int | None, key: str | None) -> int | None:
        if rule is None:
            return self.top.get(key) if key else None
        if rule < len(self.rules):
            r = self.rules[rule]
            return r.get(key, r.get(None))
        return self.top.get("rules")


class PolicyJudge:
    """Flow events in, the same events plus ``PolicyDecision`` out: the user-space evaluation.

    Sans-I/O. It judges connected flows (``Direction.CONNECT``) when they open and again when they
    are reclassified (point ``tls_client_hello`` when the SNI decided, else ``connect``), and each
    LLM call with its model (point ``llm_request``, where ``model`` rules can match), and reports
    a decision when it differs from the last one reported for that flow (or names the model). ``enforced`` is always
    False here: only the kernel enforces. ``kernel_rules``: deny rules the kernel enforces at the
    ClientHello; their TLS-point decisions come from the kernel, so they are not repeated here. A
    ``default`` allow is not reported (nothing to say); explicit allow rules are.
    """

    def __init__(self, policy: Policy, *, cgroup_path: Callable[[int], str | None] | None = None,
                 kernel_rules: frozenset[str] = frozenset(), max_flows: int = 65536) -> None:
        from cachetools import LRUCache

        self.policy = policy
        self.kernel_rules = kernel_rules
        self._cgroup_path = cgroup_path
        self._last: LRUCache[int, tuple[str, str]] = LRUCache(maxsize=max_flows)

    def feed(self, events: list[Any]) -> list[Any]:
        from busted.events import Direction, Evidence, FlowClassified, FlowClosed, FlowOpened, LlmCall

        out: list[Any] = []
        for ev in events:
            out.append(ev)
            if isinstance(ev, LlmCall):
                # The model is known now (read from the request): rules with ``model`` can match.
                # Reported after the fact: the request has been sent (docs/policy.md).
                model = ev.request_model or ev.response_model
                pol = self.policy
                d = pol.evaluate(Subject.of_flow(ev, self._cgroup_path if pol.needs_cgroup else None,
                                                 model=model), known_model=True)
                if d is not None and not (d.rule == "default" and d.action == "allow") and (
                        any(k == "model" for k, _v in d.matched) or self._last.get(ev.flow_id) != (d.rule, d.action)):
                    self._last[ev.flow_id] = (d.rule, d.action)
                    out.append(decision_event(ev, d, "llm_request"))
                continue
            if isinstance(ev, FlowClosed):
                self._last.pop(ev.flow_id, None)
                continue
            if not isinstance(ev, FlowOpened | FlowClassified) or ev.direction != Direction.CONNECT:
                continue
            if ev.provider is None and ev.hostname is None:
                continue  # fast path (every non-LLM flow): evaluate() would say None
            point = "tls_client_hello" if ev.evidence == Evidence.SNI and isinstance(ev, FlowClassified) else "connect"
            pol = self.policy
            d = pol.evaluate(Subject.of_flow(ev, self._cgroup_path if pol.needs_cgroup else None))
            if d is None or (d.rule == "default" and d.action == "allow"):
                continue
            if self._last.get(ev.flow_id) == (d.rule, d.action):
                continue
            self._last[ev.flow_id] = (d.rule, d.action)
            if point == "tls_client_hello" and d.action == "deny" and d.rule in self.kernel_rules:
                continue  # the kernel decided and reports it
            out.append(decision_event(ev, d, point))
        return out


def decision_event(ev: Any, d: Decision, point: str, enforced: bool = False) -> Any:
    """A ``PolicyDecision`` for flow event ``ev``."""
    from busted.events import PolicyDecision

    return PolicyDecision(
        ts_ns=ev.ts_ns, wall_time=ev.wall_time, rule=d.rule, action=d.action, enforced=enforced,
        point=point, matched=d.matched, flow_id=ev.flow_id, pid=ev.pid, tid=ev.tid, uid=ev.uid,
        comm=ev.comm, exe=ev.exe, cgroup_id=ev.cgroup_id, daddr=ev.daddr, dport=ev.dport,
        hostname=ev.hostname, provider=ev.provider)

"""The agent catalog: which processes are AI agents (coding agents, their CLIs, notebook kernels,
agent frameworks), recognised from what a process is, not from what it says about itself.

The built-in catalog ships as ``busted/classify/data/agents.json``; users extend or override it
from a file (``AgentCatalog.from_file``) or from Python (``catalog.add(Agent(...))``); an entry
with the id of a built-in one replaces it. See docs/agents.md.

Evidence, strongest first (``AgentMatch.via``):

* ``exe`` — the executable's file name equals one of ``names`` (``claude``, ``codex``), or its
  path matches one of ``exe_globs`` (``*/.local/share/claude/versions/*``). For a script the
  executable is the script (the path given to ``execve``), not its interpreter.
* ``package`` — an argument (a script path run by node/python) contains one of ``packages``, a
  path fragment of the agent's installed package (``node_modules/@anthropic-ai/claude-code/``).
* ``module`` — a Python started as ``python -m <module>`` whose module is one of ``modules`` or
  a submodule of one (``aider``, ``ipykernel_launcher``).
* ``argv`` — one argument matches one of ``argv_globs`` (``--type=extensionHost``).

Globs: ``*`` is any run of characters (``/`` included), ``?`` one character; matched against the
whole string. Everything matched is attacker-controlled (anyone can name a script ``claude``): an
agent label is attribution for people, not an access decision.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from cachetools import LRUCache

from busted.classify import catalogfile

__all__ = ["AGENT_KINDS", "Agent", "AgentCatalog", "AgentMatch", "EVIDENCE"]

AGENT_KINDS = ("coding-agent", "ide-extension", "notebook", "framework", "cli")
EVIDENCE = ("exe", "package", "module", "argv")

_MAX_ARGS = 8  # arguments looked at per process: agents show themselves in the first few
_MAX_ARG_LEN = 1024


@dataclass(frozen=True)
class Agent:
    id: str
    name: str
    kind: str  # one of AGENT_KINDS
    names: tuple[str, ...] = ()  # executable file names, exact
    exe_globs: tuple[str, ...] = ()  # globs on the executable's path
    packages: tuple[str, ...] = ()  # path fragments of the installed package, found in an argument
    modules: tuple[str, ...] = ()  # ``python -m <module>``
    argv_globs: tuple[str, ...] = ()  # globs on one argument
    source: str = ""  # where the install layout is documented

    def __post_init__(self) -> None:
        if not self.id or not isinstance(self.id, str):
            raise ValueError("agent id must be a non-empty string")
        if self.kind not in AGENT_KINDS:
            raise ValueError(f"agent {self.id!r}: kind {self.kind!r} is not one of {AGENT_KINDS}")
        if not (self.names or self.exe_globs or self.packages or self.modules or self.argv_globs):
            raise ValueError(f"agent {self.id!r}: needs at least one of names/exe_globs/packages/modules/argv_globs")
        for group in (self.names, self.exe_globs, self.packages, self.modules, self.argv_globs):
            if isinstance(group, str) or not all(isinstance(x, str) and x for x in group):
                raise ValueError(f"agent {self.id!r}: evidence lists must hold non-empty strings")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Agent:
        known = set(cls.__dataclass_fields__)
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown agent field(s) {sorted(extra)}")
        kw: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kw)


@dataclass(frozen=True)
class AgentMatch:
    agent: Agent
    via: str  # one of EVIDENCE
    matched: str  # the rule that matched (a name, glob, package fragment or module)

    @property
    def id(self) -> str:
        return self.agent.id


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")
_INTERPRETERS = re.compile(r"^(python(\d+(\.\d+)?)?|node|nodejs|bun|deno)$")


def script_of(argv: Sequence[str]) -> str | None:
    """The script an interpreter runs (``python3 /venv/bin/aider``, ``node cli.js``), else None."""
    if len(argv) < 2 or not _INTERPRETERS.match(_basename(argv[0])):
        return None
    for a in argv[1:_MAX_ARGS]:
        if a in ("-c", "-e", "-m", "-", "--eval", "-p", "--print"):
            return None
        if not a.startswith("-"):
            return a
    return None


def python_module(argv: Sequence[str]) -> str | None:
    """The module of ``python [opts] -m MODULE ...`` (also ``-mMODULE``), else None."""
    if not argv or not _PYTHON.match(_basename(argv[0])):
        return None
    skip = False
    for i, a in enumerate(argv[1:_MAX_ARGS], start=1):
        if skip:
            skip = False
            continue
        if a in ("-X", "-W", "--check-hash-based-pycs"):  # options that take a value
            skip = True
            continue
        if a == "-m":
            return argv[i + 1] if i + 1 < len(argv) else None
        if a.startswith("-m") and len(a) > 2:
            return a[2:]
        if a in ("-c", "-") or not a.startswith("-"):
            return None  # a script, -c code or stdin: not -m
    return None


@dataclass
class AgentCatalog:
    agents: dict[str, Agent] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._reindex()

    # -- building ----------------------------------------------------------------------------

    @classmethod
    def builtin(cls) -> AgentCatalog:
        text = resources.files("busted.classify").joinpath("data/agents.json").read_text()
        return cls._from_json(json.loads(text), "built-in agent catalog")

    @classmethod
    def from_file(cls, path: str | Path, *, base: AgentCatalog | None = None) -> AgentCatalog:
        """Load agents from JSON or TOML (``{"agents": [...]}``) on top of ``base`` (default: the
        built-in catalog; pass ``AgentCatalog()`` for none). Raises CatalogError (a ValueError) naming
        the problem."""
        data = catalogfile.read(path, "agent catalog")
        cat = cls(dict((base if base is not None else cls.builtin()).agents))
        cat.extend(cls._from_json(data, str(path)).agents.values())
        return cat

    @classmethod
    def _from_json(cls, data: Any, where: str) -> AgentCatalog:
        return cls({a.id: a for a in catalogfile.entries(data, "agents", where, Agent.from_dict, article="an")})

    def add(self, agent: Agent) -> None:
        """Add or replace (same id) one agent."""
        self.agents[agent.id] = agent
        self._reindex()

    def extend(self, agents: Iterable[Agent]) -> None:
        for a in agents:
            self.agents[a.id] = a
        self._reindex()

    def __len__(self) -> int:
        return len(self.agents)

    def _reindex(self) -> None:
        self._names: dict[str, Agent] = {}
        self._modules: dict[str, Agent] = {}
        self._exe_globs: list[tuple[re.Pattern[str], str, Agent]] = []
        self._argv_globs: list[tuple[re.Pattern[str], str, Agent]] = []
        self._packages: list[tuple[str, Agent]] = []
        for a in self.agents.values():
            for n in a.names:
                self._names[n] = a
            for m in a.modules:
                self._modules[m] = a
            for g in a.exe_globs:
                self._exe_globs.append((re.compile(fnmatch.translate(g), re.S), g, a))
            for g in a.argv_globs:
                self._argv_globs.append((re.compile(fnmatch.translate(g), re.S), g, a))
            for p in a.packages:
                self._packages.append((p, a))
        # Processes repeat (every flow of a long-lived agent): a bounded memo.
        self._memo: LRUCache[tuple, AgentMatch | None] = LRUCache(maxsize=4096)

    # -- matching ----------------------------------------------------------------------------

    def match(self, exe: str | None, argv: Sequence[str] | None = None) -> AgentMatch | None:
        """The agent this process is, by the strongest evidence, or None. Never raises."""
        args = tuple(a[:_MAX_ARG_LEN] for a in (argv or ())[:_MAX_ARGS] if isinstance(a, str))
        key = (exe, args)
        hit = self._memo.get(key, _MISS)
        if hit is not _MISS:
            return hit  # type: ignore[return-value]
        res = self._match(exe if isinstance(exe, str) else None, args)
        self._memo[key] = res
        return res

    def _match(self, exe: str | None, args: tuple[str, ...]) -> AgentMatch | None:
        # The executable: what execve ran, and argv[0] when it names a path (a login shell's "-bash"
        # or a renamed process title is not evidence).
        exes = [e for e in (exe, args[0] if args and "/" in args[0] else None, script_of(args)) if e]
        for e in exes:
            a = self._names.get(_basename(e))
            if a is not None:
                return AgentMatch(a, "exe", _basename(e))
        for e in exes:
            for rx, g, a in self._exe_globs:
                if rx.match(e):
                    return AgentMatch(a, "exe", g)
        for arg in args[1:]:
            for frag, a in self._packages:
                if frag in arg:
                    return AgentMatch(a, "package", frag)
        mod = python_module(args)
        if mod:
            parts = mod.split(".")
            for i in range(len(parts), 0, -1):
                a = self._modules.get(".".join(parts[:i]))
                if a is not None:
                    return AgentMatch(a, "module", ".".join(parts[:i]))
        for arg in args[1:]:
            for rx, g, a in self._argv_globs:
                if rx.match(arg):
                    return AgentMatch(a, "argv", g)
        return None


_MISS = object()

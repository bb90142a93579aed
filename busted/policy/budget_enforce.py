"""Budgets at run time: the I/O side of busted.policy.budgets. ``BudgetRunner`` feeds LLM calls to a
``BudgetBook``, carries out its commands in the kernel's ``pol_budget`` map (when enforcing), turns
window ends into clock values, and restores spend from the store at start."""

from __future__ import annotations

import dataclasses
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from busted.events import BudgetExceeded, BudgetSpend, Event
from busted.policy.budgets import Block, BudgetBook, Unblock, kernel_budgets

__all__ = ["BudgetRunner", "apply_commands"]

_MAP_FULL = "the kernel's budget map is full: this scope is not refused"


_BKEY = struct.Struct("<IIQ")  # struct pol_bkey (policy_enforce.c): budget, kind, value
_U64 = struct.Struct("<Q")


def apply_commands(table: Any, cmds: Iterable[Any]) -> list[str]:
    """Write Block/Unblock commands (``until`` already turned into ktime ns, see BudgetRunner) to
    the ``pol_budget`` map (a busted.ebpf.bpfsys.Map); ``"clear"`` empties it. Returns the budgets
    whose block did not fit."""
    from busted.ebpf.bpfsys import BpfError

    failed = []
    for c in cmds:
        if c == "clear":
            for k in list(table.keys()):
                table.delete(k)  # False if gone meanwhile
            continue
        k = _BKEY.pack(c.index, c.kind, c.value)
        if isinstance(c, Unblock):
            table.delete(k)
            continue
        try:
            table.update(k, _U64.pack(c.until_ns))
        except BpfError:  # the map is full
            failed.append(c.budget)
    return failed


@dataclasses.dataclass(frozen=True)
class _KBlock:
    index: int
    kind: int
    value: int
    until_ns: int
    budget: str


class BudgetRunner:
    """Owned by busted.policy.enforce.PolicyRuntime; driven by the Monitor's reader thread."""

    def __init__(self, policy: Any, enforcer: Any, cgroup_path: Callable[[int], str | None] | None,
                 seed: Iterable[BudgetSpend | dict[str, Any]] = ()) -> None:
        self.enforcer = enforcer
        self.map_full = 0
        self._next_expire = 0.0
        self.book = self._book(policy, cgroup_path)
        if self.book and seed:
            self._apply(self.book.seed(seed, time.time()))

    def _book(self, policy: Any, cgroup_path: Callable[[int], str | None] | None) -> BudgetBook:
        kernel: dict[str, int] = {}
        _idx, why = kernel_budgets(policy.budgets, len(policy.rules))
        if self.enforcer is not None:
            kernel = dict(self.enforcer.compiled.budgets)
        return BudgetBook(policy.budgets, kernel=kernel, not_kernel=why, cgroup_path=cgroup_path)

    def _apply(self, cmds: Sequence[Block | Unblock], clear: bool = False) -> set[str]:
        enf = self.enforcer
        if enf is None or not (cmds or clear):
            return set()
        mono, wall = time.monotonic_ns(), time.time()
        kcmds: list[Any] = ["clear"] if clear else []
        for c in cmds:
            if isinstance(c, Block):
                kcmds.append(_KBlock(c.index, c.kind, c.value, mono + max(0, int((c.until - wall) * 1e9)), c.budget))
            else:
                kcmds.append(c)
        failed = set(enf.budget_commands(kcmds))
        self.map_full += len(failed)
        return failed

    def feed(self, events: list[Event]) -> list[Event]:
        if not self.book:
            return events
        extra, cmds = self.book.feed(events)
        if not extra:
            return events
        failed = self._apply(cmds)
        if failed:
            extra = [dataclasses.replace(e, enforced=False, note=_MAP_FULL)
                     if isinstance(e, BudgetExceeded) and e.budget in failed else e for e in extra]
        return events + extra

    def tick(self) -> None:
        """At most once a second: forget ended windows and free their kernel entries."""
        now = time.time()
        if not self.book or now < self._next_expire:
            return
        self._next_expire = now + 1.0
        self._apply(list(self.book.expire(now)))

    def set_policy(self, policy: Any) -> None:
        """A reloaded policy: spend carries over by budget name; kernel indexes are redone."""
        kernel = dict(self.enforcer.compiled.budgets) if self.enforcer is not None else {}
        _idx, why = kernel_budgets(policy.budgets, len(policy.rules))
        self.book, cmds = self.book.rebuild(policy.budgets, kernel, why, time.time())
        self._apply(list(cmds), clear=True)

    def snapshot(self) -> list[dict[str, Any]]:
        return self.book.snapshot()


def stored_spend(stores: Iterable[Any], policy: Any, now: float | None = None) -> list[dict[str, Any]]:
    """The ``BudgetSpend`` records of the policy's current windows kept in ``stores``
    (busted.sinks.Store), to restore spend at start (``Monitor(budget_spend=...)``)."""
    budgets = getattr(policy, "budgets", ()) if policy is not None else ()
    if not budgets:
        return []
    from busted.policy.budgets import window_of

    now = time.time() if now is None else now
    since = min(window_of(now, b.window_s)[0] for b in budgets)
    out: list[dict[str, Any]] = []
    for st in stores:
        out.extend(st.events(kinds="budget_spend", since=since, raw=True))
    return out

"""The policy stage: the rules (``rules``: a file's model and the user-space judge), budgets
(``budgets``, ``budget_enforce``) and the kernel enforcer (``enforce``: rules compiled to BPF maps,
the cgroup programs, reload).

``from busted.policy import Policy`` keeps working: the model's public names are here.
"""

from busted.policy.rules import (
    ACTIONS,
    MATCH_KEYS,
    MAX_KERNEL_ENTRIES,
    MAX_RULES,
    Decision,
    Policy,
    PolicyJudge,
    Rule,
    Subject,
)

__all__ = ["ACTIONS", "MATCH_KEYS", "MAX_KERNEL_ENTRIES", "MAX_RULES", "Decision", "Policy", "PolicyJudge", "Rule",
           "Subject"]

"""The causes of an OOM, as a table of rules: each says whether it applies, with its evidence in
numbers, one action, what that action would free, and whether that is enough.

Ranking (:func:`rank`): first what no fix can get around (a single allocation larger than the
card, a host-memory failure, a probable but unproven OOM); then the causes whose action closes the
gap, largest saving first; then those whose action helps but is not enough; last what needs
nothing (memory the failure pinned, already given back). A cause is never ranked first on its size
alone when its action cannot make the cell fit.
"""

from __future__ import annotations

from jupyter_gpumem.diagnosis.facts import Facts, Rule
from jupyter_gpumem.diagnosis.model import Cause
from jupyter_gpumem.diagnosis.rules_allocator import fragmentation
from jupyter_gpumem.diagnosis.rules_holders import (
    old_variables,
    other_gpu,
    other_processes,
    output_cache,
    pinned_by_failure,
    recreated_variables,
    working_set,
)
from jupyter_gpumem.diagnosis.rules_limits import (
    host_memory,
    library,
    model_states_exceed_card,
    probable,
    process_cap,
    request_exceeds_card,
)

__all__ = [
    "RULES",
    "find_causes",
    "fragmentation",
    "host_memory",
    "library",
    "model_states_exceed_card",
    "old_variables",
    "other_gpu",
    "other_processes",
    "output_cache",
    "pinned_by_failure",
    "probable",
    "process_cap",
    "rank",
    "recreated_variables",
    "request_exceeds_card",
    "working_set",
]


RULES: tuple[Rule, ...] = (
    probable,
    library,
    host_memory,
    request_exceeds_card,
    model_states_exceed_card,
    process_cap,
    old_variables,
    recreated_variables,
    other_processes,
    other_gpu,
    fragmentation,
    output_cache,
    pinned_by_failure,
    working_set,
)


def rank(causes: list[Cause]) -> list[Cause]:
    """Blocking first, then what closes the gap (largest first), then what helps, then notes."""

    def tier(c: Cause) -> int:
        if c.tier in (0, 3):
            return c.tier
        return 1 if c.closes_gap else 2

    # within a tier, what costs nothing (delete, clear, lift a cap) before the working set,
    # whose remedies cost batch size or precision
    return sorted(causes, key=lambda c: (tier(c), c.key == "working_set", -c.weight))


def find_causes(f: Facts) -> list[Cause]:
    causes = [c for rule in RULES if (c := rule(f)) is not None]
    if not causes:
        causes.append(
            Cause(
                "unknown",
                "Out of memory",
                f.report.message[:300],
                "Clear cache and re-run; if it fails again, reduce the batch size.",
                0.0,
            )
        )
    return rank(causes)

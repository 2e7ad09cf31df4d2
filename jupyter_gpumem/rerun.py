"""Run a cell's source in the user namespace under a plan (new source, context managers, namespace
changes), measure its peak, and turn an OOM into the next diagnosis.

This is what a fix button, ``%gpumem retry`` and ``%%oomsafe`` share. The source is executed here,
in the user namespace, as ``%%time`` does: a retry is not a nested ``run_cell``. A non-OOM error is
raised unchanged to the caller.
"""

from __future__ import annotations

import ast
import contextlib
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from .backends import _torch
from .failure import FailedCell, build_failure
from .oom import find_oom
from .release import release_failed_cell

ContextFactory = Callable[[], AbstractContextManager[Any]]


@dataclass
class Plan:
    """What a fix changes for one run."""

    source: str
    contexts: list[ContextFactory] = field(default_factory=list)
    namespace_updates: dict[str, Any] = field(default_factory=dict)
    batch: int | None = None  # the batch size this run uses, for reduce-batch
    note: str = ""  # what this run does differently, shown on its line


@dataclass
class RunResult:
    ok: bool
    peak_bytes: int | None  # peak allocated during the run (torch's allocated_bytes.all.peak)
    capacity_bytes: int | None  # what the process may use: the card or its cap
    seconds: float
    failure: FailedCell | None = None  # the next diagnosis, when it ran out of memory again
    value: Any = None  # the value of the cell's last expression


def _split_last_expr(tree: ast.Module) -> tuple[ast.Module, ast.Expression | None]:
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body.pop()
        return tree, ast.Expression(body=last.value)  # type: ignore[attr-defined]
    return tree, None


def capacity_bytes() -> int | None:
    from .readings import read_snapshot

    snap = read_snapshot()
    caps = [v for v in (snap.total_bytes, snap.allowed_bytes) if v is not None]
    budget = min(caps) if caps else None
    if budget is not None:
        budget -= snap.other_processes_bytes
    return budget


def run_plan(
    shell: Any,
    plan: Plan,
    *,
    preexisting: frozenset[str] | None = None,
    display_result: bool = True,
    keep_traceback: bool = False,
) -> RunResult:
    """Run once. Returns ok / the measured peak, or the new FailedCell on an OOM."""
    user_ns = shell.user_ns
    if preexisting is None:
        preexisting = frozenset(user_ns)
    else:
        forget_failed_run(user_ns, preexisting)
    user_ns.update(plan.namespace_updates)
    code = shell.transform_cell(plan.source)
    filename = shell.compile.cache(code, shell.execution_count, raw_code=plan.source)
    tree = ast.parse(code, filename=filename)
    body, last = _split_last_expr(tree)
    body_code = compile(body, filename, "exec")
    last_code = compile(last, filename, "eval") if last is not None else None
    _torch.reset_peak()
    t0 = time.perf_counter()
    value = None
    try:
        with contextlib.ExitStack() as stack:
            for factory in plan.contexts:
                stack.enter_context(factory())
            exec(body_code, user_ns)
            if last_code is not None:
                value = eval(last_code, user_ns)
    except Exception as exc:
        found = find_oom(exc)
        if found is None:
            raise
        elapsed = time.perf_counter() - t0
        failure = build_failure(
            shell,
            exc,
            found[1],
            exc.__traceback__,
            source=plan.source,
            preexisting=preexisting,
            release=None if keep_traceback else lambda e: release_failed_cell(None, e),
        )
        del exc
        return RunResult(False, _peak(), capacity_bytes(), elapsed, failure=failure)
    elapsed = time.perf_counter() - t0
    if display_result and value is not None:
        from IPython.display import display

        display(value)
    return RunResult(True, _peak(), capacity_bytes(), elapsed, value=value)


def forget_failed_run(user_ns: dict[str, Any], preexisting: frozenset[str]) -> list[str]:
    """Delete the variables a failed run created before the re-run makes them again.

    Otherwise `x = torch.randn(...)` from the failed run holds its memory until the re-run's new
    `x` is allocated, and the re-run needs both at once. Names that existed before the cell stay.
    """
    dropped = [n for n in list(user_ns) if n not in preexisting and not n.startswith("_")]
    for n in dropped:
        del user_ns[n]
    return dropped


def _peak() -> int | None:
    stats = _torch.allocator_stats()
    return None if stats is None else stats.get("allocated_bytes.all.peak")


def names_read(source: str) -> Iterable[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ()
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}

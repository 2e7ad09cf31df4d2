"""Whether to ask before a button re-runs a failed cell, and what: the panel's policy, kept out of
the widgets so it reads (and is tested) without them.

A re-run is what the user expects only when the notebook is as the failure left it and the cell
repeats nothing it already did. So the question names what changed since the failure (cells that
ran, a newer failure) and what the guard found the re-run would repeat; with neither, no question.
"""

from __future__ import annotations

from typing import Any

from IPython import version_info as _ipython_version

from jupyter_gpumem.cells.failure import FailedCell, names_used
from jupyter_gpumem.fixes.ladder import guard
from jupyter_gpumem.rescue.reach import survey

# IPython 9.8 (commit aaa5a45, "execution count more atomic") counts a cell before running it:
# while In [5] runs, and at its pre_run_cell where the hook reads it, execution_count is already 6.
# Before, it was 5 until the cell ended. Between cells it is the next prompt's number either way.
_COUNTED_BEFORE_RUN = tuple(_ipython_version[:2]) >= (9, 8)


def _prompt(execution_count: int | None) -> int | None:
    """The In [N] of a failure, from the execution_count recorded when it failed."""
    if execution_count is None:
        return None
    return execution_count - 1 if _COUNTED_BEFORE_RUN else execution_count


def _span(first: int, last: int) -> str:
    return f"In [{first}]" if first == last else f"In [{first}]..In [{last}]"


def staleness(shell: Any, failed: FailedCell, latest: FailedCell | None) -> str:
    """What changed since ``failed`` (cells that ran, a newer failure); "" when nothing did."""
    now = getattr(shell, "execution_count", None)
    mine = _prompt(failed.execution_count)
    newer = latest is not None and latest is not failed
    newer_at = _prompt(latest.execution_count) if newer and latest is not None else None
    if newer_at is not None and not _is_cell(shell, newer_at, latest):
        newer_at = None  # a fix's re-run failed, not a cell: it has no In [N] of its own
    parts = []
    if isinstance(now, int) and mine is not None and now > mine + 1:
        last = now - 1
        if newer_at == last:  # said on its own below
            last -= 1
        if last > mine:
            n = last - mine
            parts.append(
                f"{n} cell{'s' if n > 1 else ''} ran since this failure ({_span(mine + 1, last)})"
            )
    if newer:
        parts.append(
            f"a newer failure is In [{newer_at}]"
            if newer_at is not None
            else "a newer failure came since (a fix's re-run)"
        )
    return "; ".join(parts)


def _is_cell(shell: Any, prompt: int, failed: FailedCell | None) -> bool:
    """Whether In [prompt] is the failure's own cell (and not a re-run made between cells)."""
    history = getattr(getattr(shell, "history_manager", None), "input_hist_raw", None)
    if failed is None or not history or not 0 < prompt < len(history):
        return False
    return bool(history[prompt].strip() == failed.source.strip())


def _not_covered(ns: dict[str, Any], failed: FailedCell) -> list[str]:
    """What no rollback of this cell's re-run could put back (a generator it advances, a socket),
    said before the fix runs; nothing where the walk cannot tell."""
    try:
        missing = survey(ns, names_used(failed.source, ns)).not_covered
    except Exception:
        return []
    return [f"A re-run cannot put back: {'; '.join(missing)}."] if missing else []


def question_before_rerun(
    shell: Any, failed: FailedCell, latest: FailedCell | None
) -> tuple[str, str] | None:
    """(what changed or would repeat, the question) before re-running ``failed``; None when the
    re-run may go ahead unasked. ``latest`` is the newest failure the hook saw."""
    changed = staleness(shell, failed, latest)
    verdict = guard(failed, shell.user_ns)
    if not changed and verdict.safe:
        return None
    summary = " ".join(
        ([f"{changed[0].upper()}{changed[1:]}."] if changed else [])
        + ([verdict.summary()] if not verdict.safe else [])
        + _not_covered(shell.user_ns, failed)
    )
    question = (
        verdict.question()
        if not verdict.safe
        else "Re-run anyway? The cell would run again on the namespace as it is now."
    )
    return summary, question


def question_in_a_cell(shell: Any, failed: FailedCell, fixed_by: str | None) -> str | None:
    """Why ``%gpumem retry``, typed in a cell, should not re-run ``failed`` unasked: cells ran
    between the failure and this one, or a fix already settled it; None when neither. (A
    terminal has no button: the caller says how to go on.)"""
    mine, here = _prompt(failed.execution_count), _prompt(getattr(shell, "execution_count", None))
    at = f"In [{mine}]" if mine is not None else "The failed cell"
    if fixed_by is not None:
        return f"{at} was already fixed ({fixed_by}); a retry would run it again."
    if mine is None or here is None or here <= mine + 1:
        return None
    n = here - mine - 1
    return (
        f"{n} cell{'s' if n > 1 else ''} ran since {at} failed ({_span(mine + 1, here - 1)}): "
        "a retry runs it on the notebook as it is now."
    )

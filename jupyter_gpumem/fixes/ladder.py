"""Apply a fix to a failed cell (a button, ``%gpumem retry``) or climb the ladder of fixes
(``%%oomsafe``), with the side-effect guard in front of every re-run.

Each fix is a transaction (``transaction.Transaction``): the failed run's own leftovers are
dropped, a snapshot is taken, rehearsals are rolled back after each run, and the real run is kept
only when it fits. A final run that runs out of memory or raises, and Ctrl-C at any moment, put
the notebook back as it was before the fix; Ctrl-C then raises :class:`Interrupted`, whose
``message`` says what was undone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from jupyter_gpumem.backends import torch_objects
from jupyter_gpumem.cells.failure import FailedCell, NamespaceMark
from jupyter_gpumem.fixes import FIXES, LADDER, Attempt, Check, FixContext, FixOutcome
from jupyter_gpumem.fixes.base import MAX_RUNS
from jupyter_gpumem.fixes.batch.reduce import cell_key, with_remake
from jupyter_gpumem.fixes.batch.source import apply_batch, find_batch
from jupyter_gpumem.rescue import before_cell
from jupyter_gpumem.rescue.rerun import Plan, RunResult, failed_run_leftovers, run_plan
from jupyter_gpumem.rescue.transaction import SnapshotTooLarge, Transaction
from jupyter_gpumem.units import format_bytes

if TYPE_CHECKING:
    from jupyter_gpumem.guard.analyse import GuardVerdict


T = TypeVar("T")


@dataclass
class Options:
    batch_var: str | None = None
    min_batch: int = 1
    max_runs: int = MAX_RUNS
    force: bool = False
    drop: tuple[str, ...] = ()
    drop_output_cache: bool = False
    accumulate: bool = False


@dataclass
class LadderResult:
    ok: bool
    outcomes: list[FixOutcome] = field(default_factory=list)
    refused: GuardVerdict | None = None
    failure: FailedCell | None = None  # the last OOM, when nothing fit
    lines: list[str] = field(default_factory=list)  # what was printed

    @property
    def runs(self) -> int:
        return sum(o.runs for o in self.outcomes)


class _Line(Protocol):
    """How the ladder says a line: printed unless quiet (``always``: printed anyway), and kept."""

    def __call__(self, text: str, *, always: bool = False) -> None: ...


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a fix, after the notebook was put back; ``message`` says what was undone,
    ``whole`` whether everything was (nothing left out of the rollback)."""

    def __init__(self, message: str, whole: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.whole = whole


def guard(failed: FailedCell, namespace: dict[str, Any] | None = None) -> GuardVerdict:
    """What the failed run already did that a re-run would do again."""
    from jupyter_gpumem.guard.analyse import analyse_rerun

    return analyse_rerun(
        failed.source,
        failed_lineno=failed.failed_lineno,
        preexisting=failed.preexisting,
        earlier_passes=failed.earlier_passes,
        namespace=namespace,
        failed_frames=failed.frames,
        values_at_failure=failed.plain_values,
        frame_values=failed.frame_values,
    )


def make_context(
    shell: Any,
    failed: FailedCell,
    options: Options,
    remembered: dict[str, int],
    on_attempt: Callable[[Attempt], None] | None = None,
    keep_traceback: bool = False,
) -> FixContext:
    ctx: FixContext

    def run(plan: Plan) -> RunResult:
        ctx.running = plan
        result = run_plan(
            shell,
            plan,
            preexisting=failed.preexisting,
            keep_traceback=keep_traceback,
            loop=failed.loop,
            rng=failed.rng,
            device=failed.report.device_index,
        )
        if plan.rehearsal and result.ok and result.passes is None and plan.keep is not None:
            # it ran whole: if it is the run the fix settles on, running it again changes nothing
            result.kept = plan.keep(result)
        if ctx.txn is not None and (plan.rehearsal or not result.ok) and not result.kept:
            ctx.txn.rollback()
        return result

    ctx = FixContext(
        shell=shell,
        failed=failed,
        batch_var=options.batch_var,
        min_batch=options.min_batch,
        max_runs=options.max_runs,
        drop=options.drop,
        drop_output_cache=options.drop_output_cache,
        accumulate=options.accumulate,
        remembered=remembered,
        run=run,
        on_attempt=on_attempt,
    )
    return ctx


def check_all(
    shell: Any, failed: FailedCell, options: Options, remembered: dict[str, int]
) -> dict[str, Check]:
    """What each fix would do and save, for the panel's buttons and the text diagnosis."""
    ctx = make_context(shell, failed, options, remembered)
    out = {}
    for key, fix in FIXES.items():
        try:
            out[key] = fix.check(ctx)
        except Exception as exc:  # a fix that cannot tell is disabled, never a crash
            out[key] = Check(False, "", f"could not check ({type(exc).__name__}: {exc})")
    return out


def apply_fix(
    shell: Any,
    failed: FailedCell,
    key: str,
    options: Options,
    remembered: dict[str, int],
    on_attempt: Callable[[Attempt], None] | None = None,
) -> FixOutcome:
    gate = _gate(shell, failed, key, options, remembered, on_attempt)
    if gate.refused is not None:
        verdict = gate.refused
        return FixOutcome(
            fix=key,
            ok=False,
            refused=True,
            message=verdict.summary(),
            notes=[f"{verdict.question()} `%gpumem retry {key} --force` re-runs it anyway."],
        )
    assert gate.ctx is not None and gate.check is not None
    if not gate.check.applies:
        label = FIXES[key].label
        return FixOutcome(fix=key, ok=False, message=f"{label} does not apply: {gate.check.reason}")
    return in_transaction(shell, failed, gate.ctx, key)


@dataclass
class _Gate:
    """What stands before a fix's transaction: the side-effect guard, then the fix's own check.
    ``refused``: the guard stopped it (no context made); else ``ctx`` and ``check`` are set."""

    refused: GuardVerdict | None = None
    ctx: FixContext | None = None
    check: Check | None = None


def _gate(
    shell: Any,
    failed: FailedCell,
    key: str,
    options: Options,
    remembered: dict[str, int],
    on_attempt: Callable[[Attempt], None] | None = None,
    *,
    rehearse_first: bool = False,
) -> _Gate:
    """The one guard -> check sequence of a fix, for `%gpumem retry` and `%%oomsafe` alike."""
    verdict = guard(failed, shell.user_ns)
    if not verdict.safe and not options.force:
        return _Gate(refused=verdict)
    ctx = make_context(shell, failed, options, remembered, on_attempt)
    ctx.rehearse_first = rehearse_first
    return _Gate(ctx=ctx, check=FIXES[key].check(ctx))


def in_transaction(shell: Any, failed: FailedCell, ctx: FixContext, key: str) -> FixOutcome:
    """``FIXES[key].apply(ctx)`` with the notebook put back unless its real run fits."""
    from jupyter_gpumem.cells.failure import names_used

    ns = shell.user_ns
    try:
        txn = Transaction(
            ns,
            names_used(failed.source, ns),
            leftovers=failed_run_leftovers(ns, failed.created),
            before=failed.before,
        )
    except SnapshotTooLarge as exc:
        return FixOutcome(
            fix=key,
            ok=False,
            message=f"Not re-run: {exc}. Free host memory, or re-run the cell by hand.",
        )
    ctx.txn = txn
    graphs = torch_objects.compiled_graphs()  # what torch.compile compiles during the re-runs
    try:
        outcome = FIXES[key].apply(ctx)
    except KeyboardInterrupt:
        txn.rollback(everything=True)
        raise Interrupted(
            f"Interrupted: {txn.undo_message(everything=True)}", whole=txn.whole
        ) from None
    except Exception as exc:  # the cell's own error in a re-run (or ours): all put back, said so
        txn.rollback(everything=True)
        plan = ctx.running
        batch = plan.batch if plan is not None else None
        raise RerunRaised(
            exc, txn.undo_message(everything=True), batch, nothing_kept=txn.nothing_kept
        ) from None
    except BaseException:
        txn.rollback(everything=True)
        raise
    finally:
        ctx.txn = None
    compiled = (torch_objects.compiled_graphs() or 0) - (graphs or 0)
    if compiled > 0:
        outcome.notes.append(
            f"torch.compile compiled {compiled} graph{'s' if compiled != 1 else ''} during the "
            "re-runs. A rolled-back run that compiled leaves no compiled code behind: all "
            "torch.compile'd code in this kernel compiles again at its next call."
        )
    if outcome.failure is not None and outcome.failure.before is None:
        # the re-run that ran out started from the record's values: a next fix starts there too
        outcome.failure.before = failed.before
    if not outcome.ok and outcome.attempts:
        outcome.notes.append(_kept_words(txn.nothing_kept) + txn.undo_message())
    elif outcome.ok:
        # the failed run's own leftovers are not the rehearsals': said apart, once
        not_undone = [n for n in txn.not_undone() if n not in txn.failed_run]
        if outcome.rehearsals and not_undone:
            outcome.notes.append("The rehearsals could not undo: " + "; ".join(not_undone) + ".")
        kept_note = txn.failed_run_note()
        if kept_note:
            outcome.notes.append(kept_note)
    if outcome.rehearsals and txn.snapshot.bytes >= 1 << 30:
        outcome.notes.append(
            f"Rehearsals were undone from a copy of {format_bytes(txn.snapshot.bytes)} of model "
            "and optimizer state in host memory."
        )
    return outcome


def run_ladder(
    shell: Any,
    source: str,
    *,
    fixes: Sequence[str] = LADDER,
    options: Options,
    remembered: dict[str, int],
    say: Callable[[str], None],
    quiet: bool = False,
) -> LadderResult:
    """``%%oomsafe``: run the cell; on OOM apply fixes in order until one fits."""
    mark = NamespaceMark.take(shell.user_ns)
    result = LadderResult(ok=False)

    def line(text: str, *, always: bool = False) -> None:
        result.lines.append(text)
        if always or not quiet:
            say(text)

    plan = _starting_plan(shell, source, options, remembered, line)
    before = _record_before(plan.source, shell.user_ns)
    first = run_plan(shell, plan, preexisting=mark.preexisting(shell.user_ns), rng=None)
    if first.ok:
        result.ok = True
        return result
    failed = first.failure
    assert failed is not None
    failed.before = before_cell.sealed(before)
    d = failed.diagnosis
    line(f"oomsafe: out of memory: {d.headline if d else failed.report.message[:120]}")
    runs_left = options.max_runs
    for key in fixes:
        if runs_left <= 0:
            line("oomsafe: no runs left (--max-retries).")
            break
        budget = Options(**{**options.__dict__, "max_runs": runs_left})
        gate = _gate(
            shell,
            failed,
            key,
            budget,
            remembered,
            on_attempt=lambda a: line("  " + a.line()),
            rehearse_first=True,
        )
        if gate.refused is not None:
            result.refused, result.failure = gate.refused, failed
            force = " Use --force to re-run anyway."
            line(
                "oomsafe: stopped before re-running: " + gate.refused.summary() + force, always=True
            )
            return result
        assert gate.ctx is not None and gate.check is not None
        label = FIXES[key].label.lower()
        if not gate.check.applies:  # said, and no run spent
            line(f"oomsafe: {label}: skipped, {gate.check.reason}")
            continue
        saving = gate.check.predicted_saving_bytes
        line(
            f"oomsafe: {label}" + (f" (predicted to save {format_bytes(saving)})" if saving else "")
        )
        outcome = in_transaction(shell, failed, gate.ctx, key)
        result.outcomes.append(outcome)
        runs_left -= outcome.runs
        if outcome.ok:
            result.ok = True
            _say_kept(outcome, line)
            return result
        line(f"oomsafe: {outcome.message}")
        if outcome.failure is not None:
            failed = outcome.failure
    result.failure = failed
    line(f"oomsafe: no fix made the cell fit in {result.runs} re-runs.", always=True)
    return result


def _record_before(source: str, ns: dict[str, Any]) -> before_cell.Before | None:
    """What the body's models hold before its first run (``before_cell``), as the hook records
    for a cell; None where it cannot be read."""
    try:
        return before_cell.take(source, ns)
    except Exception:
        return None


def _starting_plan(
    shell: Any, source: str, options: Options, remembered: dict[str, int], line: _Line
) -> Plan:
    """The cell as written, or at the batch that fit it last time: a ladder that already found
    a size that fits starts there instead of running out of memory again to find it."""
    known = remembered.get(cell_key(source))
    if known is not None:
        finding = find_batch(source, shell.user_ns, batch_var=options.batch_var)
        if finding.sites and finding.value > known:
            new_source, updates = apply_batch(source, finding, known)
            line(f"oomsafe: starting at batch {known}, which fit this cell last time.")
            plan = Plan(new_source, namespace_updates=updates, batch=known)
            # what earlier cells made from the batch setting, made again at that batch
            return with_remake(plan, source, shell.user_ns, finding, known)
    return Plan(source)


def _say_kept(outcome: FixOutcome, line: _Line) -> None:
    """The fix that fit, how to make it permanent, and its notes."""
    summary = f"oomsafe: {outcome.message}"
    if outcome.change:
        summary += f" To make it permanent: {outcome.change}"
    line(summary, always=True)
    for note in outcome.notes:
        line(f"  note: {note}")


def _kept_words(nothing_kept: bool) -> str:
    """ "Nothing was kept" only where it is true: else what could be put back, then what not."""
    return "Nothing was kept: " if nothing_kept else "Put back what could be: "


class RerunRaised(Exception):
    """A fix's run raised something other than an out-of-memory error (the cell's own error at
    the new setting, or ours); the notebook was put back: ``undo`` says what that restored."""

    def __init__(
        self, error: Exception, undo: str, batch: int | None, *, nothing_kept: bool = True
    ) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error, self.undo, self.batch = error, undo, batch
        self.nothing_kept = nothing_kept


def report_raised(shell: Any, label: str, raised: RerunRaised) -> str:
    """The cell's own error shown as the cell would show it (from its own frame on, none of
    ours); one line for the status: what was raised, at which batch, and that nothing was kept.
    Raised by jupyter_gpumem itself: that one line only."""
    from jupyter_gpumem.backends import without_dispatch_frames

    exc = raised.error
    brief = f"{type(exc).__name__}: {str(exc)[:200]}"
    tb = cell_traceback(exc.__traceback__, shell.user_ns)
    if tb is None:
        return f"jupyter_gpumem: {label} failed ({brief}). {_kept_words(raised.nothing_kept)}{raised.undo}"
    try:
        shell.showtraceback((type(exc), exc, without_dispatch_frames(tb)), tb_offset=0)
    except Exception:
        pass
    at = f" at batch {raised.batch}" if raised.batch else ""
    kept = _kept_words(raised.nothing_kept)
    brief, hint = _other_loop(exc, brief)
    return f"✗ {label}: the re-run{at} raised {brief}. {hint}{kept}{raised.undo}"


_OTHER_LOOP = ("attached to a different loop", "bound to a different event loop")


def _other_loop(exc: BaseException, brief: str) -> tuple[str, str]:
    """An await cell that awaited what the kernel's event loop made: the error in its own words
    (not the task's repr), and why, in a sentence."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or not any(w in text for w in _OTHER_LOOP):
        return brief, ""
    start = text.find("got Future ")
    brief = f"RuntimeError: {text[start + 4 :] if start >= 0 else text[:200]}"
    hint = (
        "The cell awaits something made on the kernel's event loop by an earlier cell (a "
        "future, an event, a client's connection); a fix runs an await cell on IPython's own "
        "loop beside it, so re-run this one by hand. "
    )
    return brief, hint


def cell_traceback(tb: TracebackType | None, user_ns: dict[str, Any]) -> TracebackType | None:
    """The traceback from the cell's own frame on (None if it never reached the cell): what the
    cell would show, without the re-run machinery above it."""
    while tb is not None and tb.tb_frame.f_globals is not user_ns:
        tb = tb.tb_next
    return tb


def error_line(shell: Any, label: str, exc: BaseException) -> str:
    """The one line a front end shows when a fix ended in an error other than Ctrl-C: the
    cell's own error (shown above it, as the cell would) or ours, and what was put back."""
    if isinstance(exc, RerunRaised):
        return report_raised(shell, label, exc)
    return f"jupyter_gpumem: {label} failed ({type(exc).__name__}: {str(exc)[:200]})"


def run_reported(
    shell: Any, label: str, run: Callable[[], T], say: Callable[[str], None]
) -> T | None:
    """``run()`` a fix for a terminal front end (``%gpumem retry``, ``%%oomsafe``): Ctrl-C says
    what was undone and re-raises as a plain KeyboardInterrupt (IPython's one ``Interrupted``
    line, no traceback through the extension); an error of the re-run is one line; None then."""
    __tracebackhide__ = True  # IPython's tracebacks leave this frame out
    try:
        return run()
    except Interrupted as exc:
        say(exc.message)
        raise KeyboardInterrupt from None
    except RerunRaised as raised:
        say(error_line(shell, label, raised))
        return None

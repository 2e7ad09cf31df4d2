"""What every fix is: it says whether it applies (and if not, why), what it will do, and what it
should save, before it runs; after it runs, what it measured, so prediction and outcome sit side by
side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from jupyter_gpumem.units import format_bytes

if TYPE_CHECKING:
    from jupyter_gpumem.cells.failure import FailedCell
    from jupyter_gpumem.rescue.rerun import Plan, RunResult
    from jupyter_gpumem.rescue.transaction import Transaction


MAX_RUNS = 8  # re-runs a fix (or the %%oomsafe ladder) may make, unless told otherwise


@dataclass(frozen=True)
class Check:
    applies: bool
    action: str  # what it will do, said before doing it
    reason: str = ""  # why it does not apply, in words a user understands
    predicted_saving_bytes: int | None = None
    # what ties the fix to this failure, for the diagnosis's causes ("`test_loader.batch_size`
    # = 1000 sizes `data` (1000, 1, 28, 28)")
    evidence: str = ""
    # how the saving was predicted, said beside it: "estimate" where no record of the run was
    # replayed (a rule of thumb), "replayed" where a recording of the cell was, "measured now"
    basis: str = ""

    @property
    def saving_text(self) -> str:
        """``saves ~42.00 MiB``; ``adds ~8.00 MiB`` when the fix raises the need."""
        saving = self.predicted_saving_bytes
        if saving is None:
            return ""
        text = f"adds ~{format_bytes(-saving)}" if saving < 0 else f"saves ~{format_bytes(saving)}"
        return f"{text}, {self.basis}" if self.basis else text


@dataclass
class Attempt:
    """One re-run."""

    fix: str
    ok: bool
    peak_bytes: int | None
    capacity_bytes: int | None
    seconds: float
    batch: int | None = None
    note: str = ""
    rehearsal: bool = False  # a probe, rolled back; False: the real run, kept if it fits
    passes: int | None = None  # a rehearsal stopped after this many passes of the failing loop

    def line(self) -> str:
        """``reduce batch  batch 9      fits  peak 10.90 GiB of 11.17 GiB (98%)  2.1 s  rehearsal``."""
        what = f"{_RUN_LABELS.get(self.fix, self.fix):<13}"
        batch = f"batch {self.batch:<6}" if self.batch is not None else " " * 12
        outcome = "fits" if self.ok else "OOM "
        peak = ""
        if self.peak_bytes is not None and self.capacity_bytes:
            share = 100 * self.peak_bytes / self.capacity_bytes
            peak = (
                f"peak {format_bytes(self.peak_bytes)} of {format_bytes(self.capacity_bytes)} "
                f"({share:.0f}%)"
            )
        elif self.peak_bytes is not None:
            peak = f"peak {format_bytes(self.peak_bytes)}"
        kind = ""
        if self.rehearsal:
            kind = "rehearsal, rolled back"
            if self.passes:
                kind = (
                    f"rehearsal ({self.passes} pass{'es' if self.passes > 1 else ''}), rolled back"
                )
        elif self.ok:
            kind = "kept"
        else:
            kind = "rolled back"
        notes = ", ".join(x for x in (self.note, kind) if x)
        return f"{what} {batch} {outcome}  {peak:<30} {self.seconds:6.2f} s  {notes}".rstrip()


_RUN_LABELS = {
    "batch": "reduce batch",
    "clear": "clear cache",
    "autocast": "autocast",
    "cpu": "move to CPU",
}


@dataclass
class FixOutcome:
    fix: str
    ok: bool
    attempts: list[Attempt] = field(default_factory=list)
    predicted_saving_bytes: int | None = None
    message: str = ""  # one line: what happened
    change: str = ""  # what to change in the cell to make it permanent
    notes: list[str] = field(default_factory=list)  # what the user must know (numerics, speed)
    failure: FailedCell | None = None  # the diagnosis of the last OOM, when it did not fit
    refused: bool = False  # the side-effect guard stopped it
    batch: int | None = None
    new_source: str | None = None  # the rewritten cell, when the fix's change is more than a line
    # the prediction made before the run, to set beside what it measured: the peak (allocated,
    # as the run's peak is read), and how it was made ("replayed from ...")
    predicted_peak_bytes: int | None = None
    prediction_basis: str = ""

    @property
    def runs(self) -> int:
        return len(self.attempts)

    @property
    def rehearsals(self) -> int:
        return sum(a.rehearsal for a in self.attempts)

    @property
    def peak_bytes(self) -> int | None:
        fits = [a for a in self.attempts if a.ok]
        return fits[-1].peak_bytes if fits else None

    def peak_text(self) -> str:
        """``peak 10.9 GiB of 11.17 GiB, 3 runs``: the measured outcome, for the summary."""
        fits = [a for a in self.attempts if a.ok]
        n, r = self.runs, self.rehearsals
        runs = f"{n} run{'s' if n != 1 else ''}"
        if r:
            real = n - r
            runs = (
                f"{r} rehearsal{'s' if r != 1 else ''} + {real} real run{'s' if real != 1 else ''}"
            )
        if not fits or fits[-1].peak_bytes is None:
            return runs
        cap = fits[-1].capacity_bytes
        of = f" of {format_bytes(cap)}" if cap else ""
        return f"peak {format_bytes(fits[-1].peak_bytes)}{of}, {runs}"


@dataclass
class FixContext:
    """Everything a fix may look at: the shell, the failure, and the user's options."""

    shell: Any
    failed: FailedCell
    batch_var: str | None = None
    min_batch: int = 1
    max_runs: int = MAX_RUNS
    drop: tuple[str, ...] = ()  # clear: variables to delete, named by the user
    drop_output_cache: bool = False
    accumulate: bool = False  # reduce batch: keep the effective batch with gradient accumulation
    remembered: dict[str, int] = field(default_factory=dict)  # cell hash -> batch that fit
    run: Callable[[Plan], RunResult] | None = None  # set by the runner
    on_attempt: Callable[[Attempt], None] | None = None
    txn: Transaction | None = None  # what a rollback puts back (set by the runner)
    running: Plan | None = None  # the run under way (set by the runner): what an error was in
    # %%oomsafe: prove a fix with a rehearsal before its real run (a retry runs it directly)
    rehearse_first: bool = False

    @property
    def user_ns(self) -> dict[str, Any]:
        return self.shell.user_ns


class Fix:
    key: ClassVar[str]
    label: ClassVar[str]  # the button's text

    def check(self, ctx: FixContext) -> Check:
        raise NotImplementedError

    def apply(self, ctx: FixContext) -> FixOutcome:
        raise NotImplementedError

    def run_once(self, ctx: FixContext, plan: Plan) -> tuple[RunResult, Attempt]:
        """One re-run under ``plan``, reported to ``ctx.on_attempt`` as it ends."""
        assert ctx.run is not None
        result = ctx.run(plan)
        attempt = Attempt(
            self.key,
            result.ok,
            result.peak_bytes if result.ok else None,  # a failed run's peak measures nothing
            result.capacity_bytes,
            result.seconds,
            batch=plan.batch,
            note=plan.note,
            rehearsal=plan.rehearsal and not result.kept,
            passes=result.passes if plan.rehearsal else None,
        )
        if ctx.on_attempt:
            ctx.on_attempt(attempt)
        return result, attempt

    def _single_run(self, ctx: FixContext, plan: Plan, check: Check) -> FixOutcome:
        """The real run; under ``%%oomsafe``, a rehearsal first where the cell has a loop to stop
        (a cell without one would run whole twice)."""
        attempts = []
        if ctx.rehearse_first and ctx.failed.loop is not None:
            probe, attempt = self.run_once(ctx, dataclasses.replace(plan, rehearsal=True))
            attempts.append(attempt)
            if not probe.ok:
                return FixOutcome(
                    fix=self.key,
                    ok=False,
                    attempts=attempts,
                    predicted_saving_bytes=check.predicted_saving_bytes,
                    failure=probe.failure,
                )
        result, attempt = self.run_once(ctx, plan)
        attempts.append(attempt)
        return FixOutcome(
            fix=self.key,
            ok=result.ok,
            attempts=attempts,
            predicted_saving_bytes=check.predicted_saving_bytes,
            failure=result.failure,
        )


def predicted_vs_measured(
    predicted_bytes: int | None, measured_bytes: int | None, what: str, basis: str = ""
) -> str:
    """``Predicted peak ~1.20 GiB (replayed from ...), measured 1.25 GiB (the prediction 4% under).``
    Empty where nothing was predicted."""
    if predicted_bytes is None:
        return ""
    how = f" ({basis})" if basis else ""
    head = f"Predicted {what} ~{format_bytes(predicted_bytes)}{how}"
    if measured_bytes is None:
        return head + "; not measured (the run did not fit)."
    off = ""
    if measured_bytes:
        error = 100 * (predicted_bytes - measured_bytes) / measured_bytes
        side = "over" if error > 0 else "under"
        off = (
            " (the prediction within 0.5%)"
            if abs(error) < 0.5
            else f" (the prediction {abs(error):.0f}% {side})"
        )
    return f"{head}, measured {format_bytes(measured_bytes)}{off}."

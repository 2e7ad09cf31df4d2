"""Reduce batch: find the batch size, then search with a memory model for the largest that fits.

The model starts from the OOM's own numbers (the batch that failed, what was allocated, what was
requested) and learns from each run's measured peak, instead of halving blindly; see
``batch_search``. The batch that fit is remembered per cell, so running the same cell again starts
there.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import gc
import hashlib
import re
from collections.abc import Sequence
from typing import Any

from jupyter_gpumem import backends
from jupyter_gpumem.backends.allocator import SizeLog
from jupyter_gpumem.backends.peaks import PeakWatch
from jupyter_gpumem.cells import source as cellsource
from jupyter_gpumem.fixes.base import (
    Attempt,
    Check,
    Fix,
    FixContext,
    FixOutcome,
    predicted_vs_measured,
)
from jupyter_gpumem.fixes.batch.accumulate import effective_batch_note
from jupyter_gpumem.fixes.batch.evidence import failing_tensors, sized_by, variables_sized_by
from jupyter_gpumem.fixes.batch.longest import WorstFirst
from jupyter_gpumem.fixes.batch.namespace import history_of, origin
from jupyter_gpumem.fixes.batch.phase import evaluation_reason
from jupyter_gpumem.fixes.batch.remake import Remake, RemakeStopped, find_remake
from jupyter_gpumem.fixes.batch.replay import Replay
from jupyter_gpumem.fixes.batch.schedule import schedule_notes
from jupyter_gpumem.fixes.batch.search import BatchSearch, Observation
from jupyter_gpumem.fixes.batch.source import (
    BatchFinding,
    accumulation_plan,
    apply_batch,
    describe_change,
    find_batch,
    try_accumulation,
)
from jupyter_gpumem.fixes.predict import ESTIMATE
from jupyter_gpumem.readings.allocator_state import read_allocator_state
from jupyter_gpumem.rescue.rerun import Plan, RunResult, capacity_bytes
from jupyter_gpumem.units import format_bytes


class _ReservedPeak:
    """Around the cell's code (inside the run, before any rollback): the peak of *reserved*
    memory, which is what runs out (allocated plus the allocator's rounding and fragmentation),
    and the log of what the run allocated and freed, for the replay (``batch_replay``)."""

    def __init__(self, device: int | None = None) -> None:
        self.device = device  # the device that ran out: its peak, not the current device's
        self.peak_bytes: int | None = None
        self.log: SizeLog | None = None
        self._stack = contextlib.ExitStack()
        self._watch = PeakWatch(device)  # the notebook's peak counters are read, never reset

    def __call__(self) -> _ReservedPeak:
        return self

    def __enter__(self) -> _ReservedPeak:
        self.peak_bytes = self.log = None
        try:
            self.log = self._stack.enter_context(backends.active().record_sizes(self.device))
        except Exception:  # no log: the search falls back to its line through the peaks
            self.log = None
        self._watch.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._stack.close()
        except Exception:
            self.log = None
        peaks = self._watch.stop(self.log)
        self.peak_bytes = None if peaks is None else peaks.reserved_bytes


# A batch for evaluation (`test_loader`, `args.test_batch_size`, `val_bs`): no learning rate to tune.
_EVALUATION = re.compile(r"(?i)(test|val|eval|infer|predict)")

# Real runs allowed after a real run failed where its rehearsal fitted (bisecting down).
_REAL_RETRIES = 3


def _need(result: RunResult, probe: _ReservedPeak) -> int | None:
    """What a run that fitted needed: its reserved peak where known, else its allocated peak."""
    peaks = [p for p in (result.peak_bytes, probe.peak_bytes) if p is not None]
    return max(peaks) if peaks else None


def _reserved_now(device: int | None = None) -> int:
    stats = backends.active().allocator_stats(device) or {}
    return stats.get("reserved_bytes.all.current") or stats.get("allocated_bytes.all.current") or 0


def cell_key(source: str) -> str:
    return hashlib.sha1(source.strip().encode()).hexdigest()[:16]


def _finding(ctx: FixContext) -> BatchFinding:
    from jupyter_gpumem.cells.failure import names_used

    source = ctx.failed.source
    return find_batch(
        source,
        ctx.user_ns,
        batch_var=ctx.batch_var,
        evidence=failing_tensors(ctx.failed),
        used=names_used(source, ctx.user_ns),
        evaluation=evaluation_reason(ctx.failed),
    )


class ReduceBatch(Fix):
    key = "batch"
    label = "Reduce batch"

    def check(self, ctx: FixContext) -> Check:
        finding = _finding(ctx)
        if not finding.sites:
            return Check(False, "", finding.reason_not_found or "no batch size found in this cell")
        d = ctx.failed.diagnosis
        if finding.value <= ctx.min_batch:
            return Check(
                False, "", f"the batch size is already {finding.value}, the smallest allowed"
            )
        saving = None
        if d is not None and d.working_set_bytes is not None and d.shortfall_bytes is not None:
            # the part of the working set that scales with the batch must shrink by the shortfall
            saving = min(d.shortfall_bytes + d.working_set_bytes // 20, d.working_set_bytes)
        action = (
            f"Find the largest batch that fits, starting from {finding.how}, with a memory model "
            "from the OOM's numbers and each run's peak (a few runs), then keep it."
        )
        return Check(True, action, "", saving, evidence=finding.evidence, basis=ESTIMATE)

    def apply(self, ctx: FixContext) -> FixOutcome:
        """Rehearsals (stopped after two passes of the failing loop, rolled back) find the batch;
        then one real run at that batch, kept if it fits.

        A real run that fails where its rehearsal fitted (a later epoch needs more than the first
        two passes) makes rehearsals untrustworthy at that size: from then on each probe is a
        real run, bisecting below the failure."""
        check = self.check(ctx)
        finding = _finding(ctx)
        search = _start_search(ctx, finding)
        attempts: list[Attempt] = []
        outcome = FixOutcome(
            fix=self.key,
            ok=False,
            attempts=attempts,
            predicted_saving_bytes=check.predicted_saving_bytes,
        )
        last_failure = untouched = None
        accumulate = None
        final: RunResult | None = None
        rehearse = True
        budget = ctx.max_runs + 1
        probe = _ReservedPeak(ctx.failed.report.device_index)
        worst = WorstFirst(ctx.user_ns)  # rehearsals run the data's largest batch first
        # the replay as it stood when each batch was first run: the kept batch's is what
        # predicted it (the runs at that batch itself are not in it)
        replays: dict[int, Replay | None] = {}
        # what earlier cells made from the batch setting and the cell reads: re-made at each
        # batch, from before the first run (DCGAN's fixed_noise, word_language_model's train_data)
        remake = _remake(ctx, finding)
        while len(attempts) < budget and final is None:
            b = search.next_batch() if len(attempts) < budget - 1 else None
            real = b is None or not rehearse
            b = search.best() if b is None else b
            if b is None:
                break
            if real:
                plan, accumulate = _real_plan(ctx, finding, b)
            else:
                plan = _rehearsal_plan(ctx, finding, b, search, probe, worst)
                plan.contexts.append(worst)
            _with_remake(plan, remake, ctx.user_ns, b)
            plan.contexts.append(probe)
            if b not in replays:
                replays[b] = search.replay()
            try:
                result, attempt = self._run(ctx, plan, remake)
            except RemakeStopped as stopped:  # nothing of that run is kept
                if ctx.txn is not None:
                    ctx.txn.rollback()
                untouched = str(stopped)
                break
            attempts.append(attempt)
            if result.kept or (real and result.ok):
                final = result
            elif result.ok:
                if not (plan.keep is not None and result.passes is None):  # else: settles() saw it
                    search.observe(Observation(b, True, _need(result, probe), log=probe.log))
            else:
                last_failure = result.failure
                search.observe(_failed(b, result))
                if (wider := _widened(ctx, finding, result)) is not None:
                    # another loader made from the same setting ran out at its old batch: it
                    # changes too, and this run says nothing about batch b
                    added = [s.name for s in wider.sites if s not in finding.sites]
                    search.observations.pop()
                    finding = wider
                    remake = _remake(ctx, finding)
                    outcome.notes.append(_widened_note(added, b, finding.value, result))
                    continue
                if (
                    untouched := _untouched(finding, b, result, history_of(ctx.user_ns), _used(ctx))
                ) is not None:
                    break  # smaller batches cannot reach what still has the old size
                if real and rehearse:
                    # rehearsals cannot see what a later phase needs (epoch 2, a test() with
                    # its own batch): real runs decide now, bisecting, with a few more allowed
                    rehearse = False
                    outcome.notes.append(_LATER_NOTE.format(b=b))
                    search.bisect_from_now()
                    budget = max(budget, len(attempts) + _REAL_RETRIES)
        if final is None:
            outcome.failure = last_failure
            outcome.message = untouched or _unsettled(ctx, attempts)
            outcome.notes.extend(worst.unknown_notes())
            _remade(outcome, remake, None, None)
            return outcome
        best = attempts[-1].batch or 0
        how = _replay_note(ctx, search)
        _settled(ctx, finding, outcome, best, accumulate, how)
        _remade(outcome, remake, best, accumulate)
        # a cell without a loop is rehearsed twice in a row and kept after one run: the replay's
        # need (two runs) and the kept run's peak (one) are not the same thing to compare
        twice = ctx.failed.loop is None and _twice(ctx.failed.source) is not None
        if how is not None and not twice and (replay := replays.get(best)) is not None:
            at = outcome.notes.index(how) + 1 if how in outcome.notes else len(outcome.notes)
            outcome.notes.insert(at, _prediction_note(replay, best, _need(final, probe)))
        outcome.notes[0:0] = worst.notes(best)  # what it was sized for, first
        return outcome

    def _run(
        self, ctx: FixContext, plan: Plan, remake: Remake | None = None
    ) -> tuple[RunResult, Attempt]:
        """One run, its line showing the memory resident when it started (the same for every
        attempt: each starts from the rolled-back notebook) and no peak for a run that failed.
        A run that raises where an earlier cell's value was left at the old batch (its slice
        not re-run) carries a note on it, shown under the cell's traceback."""
        assert ctx.run is not None
        gc.collect()
        stats = backends.active().allocator_stats(ctx.failed.report.device_index)
        resident = None if stats is None else stats.get("allocated_bytes.all.current", 0)
        if resident is not None:
            start = f"from {format_bytes(resident)} resident"
            plan.note = f"{plan.note}, {start}" if plan.note else start
        try:
            return self.run_once(ctx, plan)
        except Exception as exc:
            if remake is not None and remake.refused is not None:
                remake.tell(exc, plan.batch)
            raise


def _replay_note(ctx: FixContext, search: BatchSearch) -> str | None:
    """How the replay placed the batch, and where the allocator runs with settings it does not
    model, that it is less sure there."""
    how = search.replay_note()
    if how is not None and (unmodelled := unmodelled_settings(ctx.failed.report.device_index)):
        how += (
            f" The replay does not model {unmodelled}: its need is less sure there, and the "
            "real run is the check."
        )
    return how


def _remake(ctx: FixContext, finding: BatchFinding) -> Remake | None:
    """What the cell reads that earlier cells made from the batch setting (``remake.py``);
    None where nothing is, or the history cannot be read."""
    return remake_for(ctx.failed.source, ctx.user_ns, finding)


def remake_for(source: str, user_ns: dict[str, Any], finding: BatchFinding) -> Remake | None:
    """``find_remake`` for ``source`` in the notebook ``user_ns``; None where there is nothing
    to re-make, or it cannot be read."""
    from jupyter_gpumem.cells.failure import names_recreated, names_used

    try:
        return find_remake(
            history_of(user_ns),
            source,
            finding,
            names_used(source, user_ns),
            user_ns,
            skip=names_recreated(source),
        )
    except Exception:  # the search goes on as before; a run that meets the old size says so
        return None


def with_remake(
    plan: Plan, source: str, user_ns: dict[str, Any], finding: BatchFinding, batch: int
) -> Plan:
    """``plan`` (the cell ``source`` at ``batch``) re-making first what earlier cells made from
    the batch setting, where that can be done without a side effect (``%%oomsafe`` starting at
    the batch that fit last time)."""
    _with_remake(plan, remake_for(source, user_ns, finding), user_ns, batch)
    return plan


def _with_remake(plan: Plan, remake: Remake | None, user_ns: dict[str, Any], b: int) -> None:
    """The run re-makes what earlier cells made from the setting, at ``b``, first (before the
    peak's watch: in a clean run it is resident when the cell starts)."""
    if remake is not None and remake.refused is None:
        plan.contexts.insert(0, remake.context(user_ns, b))


def _remade(outcome: FixOutcome, remake: Remake | None, best: int | None, accumulate: Any) -> None:
    """The outcome's words on what was re-made (or why not), and the lines to make it permanent."""
    if remake is None:
        return
    if best is None:  # nothing kept: only a slice that was not re-run needs saying
        if remake.refused is not None:
            outcome.notes.append(remake.refused_note())
        return
    outcome.notes.extend(remake.notes(best))
    if remake.refused is None and accumulate is None:
        outcome.change += "; " + remake.permanent()


def _prediction_note(replay: Replay, best: int, measured: int | None) -> str:
    """``Predicted need ~X (replayed from the rehearsal at batch p), measured Y``: the replay that
    placed the batch against the reserved peak of the run that was kept."""
    runs = " and ".join(map(str, replay.batches))
    many = len(replay.batches) > 1
    basis = (
        f"replayed from the rehearsal{'s' if many else ''} at batch{'es' if many else ''} {runs}"
    )
    return predicted_vs_measured(replay.need(best), measured, "need", basis)


def _start_search(ctx: FixContext, finding: BatchFinding) -> BatchSearch:
    """The search, knowing the card, what stays resident and the run that failed."""
    d = ctx.failed.diagnosis
    report = ctx.failed.report
    gc.collect()
    device = report.device_index  # the device that ran out, not the current one
    search = BatchSearch(
        capacity_bytes=capacity_bytes(device) or 0,
        # what stays resident across runs (the failed run's own variables are gone by now)
        baseline_bytes=_reserved_now(device),
        min_batch=ctx.min_batch,
        max_batch=finding.value - 1,
        replay_logs=True,  # where a run cannot be logged, the line model goes on alone
    )
    search.observe(
        Observation(
            batch=finding.value,
            fit=False,
            peak_bytes=None,
            requested_bytes=report.requested_bytes,
            allocated_at_failure_bytes=d.allocated_bytes if d else report.allocated_bytes,
        )
    )
    return search


def _real_plan(ctx: FixContext, finding: BatchFinding, b: int) -> tuple[Plan, Any]:
    """The run that counts, at ``b`` (with gradient accumulation where asked and possible)."""
    source = ctx.failed.source
    accumulate = accumulation_plan(source, finding, b) if ctx.accumulate else None
    if accumulate is not None:
        return Plan(accumulate.source, batch=b, note="with gradient accumulation"), accumulate
    new_source, updates = apply_batch(source, finding, b)
    return Plan(new_source, namespace_updates=updates, batch=b), None


def _rehearsal_plan(
    ctx: FixContext,
    finding: BatchFinding,
    b: int,
    search: BatchSearch,
    probe: _ReservedPeak,
    worst: WorstFirst,
) -> Plan:
    """A rehearsal at ``b``; kept as the real run if it ran whole and the search settles on it
    (and ran the loader's own batches: not its worst batch first, see ``longest.py``)."""
    new_source, updates = apply_batch(ctx.failed.source, finding, b)
    twice = _twice(new_source) if ctx.failed.loop is None else None
    if twice is not None:
        # a cell without a loop: judged by its second run (see _twice); never kept, as a real
        # run is the cell once
        return Plan(twice, namespace_updates=updates, batch=b, rehearsal=True, note=_TWICE_NOTE)
    plan = Plan(new_source, namespace_updates=updates, batch=b, rehearsal=True)

    def settles(result: RunResult) -> bool:
        search.observe(Observation(b, True, _need(result, probe), log=probe.log))
        settled = search.next_batch() is None and search.best() == b
        return settled and not ctx.accumulate and not worst.applied

    plan.keep = settles
    return plan


_TWICE_NOTE = "the cell twice"


def _twice(source: str) -> str | None:
    """The cell followed by itself, for a rehearsal of a cell without a loop; None where that is
    not the same Python twice (a cell magic, ``from __future__``).

    Such a cell (one training step, an evaluation) is run again and again, and its second run
    starts from what the first left: Adam's state, made at the first ``step()``, a list of GPU
    losses, the old ``x`` held while the new one is made. On a 256 MiB card a one-step Adam cell
    settled at 6400 from its first run, and its next run ran out of memory; the second run is
    the one that says what fits (a loop's rehearsal sees two passes for the same reason)."""
    reading = cellsource.read(source)
    if reading.magic is not None or reading.tree is None:
        return None
    if any(
        isinstance(node, ast.ImportFrom) and node.module == "__future__"
        for node in reading.tree.body
    ):
        return None
    if any(isinstance(node, (ast.For, ast.While, ast.AsyncFor)) for node in ast.walk(reading.tree)):
        return None  # a loop the rehearsal could not stop on: the cell once (it may be long)
    sep = "" if source.endswith("\n") else "\n"
    return f"{source}{sep}{source}"


_LATER_NOTE = (
    "The whole run at batch {b} ran out where its rehearsal (the first passes of the loop) "
    "fitted: something later in the run needs more (a longer batch, another epoch, an "
    "evaluation), which the rehearsals could not see; from then on whole runs decided."
)


def _unsettled(ctx: FixContext, attempts: list[Attempt]) -> str:
    if not any(a.ok for a in attempts):
        return f"Even batch {ctx.min_batch} does not fit: reducing the batch is not enough."
    return f"No batch fitted for the whole run in {len(attempts)} runs."


def _widened(ctx: FixContext, finding: BatchFinding, result: RunResult) -> BatchFinding | None:
    """The finding with the other DataLoaders that hold the old batch, where a run ran out on a
    tensor one of them sized (pytorch/examples VAE: ``test_loader`` made from ``args.batch_size``
    beside ``train_loader``; torchvision's tutorial: ``dataloaders['val']``); None otherwise."""
    from jupyter_gpumem.cells.failure import names_used

    failure = result.failure
    tensors = failing_tensors(failure, frames_only=True)
    if failure is None or sized_by(finding.value, tensors) is None:
        return None
    other = find_batch(
        failure.source,
        ctx.user_ns,
        evidence=tensors,
        used=names_used(failure.source, ctx.user_ns),
        evaluation=evaluation_reason(failure),
    )
    have = {s.name for s in finding.sites}
    new = tuple(
        s
        for s in other.sites
        if s.kind == "dataloader"
        and s.lineno is None
        and s.name not in have
        and s.value == finding.value
    )
    if not new:
        return None
    names = {s.name for s in new}
    return dataclasses.replace(
        finding,
        sites=finding.sites + new,
        how=finding.how + " and " + ", ".join(f"{n}.batch_size" for n in sorted(names)),
        loaders={**finding.loaders, **{n: other.loaders[n] for n in names}},
        origins={**finding.origins, **{n: o for n, o in other.origins.items() if n in names}},
        entries={**finding.entries, **{n: e for n, e in other.entries.items() if n in names}},
    )


def _widened_note(added: list[str], b: int, old: int, result: RunResult) -> str:
    hit = sized_by(old, failing_tensors(result.failure, frames_only=True))
    where = f" on {hit.text()}" if hit is not None else ""
    loaders = ", ".join(f"`{n}`" for n in added)
    return (
        f"Also changed {loaders}: made from the same batch setting, it ran out at the old batch "
        f"{old}{where} when the rest ran at {b}."
    )


def _used(ctx: FixContext) -> frozenset[str]:
    from jupyter_gpumem.cells.failure import names_used

    try:
        return frozenset(names_used(ctx.failed.source, ctx.user_ns))
    except Exception:
        return frozenset()


def _untouched(
    finding: BatchFinding,
    b: int,
    result: RunResult,
    history: Sequence[str] | None = None,
    used: frozenset[str] = frozenset(),
) -> str | None:
    """A run at ``b`` that ran out on a tensor still sized by the old batch, and by nothing at
    ``b``: it was made outside what Reduce batch changes (DCGAN's ``fixed_noise``, made in the
    setup cell with ``opt.batchSize``, where the history cannot re-make it: ``remake.py``), and
    no smaller batch will reach it. Says which earlier cell made it, to re-run at the new batch."""
    tensors = failing_tensors(result.failure, frames_only=True)  # what the failing call had
    old = sized_by(finding.value, tensors)
    if old is None and sized_by(b, tensors) is None:
        # the failing call's input may be the notebook's variable itself (`netG(fixed_noise)`):
        # the diagnosis lists it as that variable, not as a local of the failed frame
        read = [t for t in variables_sized_by(result.failure, finding.value) if t.name in used]
        old = sized_by(finding.value, read)
    if old is None or b == finding.value or sized_by(b, tensors) is not None:
        return None
    variables = variables_sized_by(result.failure, finding.value)[:3]
    held = ", ".join(t.text() for t in variables)
    made = [
        (t, where)
        for t in variables
        if (where := origin(history, t.name.split(" in ", 1)[0], None, finding.value)) is not None
    ]
    remedy = "make that tensor with the same batch, or name the variable that sets both with "
    remedy += "`--batch-var`."
    if made:
        t, where = made[0]
        cell, _, line = where.partition(": ")
        remedy = (
            f"{t.text().split(' ', 1)[0]} is made in {cell}: `{line}`; make it with batch {b} "
            f"there and re-run {cell.split(',', 1)[0]}, then this cell at batch {b}."
        )
    return (
        f"Reduce batch stopped: at batch {b} the cell still ran out on {old.text()}, sized by the "
        f"old batch {finding.value}"
        + (f"; the notebook's {held} still has it" if held else "")
        + f". Reduce batch changes only {finding.how}: {remedy}"
    )


def _schedules(ctx: FixContext, finding: BatchFinding, best: int) -> list[str]:
    """Notes on the learning-rate schedules the cell reaches that were sized in steps of a
    loader this fix changed."""
    from jupyter_gpumem.cells.failure import names_used

    if not finding.loaders:
        return []
    try:
        used = names_used(ctx.failed.source, ctx.user_ns)
        return schedule_notes(ctx.user_ns, used, finding.loaders, finding.value, best)
    except Exception:  # a note, never a reason for the fix to fail
        return []


def _failed(b: int, result: RunResult) -> Observation:
    r = result.failure.report if result.failure else None
    d = result.failure.diagnosis if result.failure else None
    return Observation(
        b,
        False,
        None,  # only fits give peaks: a failed run's peak is not its need
        requested_bytes=r.requested_bytes if r else None,
        allocated_at_failure_bytes=d.allocated_bytes if d else None,
    )


def _settled(
    ctx: FixContext,
    finding: BatchFinding,
    outcome: FixOutcome,
    best: int,
    accumulate: Any,
    how: str | None,
) -> None:
    """The outcome of a search that settled on ``best``: the message, the change, the notes."""
    source = ctx.failed.source
    outcome.ok = True
    outcome.batch = best
    ctx.remembered[cell_key(source)] = best
    outcome.message = f"Fits at batch {best} (was {finding.value}), {outcome.peak_text()}."
    if how:
        outcome.notes.append(how)
    if finding.evidence:
        outcome.notes.append(f"The batch: {finding.evidence}.")
    if finding.evaluation:
        names = ", ".join(f"`{s.name}`" for s in finding.sites)
        outcome.notes.append(
            f"Changed the evaluation batch only ({names}): the cell ran out of memory "
            f"{finding.evaluation}; the training batch is as it was."
        )
    outcome.change = describe_change(finding, best)
    outcome.notes.extend(_schedules(ctx, finding, best))
    if accumulate is not None:
        outcome.new_source = accumulate.source
        outcome.change = "use the cell below (gradient accumulation keeps the effective batch)"
        outcome.notes.append(accumulate.explanation)
        return
    already = effective_batch_note(source, ctx.user_ns, finding.value, best, ctx.accumulate)
    plan_acc = accumulation_plan(source, finding, best)
    if already is not None:
        outcome.notes.append(already)
        return
    if ctx.accumulate:
        why = try_accumulation(source, finding, best)
        if isinstance(why, str):  # asked for, and not done: say why
            outcome.notes.append(f"`--accumulate` did not rewrite the cell: {why}.")
    if plan_acc is not None:
        outcome.notes.append(
            plan_acc.explanation
            + f" To keep the effective batch: `%gpumem retry batch --accumulate` "
            f"(it searches again and may settle on another batch than {best})."
        )
    elif not finding.evaluation and not _EVALUATION.search(finding.sites[0].name):
        outcome.notes.append(
            f"The effective batch changed from {finding.value} to {best}: "
            "tune the learning rate if this is training."
        )


def unmodelled_settings(device: int | None) -> str | None:
    """The allocator settings in force that the replay's model (``blocks.py``: the defaults and
    ``expandable_segments:True``) does not follow, in words ("PYTORCH_CUDA_ALLOC_CONF's
    `max_split_size_mb:128`"), or None."""
    try:
        conf = read_allocator_state(None, device).conf
    except Exception:
        return None
    if conf is None:
        return None
    found = []
    if not conf.native:
        found.append(f"backend:{conf.backend}")
    if conf.split_limited:
        found.append(f"max_split_size_mb:{conf.max_split_size >> 20}")
    if any(conf.roundup_power2_divisions):
        found.append("roundup_power2_divisions")
    if conf.garbage_collection_threshold > 0:
        found.append(f"garbage_collection_threshold:{conf.garbage_collection_threshold:g}")
    if not found:
        return None
    return "PYTORCH_CUDA_ALLOC_CONF's " + ", ".join(f"`{f}`" for f in found)

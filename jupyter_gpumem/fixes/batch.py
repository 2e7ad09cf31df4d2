"""Reduce batch: find the batch size, then search with a memory model for the largest that fits.

The model starts from the OOM's own numbers (the batch that failed, what was allocated, what was
requested) and learns from each run's measured peak, instead of halving blindly; see
``batch_search``. The batch that fit is remembered per cell, so running the same cell again starts
there.
"""

from __future__ import annotations

import gc
import hashlib

from ..backends import _torch
from ..rerun import Plan, RunResult, capacity_bytes
from .base import Attempt, Check, Fix, FixContext, FixOutcome
from .batch_search import BatchSearch, Observation
from .batch_source import BatchFinding, accumulation_plan, apply_batch, describe_change, find_batch


def cell_key(source: str) -> str:
    return hashlib.sha1(source.strip().encode()).hexdigest()[:16]


def _finding(ctx: FixContext) -> BatchFinding:
    return find_batch(ctx.failed.source, ctx.user_ns, batch_var=ctx.batch_var)


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
        return Check(True, action, "", saving)

    def apply(self, ctx: FixContext) -> FixOutcome:
        """Rehearsals (stopped after two passes of the failing loop, rolled back) find the batch;
        then one real run at that batch, kept if it fits."""
        assert ctx.run is not None
        check = self.check(ctx)
        finding = _finding(ctx)
        source = ctx.failed.source
        d = ctx.failed.diagnosis
        report = ctx.failed.report
        capacity = capacity_bytes()
        # what stays resident across runs (the failed run's own variables are gone by now)
        gc.collect()
        baseline = _torch.allocated_bytes()
        search = BatchSearch(
            capacity_bytes=capacity or 0,
            baseline_bytes=baseline or 0,
            min_batch=ctx.min_batch,
            max_batch=finding.value - 1,
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
        attempts: list[Attempt] = []
        last_failure = None
        outcome = FixOutcome(
            fix=self.key,
            ok=False,
            attempts=attempts,
            predicted_saving_bytes=check.predicted_saving_bytes,
        )

        def observe_failure(b: int, result: RunResult) -> None:
            nonlocal last_failure
            last_failure = result.failure
            r = result.failure.report if result.failure else None
            dd = result.failure.diagnosis if result.failure else None
            search.observe(
                Observation(
                    b,
                    False,
                    None,
                    requested_bytes=r.requested_bytes if r else None,
                    allocated_at_failure_bytes=dd.allocated_bytes if dd else None,
                )
            )

        accumulate = None
        final_result: RunResult | None = None
        # a real run that fails (a later epoch needed more) counts as a failed probe
        while len(attempts) < ctx.max_runs + 1:
            b = search.next_batch() if len(attempts) < ctx.max_runs else None
            if b is not None:
                new_source, updates = apply_batch(source, finding, b)

                def settles(result: RunResult, b: int = b) -> bool:
                    search.observe(Observation(b, True, result.peak_bytes))
                    done = search.next_batch() is None and search.best() == b
                    return done and not ctx.accumulate

                plan = Plan(new_source, namespace_updates=updates, batch=b, rehearsal=True)
                plan.keep = settles
                result, attempt = self.run_once(ctx, plan)
                attempts.append(attempt)
                if result.kept:
                    final_result = result
                    break
                if result.ok and plan.keep is not None and result.passes is None:
                    pass  # observed by settles()
                elif result.ok:
                    search.observe(Observation(b, True, result.peak_bytes))
                else:
                    observe_failure(b, result)
                continue
            best = search.best()
            if best is None:
                break
            accumulate = accumulation_plan(source, finding, best) if ctx.accumulate else None
            if accumulate is not None:
                plan = Plan(accumulate.source, batch=best, note="with gradient accumulation")
            else:
                new_source, updates = apply_batch(source, finding, best)
                plan = Plan(new_source, namespace_updates=updates, batch=best)
            final_result, attempt = self.run_once(ctx, plan)
            attempts.append(attempt)
            if final_result.ok:
                break
            observe_failure(best, final_result)
            final_result = None
            if len(attempts) >= ctx.max_runs + 1:
                break
        best = search.best() if final_result is not None else None
        outcome.batch = best
        if best is None or final_result is None:
            outcome.failure = last_failure
            fitted = search.best()
            outcome.message = (
                f"Even batch {ctx.min_batch} does not fit: reducing the batch is not enough."
                if fitted is None and not any(a.ok for a in attempts)
                else f"No batch fitted for the whole run in {len(attempts)} runs."
            )
            return outcome
        outcome.ok = True
        ctx.remembered[cell_key(source)] = best
        outcome.message = f"Fits at batch {best} (was {finding.value}), {outcome.peak_text()}."
        outcome.change = describe_change(finding, best)
        plan_acc = accumulation_plan(source, finding, best)
        if accumulate is not None:
            outcome.new_source = accumulate.source
            outcome.change = "use the cell below (gradient accumulation keeps the effective batch)"
            outcome.notes.append(accumulate.explanation)
        elif plan_acc is not None:
            outcome.notes.append(
                plan_acc.explanation
                + " To keep the effective batch: `%gpumem retry batch --accumulate`."
            )
        else:
            outcome.notes.append(
                f"The effective batch changed from {finding.value} to {best}: "
                "tune the learning rate if this is training."
            )
        return outcome

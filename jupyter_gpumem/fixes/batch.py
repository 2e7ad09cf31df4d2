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
from ..rerun import Plan, capacity_bytes, forget_failed_run
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
        assert ctx.run is not None
        check = self.check(ctx)
        finding = _finding(ctx)
        source = ctx.failed.source
        d = ctx.failed.diagnosis
        report = ctx.failed.report
        capacity = capacity_bytes()
        # what stays resident across runs: measured once the failed run's own variables are gone
        forget_failed_run(ctx.user_ns, ctx.failed.preexisting)
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
        while len(attempts) < ctx.max_runs:
            b = search.next_batch()
            if b is None:
                break
            new_source, updates = apply_batch(source, finding, b)
            result, attempt = self.run_once(
                ctx, Plan(new_source, namespace_updates=updates, batch=b)
            )
            attempts.append(attempt)
            if result.ok:
                search.observe(Observation(b, True, result.peak_bytes))
            else:
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
        best = search.best()
        if best is not None and attempts and attempts[-1].batch != best:
            # the last run was not the best one: run the best so the namespace holds its results
            new_source, updates = apply_batch(source, finding, best)
            _result, attempt = self.run_once(
                ctx, Plan(new_source, namespace_updates=updates, batch=best)
            )
            attempts.append(attempt)
        outcome = FixOutcome(
            fix=self.key,
            ok=best is not None,
            attempts=attempts,
            predicted_saving_bytes=check.predicted_saving_bytes,
            batch=best,
        )
        if best is None:
            outcome.failure = last_failure
            outcome.message = (
                f"Even batch {ctx.min_batch} does not fit: reducing the batch is not enough."
            )
            return outcome
        ctx.remembered[cell_key(source)] = best
        outcome.message = f"Fits at batch {best} (was {finding.value}), {outcome.peak_text()}."
        outcome.change = describe_change(finding, best)
        plan = accumulation_plan(source, finding, best)
        if plan is not None and ctx.accumulate:
            result, attempt = self.run_once(
                ctx, Plan(plan.source, batch=best, note="with gradient accumulation")
            )
            attempts.append(attempt)
            outcome.ok = result.ok
            outcome.failure = result.failure
            outcome.new_source = plan.source
            outcome.change = "use the cell below (gradient accumulation keeps the effective batch)"
            outcome.notes.append(plan.explanation)
        elif plan is not None:
            outcome.notes.append(
                plan.explanation
                + " To keep the effective batch: `%gpumem retry batch --accumulate --force`."
            )
        else:
            outcome.notes.append(
                f"The effective batch changed from {finding.value} to {best}: "
                "tune the learning rate if this is training."
            )
        return outcome

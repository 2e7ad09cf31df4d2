"""Enable autocast: re-run the cell under ``torch.autocast``: bf16 where the GPU that ran out has
it in hardware (compute capability 8.0 on), else fp16 with a GradScaler note (a T4 or V100
emulates bf16, slower than fp16).

Autocast is not a sure saving: it halves activations of matmul-heavy layers, but fp32 weights,
gradients and optimizer state stay, and the weights' half-precision copies are added (an 8-layer
4096-wide MLP saved 5%, findings §5; a model whose weights dominate needs more under autocast,
transformers issue 29354). So a click first rehearses the cell, recording its ops
(``backends/op_log.py``): at a quarter of its batch (a prime) where Reduce batch finds the batch,
so that the whole pass fits and is recorded, else as it was, up to where it runs out. The replay
scales the recording to the cell's batch, runs it as autocast would (``fixes/predict.py``), and
the cell then runs under autocast with the measured peak set beside the predicted one. Until a
recording of the cell exists in this kernel, the button's number is an estimate (half the cell's
working set) and says so; when the cell fails again, it is the replay's. A click always records
anew: the notebook may have changed since.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from jupyter_gpumem import backends
from jupyter_gpumem.backends import torch_objects
from jupyter_gpumem.backends.op_log import OpLog, record_ops
from jupyter_gpumem.cells.failure import names_used
from jupyter_gpumem.fixes import predict
from jupyter_gpumem.fixes.base import (
    Attempt,
    Check,
    Fix,
    FixContext,
    FixOutcome,
    predicted_vs_measured,
)
from jupyter_gpumem.fixes.batch.evidence import failing_tensors
from jupyter_gpumem.fixes.batch.phase import evaluation_reason
from jupyter_gpumem.fixes.batch.replay import MIN_PRIME_BATCH, prime_at_most
from jupyter_gpumem.fixes.batch.source import apply_batch, find_batch
from jupyter_gpumem.rescue.rerun import Plan
from jupyter_gpumem.units import format_bytes

_RECORDING_NOTE = "as it was, recorded for the prediction"


def _dtype(ctx: FixContext) -> str:
    """bfloat16 where the GPU that ran out computes it natively, else float16."""
    native = backends.active().supports_bf16(ctx.failed.report.device_index)
    return "bfloat16" if native else "float16"


def _gpu(ctx: FixContext) -> str:
    index = ctx.failed.report.device_index
    return "This GPU" if index is None else f"GPU {index}"


def _failed_key(source: str) -> str:
    """Where a fix context remembers that this cell already ran out of memory under autocast."""
    return "autocast-failed:" + hashlib.sha1(source.strip().encode()).hexdigest()[:16]


def _float64_only(ctx: FixContext) -> list[str]:
    """The models the cell uses whose floating-point weights are all float64: autocast casts
    float32 work to bf16/fp16 and leaves float64 as it is, so it saves nothing there."""
    names = names_used(ctx.failed.source, ctx.user_ns)
    dtypes: dict[str, set[str]] = {}
    for name in sorted(names):
        value = ctx.user_ns.get(name)
        if torch_objects.is_module(value):
            found = torch_objects.parameter_dtypes(value)
            if found:
                dtypes[name] = found
    if not dtypes or any(d - {"torch.float64"} for d in dtypes.values()):
        return []
    return sorted(dtypes)


def _compiled(ctx: FixContext) -> list[str]:
    ns = ctx.user_ns
    names = names_used(ctx.failed.source, ns)
    return torch_objects.compiled_names(ns, names | torch_objects.read_by_compiled(ns, names))


def _compiled_note(compiled: list[str], graphs_before: int | None) -> str:
    """Autocast is part of what dynamo guards on: a compiled model compiles again under it."""
    after = torch_objects.compiled_graphs()
    made = (after or 0) - (graphs_before or 0)
    measured = f" ({made} graph{'s' if made != 1 else ''} compiled in this run)" if made > 0 else ""
    names = ", ".join(f"`{n}`" for n in compiled)
    return (
        f"{names} {'is' if len(compiled) == 1 else 'are'} compiled (torch.compile): under autocast "
        f"it compiles again at its first run{measured}; later runs reuse that."
    )


class _Recording:
    """A plan's context: the run's ops recorded (``record_ops``); ``log`` None where it failed."""

    def __init__(self) -> None:
        self.log: OpLog | None = None
        self._cm: Any = None

    def __call__(self) -> _Recording:
        return self

    def __enter__(self) -> _Recording:
        try:
            self._cm = record_ops()
            self.log = self._cm.__enter__()
        except Exception:
            self._cm = self.log = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._cm is not None:
            try:
                self._cm.__exit__(*exc)
            except Exception:
                self.log = None


def _recording_plan(ctx: FixContext, recording: _Recording) -> tuple[Plan, int | None, int | None]:
    """The rehearsal that records: at a smaller prime batch where the cell's batch is found (it
    fits, so the whole pass is recorded, then scaled back to the cell's batch), else the cell as
    it was (recorded up to where it runs out). (plan, the cell's batch, the batch recorded at)."""
    source = ctx.failed.source
    whole = Plan(source, contexts=[recording], rehearsal=True, note=_RECORDING_NOTE)
    try:
        finding = find_batch(
            source,
            ctx.user_ns,
            batch_var=ctx.batch_var,
            evidence=failing_tensors(ctx.failed),
            used=names_used(source, ctx.user_ns),
            evaluation=evaluation_reason(ctx.failed),
        )
    except Exception:
        return whole, None, None
    batch = finding.value
    if not finding.sites or batch < 4 * MIN_PRIME_BATCH:
        return whole, None, None
    at = prime_at_most(batch // 4, MIN_PRIME_BATCH)
    try:
        new_source, updates = apply_batch(source, finding, at)
    except Exception:
        return whole, None, None
    note = f"batch {at}, recorded for the prediction at {batch}"
    plan = Plan(
        new_source, [recording], namespace_updates=updates, batch=at, rehearsal=True, note=note
    )
    return plan, batch, at


def _device_type() -> str:
    try:
        return backends.active().autocast_device_type()
    except Exception:
        return "cuda"


class Autocast(Fix):
    key = "autocast"
    label = "Enable autocast"

    def check(self, ctx: FixContext) -> Check:
        if torch_objects.torch_module() is None:
            return Check(False, "", "torch is not imported in this kernel")
        d = ctx.failed.diagnosis
        dtype = _dtype(ctx)
        action = (
            f"Re-run the cell under torch.autocast ({dtype}): matmuls and convolutions compute in "
            f"{dtype}, so activations take about half the memory. Numerics change."
        )
        if ctx.failed.report.backend == "CPU":
            return Check(False, action, "the machine's RAM ran out, not the GPU's memory")
        if "autocast" in ctx.failed.source:
            return Check(False, action, "the cell already uses autocast")
        if d is not None and d.causes and d.causes[0].key == "request_exceeds_card":
            return Check(False, action, "one allocation is larger than the card even at half size")
        known = predict.remembered(ctx.failed.source, ctx.remembered)
        if ctx.remembered.get(_failed_key(ctx.failed.source)):
            why = "this cell already ran out of memory under autocast"
            if known is not None:
                why += f" ({predict.need_words(known)[:-1]})"
            return Check(False, action, why)
        wide = _float64_only(ctx)
        if wide:
            names = ", ".join(f"`{n}`" for n in wide)
            return Check(
                False, action, f"{names} computes in float64, which autocast leaves as it is"
            )
        if known is not None:
            return Check(True, action, "", known.saving_bytes, basis=predict.REPLAYED)
        saving = None
        if d is not None and d.working_set_bytes is not None:
            saving = d.working_set_bytes // 2
        return Check(True, action, "", saving, basis=predict.ESTIMATE if saving else "")

    def _record(self, ctx: FixContext) -> tuple[predict.Prediction | None, list[Attempt], str]:
        """The cell as it was, rehearsed with its ops recorded, replayed under autocast: the
        prediction made before the real run (None where no recording could be made, or it does
        not hold for this cell: then why, for the outcome)."""
        if ctx.run is None or ctx.max_runs < 2:
            return None, [], ""
        recording = _Recording()
        plan, batch, at = _recording_plan(ctx, recording)
        result, attempt = self.run_once(ctx, plan)
        log = recording.log
        if log is None or not log.complete:
            return None, [attempt], ""
        report = result.failure.report if result.failure is not None else None
        failed = report.requested_bytes if report is not None else None
        if at is not None and batch is not None:
            failed = predict.scaled_request(log, failed, at, batch)
            log = predict.scaled(log, at, batch)
        prediction = predict.replay_autocast(log, _device_type(), failed)
        prediction = dataclasses.replace(
            prediction,
            recorded_at=at,
            batch=batch if at is not None else None,
            capacity=result.capacity_bytes,
        )
        d = ctx.failed.diagnosis
        held = (d.allocated_bytes or 0) + (d.requested_bytes or 0) if d is not None else 0
        reached = max(prediction.peak_before, prediction.need_before)
        if not prediction.partial and reached < 0.9 * held:
            # a whole pass replayed as it was does not reach what the failed run held when it
            # ran out: the recording does not scale to this cell's batch (sizes that are not a
            # per-sample size times the batch), so its prediction would be wrong too. (A
            # recording that ran out itself reached its own limit: the state it started from
            # may differ, what a rollback could not put back, so it is not held to this.)
            how = predict.basis_words(prediction).removeprefix("replayed from ")
            return (
                None,
                [attempt],
                f"No prediction: the cell's recorded ops ({how}) replayed as they were reach "
                f"{format_bytes(reached)}, less than the "
                f"{format_bytes(held)} the failed run held when it ran out.",
            )
        predict.remember(ctx.failed.source, ctx.remembered, prediction)
        return prediction, [attempt], ""

    def apply(self, ctx: FixContext) -> FixOutcome:
        check = self.check(ctx)
        prediction, recorded, unsure = self._record(ctx)
        factory, dtype = torch_objects.autocast_factory(ctx.failed.report.device_index)
        graphs = torch_objects.compiled_graphs()
        outcome = self._single_run(
            ctx, Plan(ctx.failed.source, contexts=[factory], note=f"autocast {dtype}"), check
        )
        outcome.attempts[:0] = recorded
        if prediction is not None:
            outcome.predicted_saving_bytes = prediction.saving_bytes
            outcome.predicted_peak_bytes = prediction.peak_after
            outcome.prediction_basis = predict.basis_words(prediction)
        compiled = _compiled(ctx)
        if compiled:
            outcome.notes.append(_compiled_note(compiled, graphs))
        outcome.notes.append(
            f"Numerics change: matmuls ran in {dtype}."
            + (
                f" {_gpu(ctx)} has no bfloat16 in hardware (compute capability below 8.0). "
                "For fp16 training, use torch.amp.GradScaler to avoid underflowing gradients."
                if dtype == "float16"
                else ""
            )
        )
        if outcome.ok:
            outcome.message = f"The cell fits under autocast ({dtype}), {outcome.peak_text()}."
            outcome.change = (
                f"wrap the cell's work in `with torch.autocast('cuda', dtype=torch.{dtype}):`."
            )
        else:
            outcome.message = "Still out of memory under autocast."
            ctx.remembered[_failed_key(ctx.failed.source)] = 1
        said = unsure or _prediction_note(ctx, prediction, outcome, check)
        if said:
            outcome.notes.append(said)
        return outcome


def _prediction_note(
    ctx: FixContext, prediction: predict.Prediction | None, outcome: FixOutcome, check: Check
) -> str:
    """Predicted against measured: the replay's peak where a recording was made, else the
    estimate's saving against the peak the run reached."""
    measured = outcome.peak_bytes if outcome.ok else None
    if prediction is None:
        d = ctx.failed.diagnosis
        if check.predicted_saving_bytes is None or d is None:
            return ""
        before = (d.allocated_bytes or 0) + (d.requested_bytes or 0)
        peak = f"; peak now {format_bytes(measured)}" if measured is not None else ""
        return (
            f"Predicted saving ~{format_bytes(check.predicted_saving_bytes)} ({predict.ESTIMATE})"
            f"{peak} (it needed more than {format_bytes(before)})."
        )
    line = predicted_vs_measured(
        prediction.peak_after, measured, "peak", predict.basis_words(prediction)
    )
    return f"{line} {predict.need_words(prediction)}"

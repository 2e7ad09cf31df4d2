"""Enable autocast: re-run the cell under ``torch.autocast``: bf16 where the GPU that ran out has
it in hardware (compute capability 8.0 on), else fp16 with a GradScaler note (a T4 or V100
emulates bf16, slower than fp16).

Autocast is not a sure saving: it halves activations of matmul-heavy layers, but fp32 weights,
gradients and optimizer state stay (an 8-layer 4096-wide MLP saved 5%, findings §5). So it predicts
from the diagnosis and reports the measured peak beside the prediction.
"""

from __future__ import annotations

import hashlib

from jupyter_gpumem.backends import torch_objects
from jupyter_gpumem.cells.failure import names_used
from jupyter_gpumem.fixes.base import Check, Fix, FixContext, FixOutcome
from jupyter_gpumem.rescue.rerun import Plan
from jupyter_gpumem.units import format_bytes


def _dtype(ctx: FixContext) -> str:
    """bfloat16 where the GPU that ran out computes it natively, else float16."""
    native = torch_objects.supports_bf16(ctx.failed.report.device_index)
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
        if ctx.remembered.get(_failed_key(ctx.failed.source)):
            return Check(False, action, "this cell already ran out of memory under autocast")
        wide = _float64_only(ctx)
        if wide:
            names = ", ".join(f"`{n}`" for n in wide)
            return Check(
                False, action, f"{names} computes in float64, which autocast leaves as it is"
            )
        saving = None
        if d is not None and d.working_set_bytes is not None:
            saving = d.working_set_bytes // 2
        return Check(True, action, "", saving)

    def apply(self, ctx: FixContext) -> FixOutcome:
        check = self.check(ctx)
        factory, dtype = torch_objects.autocast_factory(ctx.failed.report.device_index)
        graphs = torch_objects.compiled_graphs()
        outcome = self._single_run(
            ctx, Plan(ctx.failed.source, contexts=[factory], note=f"autocast {dtype}"), check
        )
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
            d = ctx.failed.diagnosis
            if d is not None and d.working_set_bytes and outcome.peak_bytes is not None:
                before = (d.allocated_bytes or 0) + (d.requested_bytes or 0)
                outcome.notes.append(
                    f"Predicted saving {format_bytes(check.predicted_saving_bytes)}; peak now "
                    f"{format_bytes(outcome.peak_bytes)} (it needed more than {format_bytes(before)})."
                )
        else:
            outcome.message = "Still out of memory under autocast."
            ctx.remembered[_failed_key(ctx.failed.source)] = 1
        return outcome

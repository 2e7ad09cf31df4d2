"""Move to CPU: re-run with CUDA placements sent to the CPU (a torch function mode) after moving
the GPU objects the cell reads (models, tensors, optimizer state) to the CPU.

What the mode cannot redirect is said, not hidden: ``torch.cuda.*`` calls, ``torch.load`` with a
CUDA ``map_location``, the legacy ``torch.cuda.FloatTensor`` types.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager
from typing import Any

from jupyter_gpumem.backends import active, cuda_to_cpu, torch_objects
from jupyter_gpumem.fixes.base import Check, Fix, FixContext, FixOutcome
from jupyter_gpumem.rescue.rerun import Plan, names_read
from jupyter_gpumem.units import format_bytes

_UNREDIRECTABLE = (
    (re.compile(r"\btorch\.cuda\.(?!is_available|memory_allocated|max_memory_allocated|empty_cache|synchronize)\w+"), "torch.cuda.* calls"),
    (re.compile(r"map_location\s*=\s*['\"]cuda"), "torch.load(map_location='cuda')"),
    (re.compile(r"\bcuda\.\w+Tensor\b"), "torch.cuda.*Tensor types"),
)  # fmt: skip


def _gpu_names(ctx: FixContext) -> list[str]:
    read = set(names_read(ctx.failed.source))
    d = ctx.failed.diagnosis
    if d is None:
        return []
    return [h.name for h in d.holders.holders if h.where == "variable" and h.name in read]


class MoveToCpu(Fix):
    key = "cpu"
    label = "Move to CPU"

    def check(self, ctx: FixContext) -> Check:
        if torch_objects.torch_module() is None:
            return Check(False, "", "torch is not imported in this kernel")
        if ctx.failed.report.backend == "CPU":
            return Check(False, "", "it is the CPU's memory (RAM) that ran out")
        names = _gpu_names(ctx)
        d = ctx.failed.diagnosis
        moved = 0
        if d is not None:
            moved = sum(h.total_bytes for h in d.holders.holders if h.name in names)
        saving = moved + ((d.working_set_bytes or 0) if d else 0)
        what = ", ".join(f"`{n}`" for n in names[:4]) or "no GPU variables"
        action = (
            f"Move {what} to the CPU and re-run the cell with every CUDA placement sent to the "
            "CPU. Much slower than the GPU."
        )
        return Check(True, action, "", saving or None)

    def apply(self, ctx: FixContext) -> FixOutcome:
        check = self.check(ctx)
        ns = ctx.user_ns
        backend = active()
        moved_names = []
        moved_bytes = 0
        updates: dict[str, Any] = {}
        for name in _gpu_names(ctx):
            if name not in ns:
                continue  # the failed run's own variable, dropped before the re-run makes it again
            obj, n = backend.move_to_cpu(ns[name])
            if n:
                moved_names.append(name)
                moved_bytes += n
                if obj is not ns[name]:
                    updates[name] = obj
                    if ctx.txn is not None:
                        ctx.txn.evict(name)  # the GPU copy must not stay alive in the snapshot
        mode_holder: list[Any] = []

        def redirect() -> AbstractContextManager[Any]:
            mode = cuda_to_cpu.cuda_to_cpu()
            mode_holder.append(mode)
            return mode

        # CPU tensors must not count against the GPU (they would on the simulated one)
        contexts = [backend.host_only, redirect]
        outcome = self._single_run(
            ctx,
            Plan(ctx.failed.source, contexts=contexts, namespace_updates=updates, note="on CPU"),
            check,
        )
        if moved_names:
            outcome.notes.append(
                f"Moved to the CPU: {', '.join(f'`{n}`' for n in moved_names)} "
                f"({format_bytes(moved_bytes)}); they stay there."
            )
        redirected = getattr(mode_holder[0], "redirected", None) if mode_holder else None
        if redirected:
            outcome.notes.append(
                "Redirected to the CPU: " + ", ".join(f"{k} ×{v}" for k, v in redirected.items())
            )
        missed = [label for rx, label in _UNREDIRECTABLE if rx.search(ctx.failed.source)]
        if missed:
            outcome.notes.append("Not redirected (still CUDA): " + ", ".join(missed))
        outcome.notes.append("Runs on the CPU: expect it to be much slower than on the GPU.")
        if outcome.ok:
            outcome.message = f"The cell ran on the CPU ({outcome.runs} run)."
            outcome.change = "Use device = 'cpu' in the cell (or keep running it this way)."
        elif outcome.failure is not None and outcome.failure.report.backend == "CPU":
            req = outcome.failure.report.requested_bytes
            outcome.message = (
                f"The CPU ran out of memory too (tried to allocate {format_bytes(req)}): "
                "this cell needs less memory, not another device."
            )
        else:
            outcome.message = "Still out of memory when moved to the CPU."
        return outcome

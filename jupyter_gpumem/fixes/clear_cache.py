"""Clear cache: free what the failure pinned, collect garbage, give the allocator's cache (and cuBLAS
workspaces) back to the driver; on request only, drop the output cache and delete named variables.
Then re-run the cell as it is.
"""

from __future__ import annotations

import gc
import sys

from jupyter_gpumem import backends
from jupyter_gpumem.backends import torch_objects
from jupyter_gpumem.diagnosis.diagnose import Diagnosis
from jupyter_gpumem.fixes import predict
from jupyter_gpumem.fixes.base import Check, Fix, FixContext, FixOutcome, predicted_vs_measured
from jupyter_gpumem.readings.allocator_state import read_allocator_state
from jupyter_gpumem.readings.release import release_failed_cell
from jupyter_gpumem.rescue.rerun import Plan
from jupyter_gpumem.units import format_bytes

_OUTPUT_NAMES = ("_", "__", "___")


def output_cache_bytes(ctx: FixContext) -> int:
    d = ctx.failed.diagnosis
    return d.holders.where_bytes("output cache") if d else 0


def drop_output_cache(shell: object) -> None:
    """What ``%reset -f out`` does, without its printing."""
    ns = shell.user_ns  # type: ignore[attr-defined]
    hidden = getattr(shell, "user_ns_hidden", {})
    out = ns.get("Out")
    if isinstance(out, dict):
        for n in list(out):
            ns.pop(f"_{n}", None)
        out.clear()
    for name in _OUTPUT_NAMES:
        if name in ns:
            ns[name] = ""
        if name in hidden:
            hidden[name] = ""
    dh = getattr(shell, "displayhook", None)
    if dh is not None:
        for attr in _OUTPUT_NAMES:
            if hasattr(dh, attr):
                setattr(dh, attr, "")


def _releasable_now(d: Diagnosis) -> int | None:
    """What ``empty_cache`` would give back now: the bytes in segments with no live block, from
    the allocator's own snapshot (the failed frames already released); None where unreadable."""
    if torch_objects.torch_module() is None:
        return None
    try:
        state = read_allocator_state(d.requested_bytes, d.report.device_index)
    except Exception:
        return None
    return state.blocks.releasable_bytes if state.blocks is not None else None


def _reserved(d: Diagnosis | None) -> int | None:
    """What PyTorch reserves now on the device that ran out."""
    stats = backends.active().allocator_stats(d.report.device_index if d is not None else None)
    return None if stats is None else stats.get("reserved_bytes.all.current")


def _allocated() -> int | None:
    """What PyTorch's tensors hold now on the current device."""
    stats = backends.active().allocator_stats()
    return None if stats is None else stats.get("allocated_bytes.all.current", 0)


class ClearCache(Fix):
    key = "clear"
    label = "Clear cache"

    def check(self, ctx: FixContext) -> Check:
        d = ctx.failed.diagnosis
        if d is None:
            return Check(True, "Free cached memory, then re-run the cell.")
        pinned = 0 if d.released else d.holders.where_bytes("failed frame")
        cache = 0
        if d.reserved_bytes is not None and d.allocated_bytes is not None:
            cache = max(d.reserved_bytes - d.allocated_bytes, 0)
        releasable = _releasable_now(d)
        if releasable is not None:  # the allocator's own blocks: a free block in a segment that
            cache = releasable  # also holds a tensor stays reserved after empty_cache
        dropped = sum(
            h.total_bytes for h in d.holders.holders if h.where == "variable" and h.name in ctx.drop
        )
        stale = [h for h in d.recreated_variables() if h.name not in ctx.drop]
        dropped += sum(h.total_bytes for h in stale)
        out = output_cache_bytes(ctx) if ctx.drop_output_cache else 0
        saving = pinned + cache + dropped + out
        parts = ["free what the failure pinned" if pinned else "collect garbage"]
        parts.append("return PyTorch's cached blocks to the driver")
        if stale:
            parts.append(
                "drop the old "
                + ", ".join(f"`{h.name}`" for h in stale[:4])
                + " (the cell rebuilds it)"
            )
        if ctx.drop:
            parts.append("delete " + ", ".join(f"`{n}`" for n in ctx.drop))
        if ctx.drop_output_cache:
            parts.append("clear the output cache (Out, _)")
        joined = "; ".join(parts)
        action = joined[:1].upper() + joined[1:] + "; then re-run the cell."
        short = d.shortfall_bytes
        if d.causes and d.causes[0].key == "request_exceeds_card":
            return Check(
                False,
                action,
                f"One allocation of {format_bytes(d.requested_bytes)} is larger than the card: "
                "clearing cannot make room for it.",
                saving,
            )
        if short and saving < short and not ctx.drop and not ctx.drop_output_cache:
            offers = [h for h in d.unused_variables() if h.total_bytes]
            if offers or output_cache_bytes(ctx):
                action += " It can also delete variables this cell does not use: choose them."
        basis = predict.MEASURED if releasable is not None else ""
        return Check(True, action, "", saving, basis=basis)

    def apply(self, ctx: FixContext) -> FixOutcome:
        check = self.check(ctx)
        notes = []
        ns = ctx.user_ns
        d = ctx.failed.diagnosis
        for h in d.recreated_variables() if d else []:
            if h.name in ns and h.name not in ctx.drop:
                del ns[h.name]
                if ctx.txn is not None:
                    ctx.txn.release(h.name)  # deleted as the fix says: not kept alive, not put back
                notes.append(f"dropped the old `{h.name}` (the cell rebuilds it)")
        for name in ctx.drop:
            if name in ns:
                del ns[name]
                if ctx.txn is not None:
                    ctx.txn.release(name)
                notes.append(f"deleted `{name}`")
        if ctx.drop_output_cache:
            drop_output_cache(ctx.shell)
            notes.append("cleared the output cache")
        before = _allocated()
        reserved = _reserved(d)
        release_failed_cell(ctx.shell, getattr(sys, "last_value", None))
        gc.collect()
        backends.active().empty_cache()
        after = _allocated()
        if before is not None and after is not None and before > after:
            notes.append(f"freed {format_bytes(before - after)}")
        left = _reserved(d)
        if check.predicted_saving_bytes is not None and reserved is not None and left is not None:
            notes.append(  # what clearing gave back, before the re-run: the saving it predicted
                predicted_vs_measured(
                    check.predicted_saving_bytes,
                    max(reserved - left, 0),
                    "saving",
                    "the allocator's blocks read before clearing"
                    if check.basis == predict.MEASURED
                    else "",
                )
            )
        outcome = self._single_run(ctx, Plan(ctx.failed.source, note="after clearing"), check)
        outcome.notes = notes
        outcome.message = (
            f"The cell fits after clearing, {outcome.peak_text()}."
            if outcome.ok
            else "Still out of memory after clearing."
        )
        if outcome.ok and ctx.drop:
            outcome.change = "Keep " + ", ".join(f"`{n}`" for n in ctx.drop) + " deleted."
        return outcome

"""Clear cache: free what the failure pinned, collect garbage, give the allocator's cache (and cuBLAS
workspaces) back to the driver; on request only, drop the output cache and delete named variables.
Then re-run the cell as it is.

It also frees what an earlier failure's frames still hold. The hook keeps a failure's frames for
``%debug`` with their GPU locals moved to host memory, except a tensor a variable also held then
(copying it would free nothing). When the cell runs again and rebinds that variable, the old tensor
is held by those frames alone, which ``%debug`` no longer shows (it reads the latest failure): the
cell run twice, its old ``x`` in the first failure's ``model(x)`` frames. Clearing those frames
gives it back; the prediction counts it (it was 32 MiB under, 'not yet explained', before).
"""

from __future__ import annotations

import gc
import sys
import types
from typing import Any

from jupyter_gpumem import backends
from jupyter_gpumem.backends import torch_objects
from jupyter_gpumem.diagnosis.model import Diagnosis
from jupyter_gpumem.fixes import predict
from jupyter_gpumem.fixes.base import Check, Fix, FixContext, FixOutcome, predicted_vs_measured
from jupyter_gpumem.oom.report import is_oom, walk_chain
from jupyter_gpumem.readings.allocator_state import read_allocator_state
from jupyter_gpumem.readings.release import clear_frames, release_failed_cell
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


_UNPLACED_BYTES = 1 << 20  # less than this allocated beyond what the holders name: no search
_CANDIDATES = 16  # tensors of earlier failures' frames looked at, largest first


def _current_chain() -> set[int]:
    ids: set[int] = set()
    for name in ("last_value", "last_exc"):
        ids |= {id(e) for e in walk_chain(getattr(sys, name, None))}
    ids |= {id(e) for e in walk_chain(sys.exc_info()[1])}
    return ids


def _earlier_failures(ns: dict[str, Any]) -> list[BaseException]:
    """OOM errors of earlier cells still alive with their frames: not the latest failure (what
    ``%debug`` shows), not one the notebook keeps in a variable (``err = e``). Found as what
    refers to ``torch.OutOfMemoryError`` (an instance refers to its class): one walk of the heap,
    not a look at every object (0.22 s in a kernel of 390,000 objects)."""
    torch = torch_objects.torch_module()
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if not isinstance(oom_type, type) or not issubclass(oom_type, BaseException):
        return []
    skip = _current_chain() | {id(v) for v in ns.values() if isinstance(v, BaseException)}
    found: list[BaseException] = []
    for o in gc.get_referrers(oom_type):
        if not isinstance(o, oom_type) or id(o) in skip:
            continue
        if o.__traceback__ is not None and is_oom(o):
            found.append(o)
    return found


def _frame_tensors(excs: list[BaseException]) -> tuple[list[Any], list[types.FrameType]]:
    """The GPU tensors the finished frames of ``excs`` hold (locals, and tuples, lists and dicts
    among them: ``args``), each storage once, largest first; and those frames."""
    backend = backends.active()
    frames: list[types.FrameType] = []
    for exc in excs:
        for e in walk_chain(exc):
            tb = e.__traceback__
            while tb is not None and len(frames) < 1000:
                frames.append(tb.tb_frame)
                tb = tb.tb_next
    by_storage: dict[Any, tuple[int, Any]] = {}
    frames = [f for f in frames if f.f_code.co_flags & 0x0002]  # a module's: a namespace
    for f in frames:
        try:
            values = list(f.f_locals.values())
        except Exception:
            continue
        for v in values:
            items = list(v.values()) if type(v) is dict else v if type(v) in (tuple, list) else [v]
            for t in items[:64]:
                if not torch_objects.is_tensor(t):
                    continue
                info = backend.storage_of(t)
                if info is not None:
                    by_storage.setdefault(info[0], (info[1], t))
    ranked = sorted(by_storage.values(), key=lambda nt: -nt[0])[:_CANDIDATES]
    return [t for _n, t in ranked], frames


def _running() -> set[int]:
    f: types.FrameType | None = sys._getframe(1)
    ids = set()
    while f is not None:
        ids.add(id(f))
        f = f.f_back
    return ids


_BOXES = (tuple, list, dict, types.CellType)
_LEVELS = 3  # a tensor in a tuple in a frame's cached f_locals dict: three holders up
_BIG = 10_000  # a container this long is not looked into for the tensors


def _boxes_between(frames: list[types.FrameType], tensors: list[Any]) -> list[Any]:
    """The tuples, lists, dicts and cells by which the frames reach the tensors, up to two
    levels (a frame's cached ``f_locals`` dict -> ``args`` -> the tensor): the containers whose
    own holders decide whether the tensors go with the frames."""
    skip = {id(f.f_globals) for f in frames} | {id(f.f_builtins) for f in frames}
    first: dict[int, Any] = {}
    for f in frames:
        for r in gc.get_referents(f):
            if type(r) in _BOXES and id(r) not in skip and _small(r):
                first[id(r)] = r
    second: dict[int, Any] = {}
    for b in first.values():
        for r in gc.get_referents(b):
            if type(r) in _BOXES and id(r) not in first and _small(r):
                second[id(r)] = r
    boxes = {**first, **second}
    refs = {k: {id(x) for x in gc.get_referents(b)} for k, b in boxes.items()}
    wanted = {id(t) for t in tensors}
    between: dict[int, Any] = {}
    for _ in range(_LEVELS):  # a box qualifies if it holds a tensor or a box that qualifies
        more = {k: boxes[k] for k, r in refs.items() if k not in between and r & wanted}
        if not more:
            break
        between.update(more)
        wanted |= set(more)
    return list(between.values())


def _small(box: Any) -> bool:
    return type(box) is types.CellType or len(box) <= _BIG


def _only_held_by(frames: list[types.FrameType], tensors: list[Any]) -> list[bool]:
    """Whether each tensor is held by these frames alone (directly, or through tuples, lists,
    dicts and cells that only they hold: ``args``, a frame's cached ``f_locals``, a closure's
    cell): clearing the frames frees it. Held by anything else (a variable, a model, the running
    code): False. One walk of the heap (``gc.get_referrers``) for all of them. A holder that
    ``gc.freeze()`` took out of the collector's view is not seen: a notebook that froze a
    container holding such a tensor gets a prediction over by that tensor (the measurement says
    so)."""
    frame_ids = {id(f) for f in frames}
    targets = [*tensors, *_boxes_between(frames, tensors)]
    wanted = {id(o) for o in targets}
    holders: dict[int, list[Any]] = {}
    found = gc.get_referrers(*targets)
    mine = {id(targets), id(found), id(tensors), id(frames)} | _running()
    for r in found:
        if id(r) in mine:
            continue
        for x in gc.get_referents(r):
            if id(x) in wanted:
                holders.setdefault(id(x), []).append(r)
    found.clear()  # the referrers found, let go now (not left for the garbage collector)
    memo: dict[int, bool] = {}
    out = [_alone(id(t), 0, frame_ids, holders, memo) for t in tensors]
    holders.clear()
    targets.clear()
    return out


def _alone(
    obj_id: int, depth: int, frames: set[int], holders: dict[int, list[Any]], memo: dict[int, bool]
) -> bool:
    if obj_id in frames:
        return True
    if obj_id in memo:
        return memo[obj_id]
    memo[obj_id] = False  # a cycle among boxes: not shown to go
    rs = holders.get(obj_id) or []
    memo[obj_id] = (
        bool(rs)
        and depth < _LEVELS
        and all(_alone(id(r), depth + 1, frames, holders, memo) for r in rs)
    )
    return memo[obj_id]


def earlier_failures_bytes(ctx: FixContext) -> tuple[int, list[BaseException]]:
    """GPU memory held only by the frames of earlier failures (see the module's docstring), and
    those failures; (0, []) where the diagnosis placed what was allocated (no search then)."""
    d = ctx.failed.diagnosis
    if d is None or d.allocated_bytes is None or torch_objects.torch_module() is None:
        return 0, []
    if not d.released:  # this failure's own frames still hold theirs (counted as pinned)
        return 0, []
    if d.allocated_bytes - d.holders.total_bytes < _UNPLACED_BYTES:
        return 0, []
    excs = _earlier_failures(ctx.user_ns)
    if not excs:
        return 0, []
    tensors, frames = _frame_tensors(excs)
    if not tensors:
        return 0, []
    backend = backends.active()
    index = d.report.device_index
    freed = 0
    for t, alone in zip(tensors, _only_held_by(frames, tensors), strict=True):
        info = backend.storage_of(t) if alone else None
        if info is not None and backends.on_device(info[2], index):  # the card that ran out
            freed += info[1]
    return freed, excs


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
        earlier, _excs = earlier_failures_bytes(ctx)
        saving = pinned + cache + dropped + out + earlier
        parts = ["free what the failure pinned" if pinned else "collect garbage"]
        if earlier:
            parts.append(
                f"free the {format_bytes(earlier)} an earlier failure's frames still hold "
                "(%debug shows only the latest)"
            )
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
        _earlier, excs = earlier_failures_bytes(ctx)
        for exc in excs:
            for e in walk_chain(exc):
                clear_frames(e.__traceback__)
        if excs:
            notes.append(
                f"cleared the frames of {len(excs)} earlier failure{'s' if len(excs) > 1 else ''}"
            )
        del excs
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

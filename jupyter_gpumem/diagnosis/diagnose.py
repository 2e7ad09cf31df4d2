"""``diagnose(report, snapshot, holders, ...) -> Diagnosis``: pure, so it is tested without a GPU.

A Diagnosis holds the numbers (the message's first, the readings' where the message is silent), where
the memory went, and the causes ranked by how much of the shortfall each explains. Every cause carries
its evidence in numbers and one concrete action.

Everything it reads comes in as an argument, read by the layers below (snapshot, holders, the
release, the allocator's settings and blocks, other processes' names) or learnt by the caller that
presents it (the batch that sizes the failing tensors, notes, whether a ready cell was inserted):
nothing here touches the GPU, ``/proc`` or a server. A Diagnosis keeps what was read at the failure
(:class:`Evidence`), so that the presentation passes it to ``diagnose`` with what it learnt: the
diagnosis shown is the one ``diagnose`` returned, never changed after.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace

from jupyter_gpumem.backends import on_device
from jupyter_gpumem.diagnosis.causes import find_causes
from jupyter_gpumem.diagnosis.facts import Facts
from jupyter_gpumem.diagnosis.model import (
    Cause,
    Diagnosis,
    Evidence,
    Slice,
    _capacity,
    _recreated,
    _shortfall,
    _unused,
)
from jupyter_gpumem.oom.report import OOMReport
from jupyter_gpumem.readings.allocator_state import AllocatorState
from jupyter_gpumem.readings.holders import HolderSet
from jupyter_gpumem.readings.release import ReleaseResult
from jupyter_gpumem.readings.snapshot import MemorySnapshot, ProcessInfo
from jupyter_gpumem.readings.trace import LineTotal
from jupyter_gpumem.units import format_bytes as fmt

_SIGNIFICANT = 0.05  # a holder or process under 5% of the card is not a cause on its own

__all__ = ["diagnose"]  # the data model is diagnosis.model


def _first(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


def _breakdown(
    holders: HolderSet,
    allocated: int | None,
    reserved: int | None,
    process_used: int | None,
    others: int,
    free: int | None,
) -> list[Slice]:
    cats = holders.category_bytes()
    slices = [Slice(label, n, "pytorch") for label, n in cats.items() if n > 0]
    if allocated is not None:
        rest = allocated - sum(cats.values())
        if rest > 0:
            slices.append(Slice("activations and other tensors", rest, "pytorch"))
    if reserved is not None and allocated is not None and reserved > allocated:
        slices.append(Slice("allocator cache", reserved - allocated, "cache"))
    if process_used is not None and reserved is not None and process_used - reserved >= 1 << 20:
        slices.append(Slice("CUDA context (non-PyTorch)", process_used - reserved, "context"))
    if others:
        slices.append(Slice("other processes", others, "other"))
    if free is not None:
        slices.append(Slice("free", free, "free"))
    return slices


def diagnose(
    report: OOMReport,
    snapshot: MemorySnapshot | None,
    holders: HolderSet,
    *,
    release: ReleaseResult | None = None,
    freed_bytes: int | None = None,
    allocated_after_bytes: int | None = None,
    released: bool = False,
    created: Collection[str] = (),
    held_at_start: int | None = None,
    allocator: AllocatorState | None = None,
    process_names: Mapping[int, str] | None = None,
    batch: str = "",
    notes: Sequence[str] = (),
    insert_cells: bool | None = None,
    allocated_by: Sequence[str] = (),
    allocated_lines: Sequence[LineTotal] = (),
    tracing: bool = False,
) -> Diagnosis:
    """Rank the causes of one OOM. ``snapshot`` is the reading taken at the failure, before release.

    ``release``: what releasing the failed frames did (``freed_bytes``, ``allocated_after_bytes``
    and ``released`` say part of it, for callers without one); ``created``: the variables the
    failing cell itself made (the rest was there before it ran); ``held_at_start``: bytes allocated
    on that device as the cell started, when read; ``allocator``: the caching allocator's settings
    and free blocks at the failure; ``process_names``: pid -> what it is, for the processes the
    message names; ``batch``: the number that sized the failing tensors and where it lives;
    ``notes``: said after the causes; ``insert_cells``: whether a ready cell a cause offers is
    inserted below the failed one (a note says so; False: the note carries the cell; None: no
    note); ``allocated_by``, ``allocated_lines``, ``tracing``: `%gpumem trace on`'s lines."""
    evidence = Evidence(
        report,
        snapshot,
        holders,
        release=release,
        freed_bytes=freed_bytes,
        allocated_after_bytes=allocated_after_bytes,
        released=released,
        created=created,
        held_at_start=held_at_start,
        allocator=allocator,
        process_names=process_names,
        allocated_by=allocated_by,
        allocated_lines=allocated_lines,
        tracing=tracing,
    )
    if release is not None:
        freed_bytes, allocated_after_bytes, released = (
            release.freed_bytes,
            release.allocated_after_bytes,
            True,
        )
    snap = _device_that_ran_out(report, snapshot)
    n = _numbers(report, snap)
    requested = report.requested_bytes
    others = _other_processes(report, snap, process_names or {})
    others_bytes = sum(p.used_bytes for p in others)
    resident = _resident_bytes(holders, snap, created, held_at_start, n.allocated)
    cell_bytes = max((n.allocated or 0) - resident, 0)
    working_set = None if requested is None else cell_bytes + requested

    facts = Facts(
        report=report,
        snapshot=snap,
        holders=holders,
        allocator=allocator,
        requested_bytes=requested,
        total_bytes=n.total,
        allowed_bytes=n.allowed,
        allocated_bytes=n.allocated,
        reserved_bytes=n.reserved,
        capacity_bytes=_capacity(n.total, n.allowed),
        other_processes=others,
        unused=tuple(_unused(holders, report.device_index)),
        recreated=tuple(_recreated(holders, report.device_index)),
        released=released,
        freed_bytes=freed_bytes,
        frames_bytes=holders.where_bytes("failed frame"),
        cache_bytes=holders.where_bytes("output cache"),
        others_bytes=others_bytes,
        big=max(int((n.total or 0) * _SIGNIFICANT), 1),
        short=_shortfall(requested, n.free, n.allowed, n.reserved) or 0,
        resident_bytes=resident,
        cell_bytes=cell_bytes,
        batch=batch,
    )
    causes = find_causes(facts)
    diag = Diagnosis(
        report=report,
        snapshot=snap,
        holders=holders,
        causes=causes,
        requested_bytes=requested,
        free_bytes=n.free,
        total_bytes=n.total,
        allowed_bytes=n.allowed,
        allocated_bytes=n.allocated,
        reserved_bytes=n.reserved,
        other_processes=others,
        breakdown=_breakdown(
            holders, n.allocated, n.reserved, report.process_used_bytes, others_bytes, n.free
        ),
        working_set_bytes=working_set,
        evidence=evidence,
        freed_bytes=freed_bytes,
        allocated_after_bytes=allocated_after_bytes,
        released=released,
        allocator=allocator,
        notes=[*notes, *_ready_cell_note(causes, insert_cells)],
        allocated_by=list(allocated_by),
        allocated_lines=list(allocated_lines),
        tracing=tracing,
    )
    if release is not None and release.frames_kept:
        diag.frames_kept = True
        diag.host_copies_bytes = release.host_bytes
        diag.moved_out = [
            f"`{m.name}` ({m.what}, {fmt(m.gpu_bytes)}{': ' + m.why if m.why else ''})"
            for m in release.moved_out
        ]
    return diag


def _ready_cell_note(causes: list[Cause], insert_cells: bool | None) -> list[str]:
    """What to say of the ready cell a cause offers (the multi-GPU launch)."""
    ready = next((c.cell for c in causes if c.cell), "")
    if not ready or insert_cells is None:
        return []
    if insert_cells:
        return [
            "A ready cell that launches the training on several GPUs is inserted below (not run)."
        ]
    return ["A cell that launches the training on several GPUs:\n" + ready]


def _device_that_ran_out(
    report: OOMReport, snapshot: MemorySnapshot | None
) -> MemorySnapshot | None:
    """The reading of the device that ran out (the snapshot carries every visible one, and the
    reading returned still does)."""
    if snapshot is None or report.device_index is None:
        return snapshot
    ran_out = snapshot.on_device(report.device_index)
    if ran_out is None or ran_out is snapshot:
        return snapshot
    return replace(ran_out, devices=snapshot.devices)


@dataclass(frozen=True)
class _Numbers:
    """The device's numbers at the failure: the message's first, the reading's where it is silent."""

    total: int | None
    free: int | None
    allowed: int | None  # None when the cap is no lower than the card
    allocated: int | None
    reserved: int | None


def _numbers(report: OOMReport, snap: MemorySnapshot | None) -> _Numbers:
    total = _first(report.total_bytes, snap.total_bytes if snap else None)
    free = _first(report.free_bytes, snap.free_bytes if snap else None)
    allowed = _first(report.allowed_bytes, snap.allowed_bytes if snap else None)
    if allowed is not None and total is not None and allowed >= total:
        allowed = None
    allocated = _first(report.allocated_bytes, snap.allocated_bytes if snap else None)
    reserved = _first(report.reserved_bytes, snap.reserved_bytes if snap else None)
    if reserved is None and allocated is not None and report.reserved_unallocated_bytes is not None:
        reserved = allocated + report.reserved_unallocated_bytes
    return _Numbers(total, free, allowed, allocated, reserved)


def _other_processes(
    report: OOMReport, snap: MemorySnapshot | None, names: Mapping[int, str]
) -> tuple[ProcessInfo, ...]:
    """The message's list of other processes when it has one (described from the reading, else
    from ``names``, else not at all), else the reading's."""
    if report.other_processes:
        return tuple(
            ProcessInfo(p.pid, p.used_bytes, _describe_pid(snap, p.pid, names))
            for p in report.other_processes
        )
    return snap.other_processes if snap else ()


def _resident_bytes(
    holders: HolderSet,
    snap: MemorySnapshot | None,
    created: Collection[str],
    held_at_start: int | None,
    allocated: int | None,
) -> int:
    """What was there before the cell ran, so that the rest of what was allocated is the cell's
    own (on the device that ran out: a model on GPU 0 takes no room on GPU 1)."""
    if held_at_start is not None and allocated is not None:
        # the allocator's own count as the cell started: a model's gradients that this cell's
        # backward made are the cell's, though the variable is older
        return min(held_at_start, allocated)
    oom_device = snap.device_index if snap is not None and len(snap.all_devices) > 1 else None
    return sum(
        h.total_bytes
        for h in holders.holders
        if (h.where == "output cache" or (h.where == "variable" and h.name not in created))
        and on_device(h.device, oom_device)
    )


def _describe_pid(snap: MemorySnapshot | None, pid: int, names: Mapping[int, str]) -> str:
    for p in snap.processes if snap else ():
        if p.pid == pid:
            return p.description
    return names.get(pid, "")

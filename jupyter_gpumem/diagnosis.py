"""``diagnose(report, snapshot, holders) -> Diagnosis``: pure, so it is tested without a GPU.

A Diagnosis holds the numbers (the message's first, the readings' where the message is silent), where
the memory went, and the causes ranked by how much of the shortfall each explains. Every cause carries
its evidence in numbers and one concrete action.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .holders import Holder, HolderSet
from .oom import OOMReport
from .readings import MemorySnapshot, ProcessInfo
from .units import format_bytes as fmt

_SIGNIFICANT = 0.05  # a holder or process under 5% of the card is not a cause on its own


@dataclass(frozen=True)
class Cause:
    key: str  # "request_exceeds_card" | "process_cap" | "old_variables" | "other_processes" |
    #          "fragmentation" | "output_cache" | "pinned_by_failure" | "working_set" | "probable"
    title: str
    evidence: str  # the numbers
    action: str  # one concrete thing to do
    weight: float  # bytes of the shortfall it explains (for ranking)


@dataclass(frozen=True)
class Slice:
    """One part of the device's memory at the failure, for the breakdown chart."""

    label: str
    bytes: int
    category: str  # "pytorch" | "cache" | "context" | "other" | "free"


@dataclass
class Diagnosis:
    report: OOMReport
    snapshot: MemorySnapshot | None
    holders: HolderSet
    causes: list[Cause]
    requested_bytes: int | None
    free_bytes: int | None
    total_bytes: int | None
    allowed_bytes: int | None
    allocated_bytes: int | None
    reserved_bytes: int | None
    other_processes: tuple[ProcessInfo, ...]
    breakdown: list[Slice]
    working_set_bytes: int | None  # what the failing cell itself needed beyond what was resident
    freed_bytes: int | None = None  # what releasing the failed cell gave back
    allocated_after_bytes: int | None = None
    released: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def device_label(self) -> str:
        if self.snapshot is not None and self.snapshot.simulated:
            return f"{self.report.device_label} (simulated)"
        return self.report.device_label

    @property
    def capacity_bytes(self) -> int | None:
        """What this process may use: the card, or the per-process cap if lower."""
        if self.total_bytes is None:
            return self.allowed_bytes
        if self.allowed_bytes is None:
            return self.total_bytes
        return min(self.total_bytes, self.allowed_bytes)

    @property
    def shortfall_bytes(self) -> int | None:
        """How much more the allocation needed than there was room for."""
        if self.requested_bytes is None:
            return None
        room = self.free_bytes
        if self.allowed_bytes is not None and self.reserved_bytes is not None:
            cap_room = max(self.allowed_bytes - self.reserved_bytes, 0)
            room = cap_room if room is None else min(room, cap_room)
        if room is None:
            return None
        return max(self.requested_bytes - room, 0)

    @property
    def headline(self) -> str:
        parts = []
        if self.requested_bytes is not None:
            parts.append(f"Tried to allocate {fmt(self.requested_bytes)}")
        if self.free_bytes is not None:
            parts.append(f"with {fmt(self.free_bytes)} free")
        if self.total_bytes is not None:
            parts.append(f"of {fmt(self.total_bytes)}")
        if self.allowed_bytes is not None:
            parts.append(f"({fmt(self.allowed_bytes)} allowed to this process)")
        if not parts:
            return f"Out of memory on {self.device_label}: {self.report.message[:200]}"
        return " ".join(parts) + f" on {self.device_label}."

    def unused_variables(self) -> list[Holder]:
        """Variables the failing cell does not read, largest first."""
        return [
            h
            for h in self.holders.holders
            if h.where == "variable" and not h.used_by_cell and not h.recreated_by_cell
        ]

    def recreated_variables(self) -> list[Holder]:
        """Variables the cell builds anew: their old values stay until the new ones exist."""
        return [h for h in self.holders.holders if h.where == "variable" and h.recreated_by_cell]


def _first(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


def _names(holders: list[Holder], limit: int = 3) -> str:
    shown = ", ".join(f"`{h.name}` {fmt(h.total_bytes)}" for h in holders[:limit])
    more = len(holders) - limit
    return shown + (f" and {more} more" if more > 0 else "")


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
    freed_bytes: int | None = None,
    allocated_after_bytes: int | None = None,
    released: bool = False,
) -> Diagnosis:
    """Rank the causes of one OOM. ``snapshot`` is the reading taken at the failure, before release."""
    snap = snapshot
    total = _first(report.total_bytes, snap.total_bytes if snap else None)
    free = _first(report.free_bytes, snap.free_bytes if snap else None)
    allowed = _first(report.allowed_bytes, snap.allowed_bytes if snap else None)
    if allowed is not None and total is not None and allowed >= total:
        allowed = None
    allocated = _first(report.allocated_bytes, snap.allocated_bytes if snap else None)
    reserved = _first(report.reserved_bytes, snap.reserved_bytes if snap else None)
    if reserved is None and allocated is not None and report.reserved_unallocated_bytes is not None:
        reserved = allocated + report.reserved_unallocated_bytes
    requested = report.requested_bytes
    if report.other_processes:
        others = tuple(
            ProcessInfo(p.pid, p.used_bytes, _describe_pid(snap, p.pid))
            for p in report.other_processes
        )
    else:
        others = snap.other_processes if snap else ()
    others_bytes = sum(p.used_bytes for p in others)

    frames_bytes = holders.where_bytes("failed frame")
    cache_bytes = holders.where_bytes("output cache")
    accounted = sum(h.total_bytes for h in holders.holders if h.where != "failed frame")
    working_set = None
    if requested is not None:
        unattributed = max((allocated or 0) - accounted - frames_bytes, 0)
        working_set = requested + frames_bytes + unattributed

    diag = Diagnosis(
        report=report,
        snapshot=snap,
        holders=holders,
        causes=[],
        requested_bytes=requested,
        free_bytes=free,
        total_bytes=total,
        allowed_bytes=allowed,
        allocated_bytes=allocated,
        reserved_bytes=reserved,
        other_processes=others,
        breakdown=_breakdown(
            holders, allocated, reserved, report.process_used_bytes, others_bytes, free
        ),
        working_set_bytes=working_set,
        freed_bytes=freed_bytes,
        allocated_after_bytes=allocated_after_bytes,
        released=released,
    )
    diag.causes = _causes(diag, frames_bytes, cache_bytes, others_bytes)
    return diag


def _describe_pid(snap: MemorySnapshot | None, pid: int) -> str:
    for p in snap.processes if snap else ():
        if p.pid == pid:
            return p.description
    from .readings import describe_process

    return describe_process(pid)


def _causes(d: Diagnosis, frames_bytes: int, cache_bytes: int, others_bytes: int) -> list[Cause]:
    causes: list[Cause] = []
    total, cap, req = d.total_bytes, d.capacity_bytes, d.requested_bytes
    short = d.shortfall_bytes or 0
    big = max(int((total or 0) * _SIGNIFICANT), 1)

    if d.report.probable:
        causes.append(
            Cause(
                "probable",
                f"Probably out of memory ({d.report.status})",
                f"{d.report.status} is raised when a library cannot get workspace memory, and "
                "sometimes for other reasons.",
                "Run the cell again after Clear cache; if it still fails with more than half the "
                "card free, it is not a memory problem.",
                float("inf"),
            )
        )
    if req is not None and cap is not None and req > cap:
        whole = "the per-process cap" if d.allowed_bytes is not None else "the whole card"
        causes.append(
            Cause(
                "request_exceeds_card",
                "One allocation is larger than the card",
                f"Tried to allocate {fmt(req)}; {whole} is {fmt(cap)}.",
                "Check the tensor's shape (a wrong dimension, or a batch of everything at once); "
                "split the work into chunks. No fix here can make this single allocation fit.",
                float("inf"),
            )
        )
    if d.allowed_bytes is not None and total is not None and d.allowed_bytes < total:
        causes.append(
            Cause(
                "process_cap",
                "A per-process memory cap is set",
                f"This process may use {fmt(d.allowed_bytes)} of the {fmt(total)} card.",
                "Lift it with `%gpumem limit off` (or "
                "`torch.cuda.set_per_process_memory_fraction(1.0)`) if the cap was a rehearsal.",
                float(min(total - d.allowed_bytes, short or total)),
            )
        )
    unused = [h for h in d.unused_variables() if h.total_bytes >= big]
    if unused:
        held = sum(h.total_bytes for h in unused)
        causes.append(
            Cause(
                "old_variables",
                "Variables from earlier cells hold memory",
                (
                    f"`{unused[0].name}` holds {fmt(held)} on the GPU; this cell does not use it."
                    if len(unused) == 1
                    else f"{_names(unused)} ({fmt(held)} in all) stay on the GPU; "
                    "this cell does not use them."
                ),
                f"Delete what you no longer need (`del {unused[0].name}`) and re-run, "
                "or use Clear cache, which offers them one by one.",
                float(held),
            )
        )
    stale = [h for h in d.recreated_variables() if h.total_bytes >= big]
    if stale:
        held = sum(h.total_bytes for h in stale)
        one = len(stale) == 1
        causes.append(
            Cause(
                "recreated_variables",
                "Old values of variables this cell rebuilds",
                f"{_names(stale)} from an earlier run {'stays' if one else 'stay'} allocated while "
                f"this cell builds {'a new one' if one else 'new ones'}: {fmt(held)} needed twice.",
                f"`del {', '.join(h.name for h in stale[:3])}` before re-running, or Clear cache "
                "(it drops them, since this cell recreates them).",
                float(held),
            )
        )
    big_others = [p for p in d.other_processes if p.used_bytes >= big]
    if big_others:
        who = ", ".join(
            f"pid {p.pid} ({p.description}) {fmt(p.used_bytes)}" for p in big_others[:3]
        )
        kernel = any("notebook kernel" in p.description for p in big_others)
        causes.append(
            Cause(
                "other_processes",
                "Other processes use the GPU",
                f"{who}: {fmt(others_bytes)} this process cannot use.",
                "Shut down the other notebook's kernel (Kernel > Shut Down Kernel) and re-run."
                if kernel
                else "Stop those processes or move to a free GPU (CUDA_VISIBLE_DEVICES).",
                float(others_bytes),
            )
        )
    unalloc = d.report.reserved_unallocated_bytes
    if unalloc is None and d.reserved_bytes is not None and d.allocated_bytes is not None:
        unalloc = d.reserved_bytes - d.allocated_bytes
    if unalloc and req and (unalloc >= req or unalloc >= big):
        causes.append(
            Cause(
                "fragmentation",
                "Memory is fragmented",
                f"{fmt(unalloc)} is reserved by PyTorch but unallocated"
                + (f", more than the {fmt(req)} requested" if unalloc >= req else "")
                + ": the free blocks are too small or scattered.",
                "Clear cache returns them to the driver; for good, set "
                "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before torch starts "
                "(restart the kernel).",
                float(unalloc),
            )
        )
    if cache_bytes >= big:
        causes.append(
            Cause(
                "output_cache",
                "The output cache holds tensors",
                f"IPython's output cache (`Out`, `_`) holds {fmt(cache_bytes)} of cell results.",
                "Clear cache can drop it (`%reset -f out` does the same).",
                float(cache_bytes),
            )
        )
    if frames_bytes:
        if d.released and d.freed_bytes is not None:
            evidence = (
                f"The failed call's locals held {fmt(frames_bytes)}, and kept alive what they "
                f"reference (saved activations, the autograd graph): {fmt(d.freed_bytes)} "
                "was freed after the failure."
            )
            action = "Nothing to do: that memory is already back."
        else:
            evidence = f"The failed call's locals hold {fmt(frames_bytes)} until they are freed."
            action = "Run `%gpumem release` when done with `%debug` to get it back."
        causes.append(
            Cause("pinned_by_failure", "The failure pinned memory", evidence, action, 0.0)
        )
    if req is not None and (cap is None or req <= cap):
        ws = d.working_set_bytes or req
        causes.append(
            Cause(
                "working_set",
                "The cell's own working set is too big",
                f"The cell needed {fmt(ws)} beyond what was already resident"
                + (f", {fmt(short)} more than there was room for." if short else "."),
                "Reduce the batch size, enable autocast (bf16) or move the work to the CPU: "
                "the fixes below predict what each saves.",
                float(ws) if not causes else float(short or ws) * 0.5,
            )
        )
    if not causes:
        causes.append(
            Cause(
                "working_set",
                "Out of memory",
                d.report.message[:300],
                "Clear cache and re-run; if it fails again, reduce the batch size.",
                0.0,
            )
        )
    causes.sort(key=lambda c: -c.weight)
    return causes

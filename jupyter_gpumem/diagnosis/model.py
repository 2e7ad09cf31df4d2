"""The diagnosis as data: a :class:`Diagnosis` of one OOM, the :class:`Cause` it ranks, the
:class:`Slice` of its breakdown chart and the :class:`Evidence` it was made from; the readings it
shares with what the rules read (what the process may use, the shortfall, the variables the cell
leaves unused or builds anew). Made by ``diagnose.py``, read by ``render.py``, the fixes and the UI.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from jupyter_gpumem.backends import on_device
from jupyter_gpumem.oom.report import OOMReport
from jupyter_gpumem.readings.allocator_state import AllocatorState
from jupyter_gpumem.readings.holders import Holder, HolderSet
from jupyter_gpumem.readings.release import ReleaseResult
from jupyter_gpumem.readings.snapshot import MemorySnapshot, ProcessInfo
from jupyter_gpumem.readings.trace import LineTotal
from jupyter_gpumem.units import format_bytes as fmt

__all__ = ["Cause", "CauseKey", "Diagnosis", "Evidence", "Slice", "Tier"]

CauseKey = Literal[
    "probable",
    "library",
    "host_memory",
    "request_exceeds_card",
    "model_states_exceed_card",
    "process_cap",
    "old_variables",
    "recreated_variables",
    "other_processes",
    "other_gpu",
    "fragmentation",
    "output_cache",
    "pinned_by_failure",
    "working_set",
    "unknown",
]
# 0: no fix here gets around it; 1: its action closes the gap; 2: helps, not enough (or cannot
# tell); 3: nothing to do
Tier = Literal[0, 1, 2, 3]


@dataclass(frozen=True)
class Cause:
    key: CauseKey
    title: str
    evidence: str  # the numbers
    action: str  # one concrete thing to do
    weight: float  # bytes of the shortfall it explains (for ranking within a tier)
    saving_bytes: int | None = None  # what the action would free
    closes_gap: bool | None = None  # that saving covers the shortfall (None: cannot tell)
    tier: Tier = 2
    cell: str = ""  # a ready cell the user may insert (never run for them)


@dataclass(frozen=True)
class Slice:
    """One part of the device's memory at the failure, for the breakdown chart."""

    label: str
    bytes: int
    category: str  # "pytorch" | "cache" | "context" | "other" | "free"


@dataclass(frozen=True)
class Evidence:
    """What a diagnosis was made from, read at the failure: :func:`diagnose`'s arguments except
    what its presentation learns (``batch``, ``notes``, ``insert_cells``)."""

    report: OOMReport
    snapshot: MemorySnapshot | None
    holders: HolderSet
    release: ReleaseResult | None = None
    freed_bytes: int | None = None
    allocated_after_bytes: int | None = None
    released: bool = False
    created: Collection[str] = ()
    held_at_start: int | None = None
    allocator: AllocatorState | None = None
    process_names: Mapping[int, str] | None = None
    allocated_by: Sequence[str] = ()
    allocated_lines: Sequence[LineTotal] = ()
    tracing: bool = False

    def arguments(self) -> dict[str, Any]:
        """As ``diagnose``'s keyword arguments: ``diagnose(**e.arguments(), batch=...)``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


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
    # what it was made from: the presentation gives it back to diagnose() with what it learnt
    evidence: Evidence = field(repr=False, compare=False)
    freed_bytes: int | None = None  # what releasing the failed cell gave back
    allocated_after_bytes: int | None = None
    released: bool = False
    # the failed frames kept for %debug, their GPU tensors copied to host memory: what the copies
    # take there, and the locals too big for it (described in their place)
    frames_kept: bool = False
    host_copies_bytes: int = 0
    moved_out: list[str] = field(default_factory=list)
    # the caching allocator's settings and free blocks at the failure (None: not read)
    allocator: AllocatorState | None = None
    notes: list[str] = field(default_factory=list)
    # `%gpumem trace on`: live memory by the source line that allocated it ("In [7], line 3: ...")
    allocated_by: list[str] = field(default_factory=list)
    allocated_lines: list[LineTotal] = field(default_factory=list)  # the same, as numbers
    tracing: bool = False

    @property
    def device_label(self) -> str:
        if self.snapshot is not None and self.snapshot.note:
            return f"{self.report.device_label} ({self.snapshot.note})"
        return self.report.device_label

    @property
    def capacity_bytes(self) -> int | None:
        """What this process may use: the card, or the per-process cap if lower."""
        return _capacity(self.total_bytes, self.allowed_bytes)

    @property
    def shortfall_bytes(self) -> int | None:
        """How much more the allocation needed than there was room for."""
        return _shortfall(
            self.requested_bytes, self.free_bytes, self.allowed_bytes, self.reserved_bytes
        )

    @property
    def headline(self) -> str:
        if self.report.backend == "CPU":
            req = self.requested_bytes
            what = f"tried to allocate {fmt(req)}" if req is not None else "an allocation failed"
            return f"Out of host memory (RAM): {what} on the CPU."
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
        """Variables the failing cell does not read, on the device that ran out, largest first."""
        return _unused(self.holders, self.report.device_index)

    def recreated_variables(self) -> list[Holder]:
        """Variables the cell builds anew, on the device that ran out: their old values stay
        until the new ones exist."""
        return _recreated(self.holders, self.report.device_index)


def _capacity(total: int | None, allowed: int | None) -> int | None:
    if total is None:
        return allowed
    if allowed is None:
        return total
    return min(total, allowed)


def _shortfall(
    requested: int | None, free: int | None, allowed: int | None, reserved: int | None
) -> int | None:
    if requested is None:
        return None
    room = free
    if allowed is not None and reserved is not None:
        cap_room = max(allowed - reserved, 0)
        room = cap_room if room is None else min(room, cap_room)
    if room is None:
        return None
    return max(requested - room, 0)


def _unused(holders: HolderSet, device_index: int | None) -> list[Holder]:
    return [
        h
        for h in holders.holders
        if h.where == "variable"
        and not h.used_by_cell
        and not h.recreated_by_cell
        and on_device(h.device, device_index)
    ]


def _recreated(holders: HolderSet, device_index: int | None) -> list[Holder]:
    return [
        h
        for h in holders.holders
        if h.where == "variable" and h.recreated_by_cell and on_device(h.device, device_index)
    ]

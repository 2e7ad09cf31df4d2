"""What the rules read (:class:`Facts`), and the few helpers every rule shares: whether a saving
closes the gap, holders named in evidence, and how large a tensor can stand behind a request the
allocator rounded up to a segment.

Kept apart from the rules so that each group of rules and the table in ``causes.py`` import one
small module, and the rules never import the table that lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from jupyter_gpumem.diagnosis.model import Cause
from jupyter_gpumem.oom.report import OOMReport
from jupyter_gpumem.readings.allocator_state import AllocatorState
from jupyter_gpumem.readings.holders import Holder, HolderSet
from jupyter_gpumem.readings.snapshot import MemorySnapshot, ProcessInfo
from jupyter_gpumem.units import format_bytes as fmt

_MiB = 1 << 20
# The CUDA caching allocator asks the driver for whole segments: 2 MiB for requests up to 1 MiB,
# 20 MiB for requests up to 10 MiB. An OOM message names the segment, not the tensor.
_SEGMENTS = {2 * _MiB: 1 * _MiB, 20 * _MiB: 10 * _MiB}


@dataclass(frozen=True)
class Facts:
    """What the rules read, computed once by ``diagnose`` (the numbers are the message's first,
    the reading's where it is silent); never the Diagnosis that their causes go into."""

    report: OOMReport
    snapshot: MemorySnapshot | None  # the reading of the device that ran out
    holders: HolderSet
    allocator: AllocatorState | None  # the caching allocator's settings and free blocks
    requested_bytes: int | None
    total_bytes: int | None
    allowed_bytes: int | None  # the per-process cap, None when no lower than the card
    allocated_bytes: int | None
    reserved_bytes: int | None
    capacity_bytes: int | None  # what this process may use: the card or its cap
    other_processes: tuple[ProcessInfo, ...]
    unused: tuple[Holder, ...]  # variables the cell does not read, on the device that ran out
    recreated: tuple[Holder, ...]  # variables the cell builds anew, there
    released: bool  # the failed frames were released
    freed_bytes: int | None  # what that gave back
    frames_bytes: int  # held by the failed frames at the failure
    cache_bytes: int  # IPython's output cache
    others_bytes: int  # other processes on the card
    big: int  # the size below which a single holder is not a cause
    short: int  # bytes the allocation lacked (0 when unknown)
    resident_bytes: int  # held by variables that existed before the cell ran
    cell_bytes: int  # allocated by the cell itself when it failed
    # the number that sized the failing tensors and where it lives, when Reduce batch found it
    # ("`test_loader.batch_size` = 1000 sizes `data` (1000, 1, 28, 28)")
    batch: str = ""


Rule = Callable[[Facts], "Cause | None"]


def _closes(saving: int | None, f: Facts) -> bool | None:
    if saving is None or not f.short:
        return None
    return saving >= f.short


def _names(holders: list[Holder], limit: int = 3) -> str:
    shown = ", ".join(f"`{h.name}` {fmt(h.total_bytes)}" for h in holders[:limit])
    more = len(holders) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def tensor_upper_bound(requested: int) -> int:
    """The largest tensor that can stand behind a request of this size (segments are rounded)."""
    return _SEGMENTS.get(requested, requested)

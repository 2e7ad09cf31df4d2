"""The peak of a stretch of work, read without resetting torch's peak counters.

``torch.cuda.reset_peak_memory_stats()`` belongs to the notebook: one that prints
``torch.cuda.max_memory_allocated()`` after its training loop must read the loop's peak, not the
peak since the extension last looked. torch has no call that sets a peak back, so nothing here
resets one. Instead the counters are read before and after:

- the counter rose: the stretch's peak is the new value, exactly;
- it did not: the stretch peaked somewhere between what was allocated at its ends and the counter
  (an earlier, higher peak hides it). Where the stretch's allocations were logged
  (``MemoryBackend.record_sizes``) the log walked from the start gives it; otherwise the reading
  says it is a bound (``exact`` False) and ``at_most_bytes`` is the counter.
"""

from __future__ import annotations

from dataclasses import dataclass

from jupyter_gpumem.backends.allocator import SizeLog, rounded
from jupyter_gpumem.backends.base import active

__all__ = ["PeakWatch", "Peaks", "peak_from_log"]

_ALLOCATED, _ALLOCATED_PEAK = "allocated_bytes.all.current", "allocated_bytes.all.peak"
_RESERVED, _RESERVED_PEAK = "reserved_bytes.all.current", "reserved_bytes.all.peak"
# memory given back to the driver (cudaFree, and the unmapping of expandable segments; older
# torch: segments freed)
_GIVEN_BACK = ("num_device_free", "segment.all.freed")


@dataclass(frozen=True)
class Peaks:
    """What a stretch of work peaked at on one device."""

    allocated_bytes: int  # exact when ``exact``, else the least it can have been
    reserved_bytes: int  # exact when the counter rose, else the least it can have been
    exact: bool
    at_most_bytes: int  # the allocated peak is at most this (== allocated_bytes when exact)
    start_bytes: int = 0  # allocated when the stretch started
    # reserved never fell during the stretch (no segment given back), so its peak is exact
    reserved_exact: bool = False


def peak_from_log(start_bytes: int, log: SizeLog) -> int:
    """The highest ``allocated`` reached while ``log`` ran, from ``start_bytes`` allocated at its
    start: the log's allocations and frees summed in order, each as the block torch counts for it
    (``round_size``: 512-byte granularity; a large block torch leaves unsplit counts up to 1 MiB
    more, so the value is a floor within that)."""
    sizes: dict[int, int] = {}
    now = peak = start_bytes
    for n, size in log.events:
        if n >= 0:
            sizes[n] = block = rounded(size) if size else 0
            now += block
            peak = max(peak, now)
        elif n == -1:
            now -= sizes.pop(size, 0)
        else:
            now -= rounded(size) if size else 0
    return peak


def _nothing_given_back(before: dict[str, int], after: dict[str, int]) -> bool:
    for key in _GIVEN_BACK:
        if key in before and key in after:
            return before[key] == after[key]
    return False  # this torch does not count it


class PeakWatch:
    """Read the counters of device ``index`` (None: the current one) at :meth:`start` and again at
    :meth:`stop`; the peak in between without resetting anything."""

    def __init__(self, index: int | None = None) -> None:
        self.index = index
        self._before: dict[str, int] | None = None

    def start(self) -> bool:
        """Read the counters; False where the device has none to read yet (no CUDA context:
        :meth:`stop` then counts from zero, as the counters will)."""
        self._before = active().allocator_stats(self.index)
        return self._before is not None

    def stop(self, log: SizeLog | None = None) -> Peaks | None:
        """The peak since :meth:`start`. ``log``: the stretch's allocations on this device, if
        they were logged (a complete log turns a bound into the value)."""
        before, self._before = self._before, None
        after = active().allocator_stats(self.index)
        if after is None:
            return None
        if before is None:  # CUDA started during the stretch: every counter started at 0
            before = dict.fromkeys(after, 0)
        start, end = before.get(_ALLOCATED, 0), after.get(_ALLOCATED, 0)
        old_peak, new_peak = before.get(_ALLOCATED_PEAK, 0), after.get(_ALLOCATED_PEAK, 0)
        least_reserved = max(after.get(_RESERVED, 0), before.get(_RESERVED, 0))
        reserved = after.get(_RESERVED_PEAK, 0)
        reserved_exact = reserved > before.get(_RESERVED_PEAK, 0)
        if not reserved_exact:
            reserved = least_reserved
            # reserved falls only when memory goes back to the driver: none did, so it rose
            # monotonically and ended at its peak
            reserved_exact = _nothing_given_back(before, after)
        least = max(start, end)
        if new_peak > old_peak:
            return Peaks(new_peak, reserved, True, new_peak, start, reserved_exact)
        if log is not None and log.complete:
            value = min(max(peak_from_log(start, log), least), max(new_peak, least))
            return Peaks(value, max(reserved, value), True, value, start, reserved_exact)
        return Peaks(least, reserved, False, max(new_peak, least), start, reserved_exact)

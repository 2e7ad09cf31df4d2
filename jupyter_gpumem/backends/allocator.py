"""The caching allocator's arithmetic, and a log of the sizes a run allocated.

PyTorch's CUDA caching allocator does not reserve what a tensor needs but a block: tensors up to
1 MiB pack into 2 MiB blocks, those under 10 MiB share 20 MiB blocks, larger ones take their size
rounded up to 2 MiB (``CUDACachingAllocator.cpp``: kSmallSize, kSmallBuffer, kLargeBuffer,
kMinLargeAlloc, kRoundLarge). On a card of a few hundred MiB that rounding is a fifth of the card;
what runs out is reserved memory, so a model of the need must count blocks, not bytes.

:class:`Pools` is that arithmetic without the cache (freed blocks go back at once): the simulated
card counts with it, and Reduce batch replays a recorded run through it at another batch
(``fixes/batch_replay.py``). :class:`SizeLog` is what a run allocated and freed, in order, as
``MemoryBackend.record_sizes()`` hands it out; :class:`SizeRecorder` fills one from the simulated
card's history hooks. Stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MiB = 1 << 20
SMALL_SIZE = 1 * MiB  # kSmallSize: up to this, the small pool
SMALL_BUFFER = 2 * MiB  # kSmallBuffer: one small-pool block
LARGE_BUFFER = 20 * MiB  # kLargeBuffer: the block a mid-sized allocation gets
MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc: from here on, a block of its own
ROUND_LARGE = 2 * MiB  # kRoundLarge

__all__ = ["Pools", "SizeLog", "SizeRecorder", "ceil_to", "rounded"]


def ceil_to(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def rounded(nbytes: int) -> int:
    """``round_size()``: 512-byte granularity."""
    return 512 if nbytes < 512 else ceil_to(nbytes, 512)


class Pools:
    """Live bytes per pool; ``reserved()`` is what the blocks for them take."""

    __slots__ = ("large", "mid", "small")

    def __init__(self) -> None:
        self.small = self.mid = self.large = 0

    def grow(self, nbytes: int, sign: int) -> None:
        """Count (``sign`` 1) or uncount (-1) one allocation of ``nbytes``."""
        if not nbytes:  # an empty storage takes no block
            return
        size = rounded(nbytes)
        if size <= SMALL_SIZE:
            self.small += sign * size
        elif size < MIN_LARGE_ALLOC:
            self.mid += sign * size
        else:
            self.large += sign * ceil_to(size, ROUND_LARGE)

    def reserved(self) -> int:
        return ceil_to(self.small, SMALL_BUFFER) + ceil_to(self.mid, LARGE_BUFFER) + self.large


@dataclass
class SizeLog:
    """What one run allocated and freed, in order.

    ``resident``: the sizes live when the run started. ``events``: ``(n, size)`` where ``n >= 0``
    is the n-th allocation of the run (of ``size`` bytes), ``n == -1`` a free of the allocation
    numbered ``size``, and ``n == -2`` a free of a resident allocation of ``size`` bytes. The same
    code at another batch gives the same events with other sizes, which is what lets a run be
    replayed at a batch it never ran at.
    """

    resident: list[int] = field(default_factory=list)
    events: list[tuple[int, int]] = field(default_factory=list)
    allocations: int = 0
    complete: bool = True  # False: events were lost (a ring buffer wrapped, a resize)

    def alloc(self, nbytes: int) -> int:
        n = self.allocations
        self.events.append((n, nbytes))
        self.allocations += 1
        return n

    def sizes(self) -> list[int]:
        """The size of each allocation, by number."""
        return [size for n, size in self.events if n >= 0]

    def shape(self) -> list[tuple[int, int]]:
        """The events without the sizes of allocations: equal for the same code at any batch."""
        return [(n, size if n < 0 else 0) for n, size in self.events]


class SizeRecorder:
    """The simulated card's history hooks (``alloc(new, device)``, ``free(key, nbytes, device)``,
    ``oom(size, free, device)``) writing a :class:`SizeLog`; ``resident`` is
    ``card.live_storages()`` at the start."""

    def __init__(self, resident: list[tuple[int, int]], chained: Any = None) -> None:
        self.log = SizeLog(resident=[nbytes for _, nbytes in resident])
        self._resident = {key for key, _ in resident}
        self._numbers: dict[int, int] = {}
        self._chained = chained  # the tracing recorder that had the hook, still told everything

    def alloc(self, new: dict[int, tuple[Any, int]], device: int = 0) -> None:
        for key, (_storage, nbytes) in new.items():
            self._numbers[key] = self.log.alloc(nbytes)
        if self._chained is not None:
            self._chained.alloc(new, device)

    def free(self, key: int, nbytes: int, device: int = 0) -> None:
        n = self._numbers.pop(key, None)
        if n is not None:
            self.log.events.append((-1, n))
        elif key in self._resident:
            self._resident.discard(key)
            self.log.events.append((-2, nbytes))
        if self._chained is not None:
            self._chained.free(key, nbytes, device)

    def oom(self, size: int, free: int, device: int = 0) -> None:
        if self._chained is not None:
            self._chained.oom(size, free, device)

"""The batch replay's own model of PyTorch's CUDA caching allocator, from its documented rules.

Written for the replay alone, from PyTorch's "CUDA semantics: memory management" notes and the
constants and comments of ``c10/cuda/CUDACachingAllocator.cpp``, and sharing no code with the
simulated card (``backends/``), so that the replay's error against the card, or a real GPU, can be
measured rather than being zero by construction. Stdlib only. The rules:

- a request is rounded up to a multiple of 512 bytes (``kMinBlockSize``);
- up to 1 MiB (``kSmallSize``) it comes from the small pool, whose segments are 2 MiB
  (``kSmallBuffer``); larger ones from the large pool, whose segments are 20 MiB
  (``kLargeBuffer``) for requests under 10 MiB (``kMinLargeAlloc``), else the request rounded
  up to 2 MiB (``kRoundLarge``);
- a freed block stays cached in its segment and merges with free neighbours; a request takes the
  smallest cached free block of its pool that holds it (best fit), split when what is left is a
  block worth keeping (at least 512 bytes in the small pool, more than 1 MiB in the large one);
- only when no cached block holds it is a new segment reserved; when that would not fit the card,
  the allocator first gives the cached segments that are entirely free back to the driver and
  tries again.

:meth:`BlockModel.need` reads that last rule at the limit: the card just large enough for a run
is one where every new segment is reserved after the entirely free ones were given back. So the
need is the peak of reserved memory when free segments are released before each new one, and the
fragmentation of partly used segments counts, as it does on the card.

Not modelled (default settings only): ``max_split_size_mb``, ``roundup_power2_divisions``,
``garbage_collection_threshold``, ``expandable_segments`` and the ``cudaMallocAsync`` backend.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

__all__ = ["LARGE_ALONE", "BlockModel", "block_size"]

_MiB = 1 << 20
_MIN_BLOCK = 512  # kMinBlockSize
_SMALL = 1 * _MiB  # kSmallSize: the small pool's largest request
_SMALL_SEGMENT = 2 * _MiB  # kSmallBuffer
_LARGE_SEGMENT = 20 * _MiB  # kLargeBuffer
LARGE_ALONE = 10 * _MiB  # kMinLargeAlloc: from here on, a segment of the request's own size
_ROUND_LARGE = 2 * _MiB  # kRoundLarge


def block_size(nbytes: int) -> int:
    """The block a request of ``nbytes`` takes (``round_size``)."""
    return _MIN_BLOCK if nbytes < _MIN_BLOCK else -(-nbytes // _MIN_BLOCK) * _MIN_BLOCK


def _segment_size(size: int) -> int:
    if size <= _SMALL:
        return _SMALL_SEGMENT
    if size < LARGE_ALONE:
        return _LARGE_SEGMENT
    return -(-size // _ROUND_LARGE) * _ROUND_LARGE


class _Block:
    """A block of a segment, linked to its neighbours in address order."""

    __slots__ = ("free", "next", "prev", "segment", "size", "uid")

    def __init__(self, size: int, segment: _Segment, uid: int) -> None:
        self.size = size
        self.segment = segment
        self.uid = uid
        self.free = True
        self.prev: _Block | None = None
        self.next: _Block | None = None


class _Segment:
    """One reservation from the driver."""

    __slots__ = ("size", "small", "used")

    def __init__(self, size: int, small: bool) -> None:
        self.size = size
        self.small = small
        self.used = 0  # blocks in use


class BlockModel:
    """The allocator's pools, replayed one request and one free at a time."""

    def __init__(self) -> None:
        self.reserved = 0
        self.peak = 0
        self._segments: list[_Segment] = []
        # cached free blocks per pool (small, large), sorted by (size, uid): best fit by bisection
        self._free: dict[bool, list[tuple[int, int, _Block]]] = {True: [], False: []}
        self._live: dict[int, _Block] = {}
        self._uid = 0
        self._resident: dict[int, list[int]] = {}  # size -> keys of the residents of that size

    def alloc(self, key: int, nbytes: int) -> None:
        """Serve request ``key`` of ``nbytes``; ``reserved`` and ``peak`` follow."""
        if nbytes <= 0:
            return
        size = block_size(nbytes)
        small = size <= _SMALL
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i == len(pool):
            self._release_free()
            seg = _Segment(_segment_size(size), small)
            self._segments.append(seg)
            self.reserved += seg.size
            self.peak = max(self.peak, self.reserved)
            block = self._new_block(seg.size, seg)
        else:
            block = pool.pop(i)[2]
        rest = block.size - size
        if (rest >= _MIN_BLOCK) if small else (rest > _SMALL):
            tail = self._new_block(rest, block.segment)
            tail.prev, tail.next = block, block.next
            if block.next is not None:
                block.next.prev = tail
            block.next = tail
            block.size = size
            bisect.insort(pool, (tail.size, tail.uid, tail))
        block.free = False
        block.segment.used += 1
        self._live[key] = block

    def free(self, key: int) -> None:
        block = self._live.pop(key, None)
        if block is None:
            return
        block.free = True
        block.segment.used -= 1
        pool = self._free[block.segment.small]
        for other in (block.next, block.prev):  # merge with free neighbours
            if other is not None and other.free:
                pool.remove((other.size, other.uid, other))
                first, second = (block, other) if other is block.next else (other, block)
                first.size += second.size
                first.next = second.next
                if second.next is not None:
                    second.next.prev = first
                block = first
        bisect.insort(pool, (block.size, block.uid, block))

    def _new_block(self, size: int, segment: _Segment) -> _Block:
        self._uid += 1
        return _Block(size, segment, self._uid)

    def _release_free(self) -> None:
        """At the card's limit: the entirely free cached segments go back to the driver."""
        gone = [s for s in self._segments if s.used == 0]
        if not gone:
            return
        self._segments = [s for s in self._segments if s.used]
        self.reserved -= sum(s.size for s in gone)
        ids = {id(s) for s in gone}
        for pool in self._free.values():  # in place: a caller may hold the list
            pool[:] = [e for e in pool if id(e[2].segment) not in ids]

    @classmethod
    def need(cls, resident: Iterable[int], events: Iterable[tuple[int, int]]) -> int:
        """The reserved peak of a run at the limit: ``resident`` live at the start, then
        ``events`` as :class:`~..backends.allocator.SizeLog` writes them, sized already:
        ``(n, size)`` an allocation, ``(-1, n)`` its free, ``(-2, size)`` a resident's free."""
        model = cls.starting(resident)
        model.replay(events)
        return model.peak

    @classmethod
    def starting(cls, resident: Iterable[int]) -> BlockModel:
        """The pools with ``resident`` live (keys ``-1``, ``-2``, ...), the peak counted from
        there: the state :meth:`replay` goes on from."""
        model = cls()
        for i, nbytes in enumerate(resident):
            key = -(i + 1)
            model.alloc(key, nbytes)
            model._resident.setdefault(nbytes, []).append(key)
        model.peak = model.reserved
        return model

    def replay(self, events: Iterable[tuple[int, int]]) -> None:
        """Go on with ``events`` (as :meth:`need` reads them)."""
        for n, value in events:
            if n >= 0:
                self.alloc(n, value)
            elif n == -1:
                self.free(value)
            else:
                keys = self._resident.get(value)
                if keys:
                    self.free(keys.pop())

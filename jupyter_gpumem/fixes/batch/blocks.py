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

With ``expandable_segments:True`` (:class:`ExpandableModel`, from ``ExpandableSegment``,
``get_free_block``, ``find_expandable_block``, ``try_allocate_expandable_block``, ``map_block``
and ``release_blocks`` / ``unmap_block`` in the same file) each pool has one segment, a range of
address space that is mapped page by page (20 MiB pages for the large pool, 2 MiB for the small
one): a request no cached block holds maps pages at the lowest unmapped range with room (joined to
the free block before it), a block is split whenever 512 bytes are left (in both pools), best fit
counts a free block followed by unmapped space as the size it can grow to, and at the card's
limit the allocator unmaps every whole page inside a free block, wherever it is in the segment,
and tries again. Reserved memory is the pages mapped, so the need is its peak when free pages are
unmapped before each new mapping. The segment's address space (1.125 times the card in torch) is
taken as unbounded.

Not modelled: ``max_split_size_mb``, ``roundup_power2_divisions``,
``garbage_collection_threshold``, ``large_segment_size_mb`` and the ``cudaMallocAsync`` backend.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

__all__ = ["LARGE_ALONE", "BlockModel", "ExpandableModel", "block_size"]

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
    def need(
        cls, resident: Iterable[int], events: Iterable[tuple[int, int]], expandable: bool = False
    ) -> int:
        """The reserved peak of a run at the limit: ``resident`` live at the start, then
        ``events`` as :class:`~..backends.allocator.SizeLog` writes them, sized already:
        ``(n, size)`` an allocation, ``(-1, n)`` its free, ``(-2, size)`` a resident's free.
        ``expandable``: with ``expandable_segments:True`` (:class:`ExpandableModel`)."""
        model = cls.starting(resident, expandable)
        model.replay(events)
        return model.peak

    @classmethod
    def starting(cls, resident: Iterable[int], expandable: bool = False) -> BlockModel:
        """The pools with ``resident`` live (keys ``-1``, ``-2``, ...), the peak counted from
        there: the state :meth:`replay` goes on from. ``expandable``: an
        :class:`ExpandableModel`."""
        model = ExpandableModel() if expandable else BlockModel()
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


_UNBOUNDED = 1 << 62  # the address space of a pool's expandable segment (see the module)


class _Range:
    """A block of an expandable segment: mapped (free or in use) or not, by address."""

    __slots__ = ("free", "mapped", "next", "prev", "ptr", "size")

    def __init__(self, ptr: int, size: int, mapped: bool) -> None:
        self.ptr = ptr
        self.size = size
        self.mapped = mapped
        self.free = True
        self.prev: _Range | None = None
        self.next: _Range | None = None

    def after(self, other: _Range) -> None:
        """Link ``other`` in right after this block (``splice``)."""
        other.prev, other.next = self, self.next
        if self.next is not None:
            self.next.prev = other
        self.next = other

    def growable(self) -> int:
        """The size best fit reads: a free block before unmapped space can grow into it."""
        following = self.next
        return self.size + (following.size if following is not None and not following.mapped else 0)


class _Expanding:
    """One pool's expandable segment: its cached free blocks by (size, address) for best fit,
    its unmapped ranges by address."""

    def __init__(self, page: int) -> None:
        self.page = page
        self.free: list[tuple[int, int, _Range]] = []
        self.unmapped: dict[int, _Range] = {0: _Range(0, _UNBOUNDED, mapped=False)}

    def best_fit(self, size: int) -> _Range | None:
        """``get_free_block``: the smallest cached block that holds ``size``, where a block
        that can grow counts as the size it can grow to."""
        free = self.free
        i = bisect.bisect_left(free, (size, -1))
        if i == len(free):
            return None
        while i + 1 < len(free) and free[i + 1][2].growable() < free[i][2].growable():
            i += 1
        return free.pop(i)[2]

    def insert(self, block: _Range) -> None:
        bisect.insort(self.free, (block.size, block.ptr, block))

    def erase(self, block: _Range) -> None:
        i = bisect.bisect_left(self.free, (block.size, block.ptr))
        if i < len(self.free) and self.free[i][2] is block:
            del self.free[i]

    def merge(self, dst: _Range, src: _Range | None) -> None:
        """``try_merge_blocks``: ``src`` (free, mapped as ``dst`` is) joins ``dst``."""
        if src is None or not src.free or src.mapped != dst.mapped:
            return
        if src.mapped:
            self.erase(src)
        else:
            del self.unmapped[src.ptr]
        if dst.prev is src:
            dst.ptr, dst.prev = src.ptr, src.prev
            if src.prev is not None:
                src.prev.next = dst
        else:
            dst.next = src.next
            if src.next is not None:
                src.next.prev = dst
        dst.size += src.size

    def find(self, size: int) -> _Range:
        """``find_expandable_block``: the lowest unmapped range with room for ``size``, from the
        free block before it where there is one."""
        block: _Range | None
        for ptr in sorted(self.unmapped):
            candidate = self.unmapped[ptr]
            if candidate.prev is not None and candidate.prev.free:
                candidate = candidate.prev
            room, block = 0, candidate
            while room < size and block is not None and block.free:
                room += block.size
                block = block.next
            if room >= size:
                return candidate
        raise AssertionError("the last unmapped range is unbounded")  # pragma: no cover

    def map(self, block: _Range, size: int) -> int:
        """``map_block``: the pages under ``block``'s first ``size`` bytes mapped (``block``
        starts a page); the bytes mapped."""
        page = self.page
        mapped = -(-size // page) * page
        del self.unmapped[block.ptr]
        block.mapped = True
        if mapped < block.size:
            rest = _Range(block.ptr + mapped, block.size - mapped, mapped=False)
            block.after(rest)
            self.unmapped[rest.ptr] = rest
            block.size = mapped
        self.merge(block, block.prev)
        self.merge(block, block.next)
        self.insert(block)
        return mapped

    def unmap(self, block: _Range) -> int:
        """``unmap_block``: every whole page inside the free ``block`` unmapped; the bytes."""
        page = self.page
        begin = -(-block.ptr // page) * page
        end = (block.ptr + block.size) // page * page
        if begin >= end:
            return 0
        self.erase(block)
        if begin > block.ptr:  # prev? -> before -> block
            before = _Range(block.ptr, begin - block.ptr, mapped=True)
            if block.prev is not None:
                block.prev.after(before)
            else:
                before.next, block.prev = block, before
            self.insert(before)
        if end < block.ptr + block.size:  # block -> after -> next?
            after = _Range(end, block.ptr + block.size - end, mapped=True)
            block.after(after)
            self.insert(after)
        block.ptr, block.size, block.mapped = begin, end - begin, False
        self.merge(block, block.prev)
        self.merge(block, block.next)
        self.unmapped[block.ptr] = block
        return end - begin


class ExpandableModel(BlockModel):
    """:class:`BlockModel` with ``expandable_segments:True`` (see the module): one segment per
    pool, mapped page by page, its free pages unmapped at the card's limit."""

    def __init__(self) -> None:
        super().__init__()
        self._pools = {True: _Expanding(_SMALL_SEGMENT), False: _Expanding(_LARGE_SEGMENT)}
        self._in_use: dict[int, tuple[_Range, _Expanding]] = {}

    def alloc(self, key: int, nbytes: int) -> None:
        if nbytes <= 0:
            return
        size = block_size(nbytes)
        pool = self._pools[size <= _SMALL]
        block = pool.best_fit(size)
        if block is None:
            self._release_free()
            block = self._expand(pool, size)
        if block.size - size >= _MIN_BLOCK:  # should_split: 512 bytes left, in both pools
            rest = _Range(block.ptr + size, block.size - size, mapped=True)
            block.after(rest)
            block.size = size
            pool.insert(rest)
        block.free = False
        self._in_use[key] = block, pool

    def _expand(self, pool: _Expanding, size: int) -> _Range:
        """``try_allocate_expandable_block``: pages mapped until a free block holds ``size``."""
        candidate = pool.find(size)
        if not candidate.mapped:
            self._mapped(pool.map(candidate, min(candidate.size, size)))
        while candidate.size < size:  # free -> unmapped -> ...: map some, merged into one
            following = candidate.next
            assert following is not None and not following.mapped
            self._mapped(pool.map(following, min(size - candidate.size, following.size)))
            candidate = following
        pool.erase(candidate)
        return candidate

    def _mapped(self, nbytes: int) -> None:
        self.reserved += nbytes
        self.peak = max(self.peak, self.reserved)

    def free(self, key: int) -> None:
        found = self._in_use.pop(key, None)
        if found is None:
            return
        block, pool = found
        block.free = True
        pool.merge(block, block.prev)
        pool.merge(block, block.next)
        pool.insert(block)

    def _release_free(self) -> None:
        """``release_cached_blocks`` at the limit: the whole pages inside each cached free
        block unmapped, the large pool first."""
        for small in (False, True):
            pool = self._pools[small]
            for _, _, block in list(pool.free):
                self.reserved -= pool.unmap(block)

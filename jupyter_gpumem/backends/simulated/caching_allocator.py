"""PyTorch's CUDA caching allocator, ported: what a simulated card reserves, block by block.

A port of ``DeviceCachingAllocator`` from ``c10/cuda/CUDACachingAllocator.cpp`` (torch 2.13),
function for function where the name is kept (``round_size``, ``get_free_block``,
``should_split``, ``alloc_block``, ``free_block``, ``try_merge_blocks``,
``release_available_cached_blocks``, ``release_cached_blocks``,
``garbage_collect_cached_blocks``, the expandable segments' ``map_block`` / ``unmap_block``), with
the settings :mod:`jupyter_gpumem.backends.alloc_conf` reads from ``PYTORCH_CUDA_ALLOC_CONF``.

- Requests are rounded to 512 bytes (or to a power-of-two division, ``roundup_power2_divisions``).
  Up to 1 MiB they come from the small pool, whose segments are 2 MiB; larger ones from the large
  pool: under 10 MiB a 20 MiB segment (``large_segment_size_mb``), from there the request rounded
  up to 2 MiB.
- A freed block stays reserved, cached in its pool, merged with free neighbours of its segment; a
  request takes the smallest cached block that holds it (best fit), split when the rest is worth
  keeping (over 1 MiB in the large pool, 512 bytes in the small one).
- ``max_split_size_mb``: blocks that large are never split, and not handed to a much smaller
  request; ``garbage_collection_threshold`` frees old cached blocks once reserved memory passes
  that share of the allowed memory (only with a per-process fraction set, as in torch).
- When the driver has no room for a new segment, the allocator frees cached oversize blocks, then
  every cached segment that is wholly free, and tries again, before its OOM.
- ``expandable_segments:True``: one segment per pool that grows by mapping pages (2 MiB for the
  small pool, 20 MiB for the large one) and gives back its wholly free pages on ``empty_cache``.

Not modelled: streams (everything runs on one), CUDA graphs' private pools, events (a freed block
is free at once), IPC, and the ``cudaMallocAsync`` backend (the simulation refuses it, see
``lifecycle.start``). The driver is a number: ``capacity`` bytes this process can reserve (the card
less its CUDA context and other processes); a segment is created when it fits. Stdlib only.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Any

from jupyter_gpumem.backends.alloc_conf import UNLIMITED, AllocConf

__all__ = [
    "K_LARGE_BUFFER",
    "K_MIN_BLOCK_SIZE",
    "K_SMALL_BUFFER",
    "K_SMALL_SIZE",
    "AllocatorOOM",
    "Block",
    "CachingAllocator",
    "allocation_size",
    "round_size",
]

MiB = 1 << 20
K_MIN_BLOCK_SIZE = 512  # all sizes are rounded to at least 512 bytes
K_SMALL_SIZE = 1 * MiB  # largest "small" allocation
K_SMALL_BUFFER = 2 * MiB  # small allocations are packed in 2 MiB segments
K_LARGE_BUFFER = 20 * MiB  # allocations between 1 and 10 MiB may use a 20 MiB segment
K_MIN_LARGE_ALLOC = 10 * MiB
K_ROUND_LARGE = 2 * MiB  # larger ones are rounded up to 2 MiB

_ALL, _SMALL, _LARGE = 0, 1, 2  # StatType: AGGREGATE, SMALL_POOL, LARGE_POOL
_STAT_TYPES = ("all", "small_pool", "large_pool")
_ARRAY_STATS = (
    "allocation",
    "segment",
    "active",
    "inactive_split",
    "allocated_bytes",
    "reserved_bytes",
    "active_bytes",
    "inactive_split_bytes",
    "requested_bytes",
)
_COUNTERS = (
    "num_alloc_retries",
    "num_ooms",
    "num_sync_all_streams",
    "num_device_alloc",
    "num_device_free",
    "num_oom_rejections",
)


class AllocatorOOM(Exception):
    """``malloc`` found no block and the driver no room: what torch's OOM message reports."""

    def __init__(self, requested: int, alloc_size: int) -> None:
        super().__init__(f"out of memory: {alloc_size} bytes")
        self.requested = requested
        self.alloc_size = alloc_size  # "Tried to allocate": the segment the request needed


def _roundup_power2_next_division(size: int, divisions: int) -> int:
    if size & (size - 1) == 0:
        return size
    power2_floor = 1 << (size.bit_length() - 1)
    step = power2_floor >> (divisions.bit_length() - 1)
    if step == 0:
        return power2_floor << 1
    floor = size & ~(step - 1)
    return size if floor == size else floor + step


def round_size(size: int, conf: AllocConf) -> int:
    """``round_size``: what a request of ``size`` bytes takes from a block."""
    if size < K_MIN_BLOCK_SIZE:
        return K_MIN_BLOCK_SIZE
    divisions = conf.divisions_for(size)
    if divisions > 1 and size > K_MIN_BLOCK_SIZE * divisions:
        return _roundup_power2_next_division(size, divisions)
    return -(-size // K_MIN_BLOCK_SIZE) * K_MIN_BLOCK_SIZE


def allocation_size(size: int, conf: AllocConf) -> int:
    """``get_allocation_size``: the segment a rounded request of ``size`` bytes opens."""
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return conf.large_segment_size
    return -(-size // K_ROUND_LARGE) * K_ROUND_LARGE


class _Segment:
    """``ExpandableSegment``: address space for the whole card, pages mapped as needed."""

    __slots__ = ("handles", "page", "pages", "ptr")

    def __init__(self, ptr: int, page: int, pages: int) -> None:
        self.ptr, self.page, self.pages = ptr, page, pages
        self.handles: list[bool] = []  # mapped pages, trimmed at the end as torch's handles_

    @property
    def size(self) -> int:
        return self.page * self.pages

    def left(self, p: int) -> int:
        return (p - self.ptr) // self.page

    def right(self, p: int) -> int:
        return -(-(p - self.ptr) // self.page)


class Block:
    """One block of a segment: allocated, cached (in its pool's ``blocks``), or unmapped."""

    __slots__ = (
        "allocated",
        "expandable",
        "gc_count_base",
        "key",
        "mapped",
        "next",
        "pool",
        "prev",
        "ptr",
        "requested_size",
        "size",
    )

    def __init__(self, size: int, pool: _Pool, ptr: int) -> None:
        self.size, self.pool, self.ptr = size, pool, ptr
        self.requested_size = 0
        self.allocated = False
        self.mapped = True
        self.prev: Block | None = None
        self.next: Block | None = None
        self.expandable: _Segment | None = None
        self.gc_count_base = 0
        self.key: tuple[int, int] | None = None  # its place in pool.blocks while cached

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None

    def __repr__(self) -> str:
        state = "allocated" if self.allocated else "free" if self.mapped else "unmapped"
        return f"<Block {self.size} at {self.ptr:#x}, {state}>"


class _Pool:
    """``BlockPool``: cached blocks by (size, address) for best fit; unmapped ones by address."""

    __slots__ = ("blocks", "by_key", "get_free_blocks_call_count", "is_small", "unmapped")

    def __init__(self, is_small: bool) -> None:
        self.is_small = is_small
        self.blocks: list[tuple[int, int]] = []  # sorted (size, ptr)
        self.by_key: dict[tuple[int, int], Block] = {}
        self.unmapped: dict[int, Block] = {}  # ptr -> block (few: one tail per segment, gaps)
        self.get_free_blocks_call_count = 0

    def insert(self, block: Block) -> None:  # insert_into_blocks
        block.gc_count_base = self.get_free_blocks_call_count
        key = block.key = (block.size, block.ptr)
        bisect.insort(self.blocks, key)
        self.by_key[key] = block

    def erase(self, block: Block) -> None:
        key = block.key
        if key is None:
            return
        del self.by_key[key]
        del self.blocks[bisect.bisect_left(self.blocks, key)]
        block.key = None


class CachingAllocator:
    """One card's ``DeviceCachingAllocator`` on one stream.

    ``capacity``: bytes the driver lets this process reserve (the card less what is not ours);
    ``allowed``: the per-process cap (``set_per_process_memory_fraction``), or None.
    """

    def __init__(
        self,
        conf: AllocConf | None = None,
        *,
        capacity: int,
        total_memory: int | None = None,
        allowed: int | None = None,
    ) -> None:
        self.conf = conf or AllocConf()
        self.capacity = capacity
        self.total_memory = capacity if total_memory is None else total_memory
        self.allowed = allowed
        self.small = _Pool(True)
        self.large = _Pool(False)
        self.reserved = 0  # total_allocated_memory
        self.active: set[Block] = set()
        self._segments: list[_Segment] = []
        self._next_address = itertools.count(1)
        stats: dict[str, Any] = {
            name: tuple([0, 0, 0, 0] for _ in _STAT_TYPES) for name in _ARRAY_STATS
        }
        stats.update({name: 0 for name in _COUNTERS})
        stats["oversize_allocations"] = [0, 0, 0, 0]
        stats["oversize_segments"] = [0, 0, 0, 0]
        self.stats = stats

    # ---- the settings ------------------------------------------------------------------------

    @property
    def _max_split(self) -> int:
        return self.conf.max_split_size

    def _gc_on(self) -> bool:
        return self.allowed is not None and self.conf.garbage_collection_threshold > 0.0

    # ---- stats -------------------------------------------------------------------------------

    def _inc(self, name: str, pool: _Pool, amount: int) -> None:
        arrays = self.stats[name]
        for stat in (arrays[_ALL], arrays[_SMALL if pool.is_small else _LARGE]):
            stat[0] += amount
            if stat[0] > stat[1]:
                stat[1] = stat[0]
            stat[2] += amount

    def _dec(self, name: str, pool: _Pool, amount: int) -> None:
        arrays = self.stats[name]
        for stat in (arrays[_ALL], arrays[_SMALL if pool.is_small else _LARGE]):
            stat[0] -= amount
            stat[3] += amount

    def _count_use(self, pool: _Pool, sign: int, nbytes: int, requested: int) -> None:
        """allocation, allocated_bytes, active, active_bytes, requested_bytes: up (sign 1) for a
        block handed out, down (-1) for one freed; the hot path, in one call."""
        stats, own = self.stats, _SMALL if pool.is_small else _LARGE
        for name, amount in (
            ("allocation", 1),
            ("allocated_bytes", nbytes),
            ("active", 1),
            ("active_bytes", nbytes),
            ("requested_bytes", requested),
        ):
            arrays = stats[name]
            for stat in (arrays[_ALL], arrays[own]):
                if sign > 0:
                    value = stat[0] + amount
                    stat[0] = value
                    if value > stat[1]:
                        stat[1] = value
                    stat[2] += amount
                else:
                    stat[0] -= amount
                    stat[3] += amount

    @staticmethod
    def _inc1(stat: list[int]) -> None:
        stat[0] += 1
        stat[1] = max(stat[1], stat[0])
        stat[2] += 1

    @staticmethod
    def _dec1(stat: list[int]) -> None:
        stat[0] -= 1
        stat[3] += 1

    def stat(self, name: str, kind: str = "all", metric: str = "current") -> int:
        """One number of :meth:`memory_stats`, e.g. ``stat("reserved_bytes", "all", "peak")``."""
        value = self.stats[name]
        if isinstance(value, int):
            return value
        if isinstance(value, tuple):
            value = value[_STAT_TYPES.index(kind)]
        return int(value[("current", "peak", "allocated", "freed").index(metric)])

    @property
    def allocated_bytes(self) -> int:
        return int(self.stats["allocated_bytes"][_ALL][0])

    def memory_stats(self) -> dict[str, int]:
        """``torch.cuda.memory_stats()``: flat keys, sorted, as torch returns them."""
        out: dict[str, int] = {}
        metrics = ("current", "peak", "allocated", "freed")
        for name in _ARRAY_STATS:
            for kind, stat in zip(_STAT_TYPES, self.stats[name], strict=True):
                for metric, value in zip(metrics, stat, strict=True):
                    out[f"{name}.{kind}.{metric}"] = value
        for name in ("oversize_allocations", "oversize_segments"):
            for metric, value in zip(metrics, self.stats[name], strict=True):
                out[f"{name}.{metric}"] = value
        for name in _COUNTERS:
            out[name] = self.stats[name]
        # DeviceStats.max_split_size is an int64: SIZE_MAX reads as -1
        out["max_split_size"] = -1 if self._max_split >= UNLIMITED else self._max_split
        return dict(sorted(out.items()))

    def reset_peak_stats(self) -> None:
        for name in _ARRAY_STATS:
            for stat in self.stats[name]:
                stat[1] = stat[0]
        for name in ("oversize_allocations", "oversize_segments"):
            self.stats[name][1] = self.stats[name][0]

    def reset_accumulated_stats(self) -> None:
        for name in _ARRAY_STATS:
            for stat in self.stats[name]:
                stat[2] = stat[3] = 0
        for name in ("oversize_allocations", "oversize_segments"):
            self.stats[name][2] = self.stats[name][3] = 0
        for name in _COUNTERS:
            self.stats[name] = 0

    # ---- malloc and free ---------------------------------------------------------------------

    def malloc(self, orig_size: int, *, force: bool = False) -> Block:
        """A block for ``orig_size`` bytes; :class:`AllocatorOOM` when none can be had.
        ``force``: the driver never refuses (a storage already grown in place)."""
        conf = self.conf
        size = round_size(orig_size, conf)
        pool = self.small if size <= K_SMALL_SIZE else self.large
        alloc_size = allocation_size(size, conf)
        block = self._get_free_block(pool, size)
        if block is None:
            if self._gc_on():
                self._garbage_collect_cached_blocks()
            block = self._alloc_block(pool, size, alloc_size, False, force)
            if block is None and self._release_available_cached_blocks(pool, size):
                block = self._alloc_block(pool, size, alloc_size, False, force)
            if block is None:
                self._release_cached_blocks()  # every wholly free cached segment, then retry
                block = self._alloc_block(pool, size, alloc_size, True, force)
        if block is None:
            self.stats["num_ooms"] += 1
            raise AllocatorOOM(orig_size, alloc_size)
        return self._alloc_found_block(block, size, orig_size, self._should_split(block, size))

    def would_fit(self, orig_size: int) -> bool:
        """Whether :meth:`malloc` would succeed now, without changing anything (an estimate that
        errs towards trying: with expandable segments, pages are counted, not placed)."""
        conf = self.conf
        size = round_size(orig_size, conf)
        pool = self.small if size <= K_SMALL_SIZE else self.large
        if self._peek_free_block(pool, size) is not None:
            return True
        alloc_size = allocation_size(size, conf)
        releasable = sum(
            b.size
            for p in (self.small, self.large)
            for b in p.by_key.values()
            if not b.is_split() or b.expandable is not None
        )
        if self.allowed is not None and self.reserved - releasable + alloc_size > self.allowed:
            return False
        return self.reserved - releasable + alloc_size <= self.capacity

    def free(self, block: Block) -> None:
        """``free``: the block goes back to its pool, merged with free neighbours."""
        block.allocated = False
        if block.size >= self._max_split:
            self._dec1(self.stats["oversize_allocations"])
        self._free_block(block)

    def empty_cache(self) -> None:
        """``emptyCache``: every cached segment that is wholly free goes back to the driver."""
        self._release_cached_blocks()

    # ---- the search ----------------------------------------------------------------------------

    def _peek_free_block(self, pool: _Pool, size: int) -> Block | None:
        blocks = pool.blocks
        i = bisect.bisect_left(blocks, (size, -1))
        if i == len(blocks):
            return None
        block = pool.by_key[blocks[i]]
        if block.expandable is not None:
            if self.conf.expandable_segments:
                # best fit by the size it can grow to, not the size it has
                while block.expandable is not None and i + 1 < len(blocks):
                    nxt = pool.by_key[blocks[i + 1]]
                    if _expandable_size(nxt) >= _expandable_size(block):
                        break
                    i += 1
                    block = nxt
            else:  # expandable segments turned off since: only plain blocks
                i += 1
                while i < len(blocks) and pool.by_key[blocks[i]].expandable is not None:
                    i += 1
                if i == len(blocks):
                    return None
                block = pool.by_key[blocks[i]]
        max_split = self._max_split
        if size < max_split and block.size >= max_split:
            return None  # do not return an oversized block for a smaller request
        if size >= max_split and block.size >= size + self.conf.max_non_split_rounding_size:
            return None  # an oversized block is rounded up only so far
        return block

    def _get_free_block(self, pool: _Pool, size: int) -> Block | None:
        if self._gc_on():
            pool.get_free_blocks_call_count += 1  # block ages, for the garbage collection
        block = self._peek_free_block(pool, size)
        if block is not None:
            pool.erase(block)
        return block

    def _should_split(self, block: Block, size: int) -> bool:
        remaining = block.size - size
        if block.pool.is_small or self.conf.expandable_segments:
            return remaining >= K_MIN_BLOCK_SIZE
        return size < self._max_split and remaining > K_SMALL_SIZE

    def _alloc_found_block(
        self, block: Block, size: int, orig_size: int, split_remainder: bool
    ) -> Block:
        pool = block.pool
        already_split = block.is_split()
        if split_remainder:
            remaining = block
            block = Block(size, pool, remaining.ptr)
            block.expandable = remaining.expandable
            block.prev = remaining.prev
            if block.prev is not None:
                block.prev.next = block
            block.next = remaining
            remaining.prev = block
            remaining.ptr += size
            remaining.size -= size
            pool.insert(remaining)
            if block.expandable is None:
                if already_split:  # an already-split inactive block shrinks by size bytes
                    self._dec("inactive_split_bytes", pool, size)
                else:  # a new inactive split block, of remaining.size bytes
                    self._inc("inactive_split_bytes", pool, remaining.size)
                    self._inc("inactive_split", pool, 1)
        elif already_split and block.expandable is None:  # an inactive split block reused
            self._dec("inactive_split_bytes", pool, block.size)
            self._dec("inactive_split", pool, 1)
        block.allocated = True
        block.requested_size = orig_size
        self.active.add(block)
        self._count_use(pool, 1, block.size, orig_size)
        if block.size >= self._max_split:
            self._inc1(self.stats["oversize_allocations"])
        return block

    def _free_block(self, block: Block) -> None:
        pool = block.pool
        original_size, requested = block.size, block.requested_size
        split_blocks = split_bytes = 0
        for candidate in (block.prev, block.next):
            subsumed = self._try_merge_blocks(block, candidate, pool)
            if subsumed:
                split_blocks -= 1
                split_bytes -= subsumed
        self.active.discard(block)
        pool.insert(block)
        if block.is_split():
            split_blocks += 1
            split_bytes += block.size
        if block.expandable is None:  # torch leaves expandable segments out of inactive_split
            if split_blocks > 0:
                self._inc("inactive_split", pool, split_blocks)
            elif split_blocks < 0:
                self._dec("inactive_split", pool, -split_blocks)
            if split_bytes > 0:
                self._inc("inactive_split_bytes", pool, split_bytes)
            elif split_bytes < 0:
                self._dec("inactive_split_bytes", pool, -split_bytes)
        self._count_use(pool, -1, original_size, requested)

    def _try_merge_blocks(self, dst: Block, src: Block | None, pool: _Pool) -> int:
        """Merge the free block ``src`` into its neighbour ``dst``; the bytes taken in, or 0."""
        if src is None or src.allocated or dst.mapped != src.mapped:
            return 0
        if dst.prev is src:  # [src dst]
            dst.ptr = src.ptr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:  # [dst src]
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size
        if src.mapped:
            pool.erase(src)
        else:
            pool.unmapped.pop(src.ptr, None)
        return src.size

    # ---- segments ------------------------------------------------------------------------------

    def _driver_free(self) -> int:
        return self.capacity - self.reserved

    def _alloc_block(
        self, pool: _Pool, size: int, alloc_size: int, is_retry: bool, force: bool
    ) -> Block | None:
        stats = self.stats
        if is_retry:
            stats["num_alloc_retries"] += 1
        if not force and self.allowed is not None and self.reserved + alloc_size > self.allowed:
            return None
        if self.conf.expandable_segments:
            return self._try_allocate_expandable_block(pool, size, force)
        if not force and alloc_size > self._driver_free():  # cudaMalloc: out of memory
            return None
        self.reserved += alloc_size
        block = Block(alloc_size, pool, self._address())
        self._inc("segment", pool, 1)
        self._inc("reserved_bytes", pool, alloc_size)
        if alloc_size >= self._max_split:
            self._inc1(stats["oversize_segments"])
        stats["num_device_alloc"] += 1
        return block

    def _address(self) -> int:
        # addresses only order blocks and name them in snapshots: 1 TiB of address space each
        return 0x7F00_0000_0000 + (next(self._next_address) << 40)

    def _release_block(self, block: Block) -> None:
        if block.expandable is not None:  # never a cudaFree: its free pages are unmapped
            self._unmap_block(block)
            return
        pool = block.pool
        self.stats["num_device_free"] += 1
        self.reserved -= block.size
        self._dec("segment", pool, 1)
        self._dec("reserved_bytes", pool, block.size)
        if block.size >= self._max_split:
            self._dec1(self.stats["oversize_segments"])
        pool.erase(block)

    def _release_available_cached_blocks(self, pool: _Pool, size: int) -> bool:
        """Free cached oversize blocks, only as many as the request needs."""
        max_split = self._max_split
        if max_split >= UNLIMITED:
            return False
        key_size = max(size, max_split)
        blocks = pool.blocks
        i = bisect.bisect_left(blocks, (key_size, -1))
        if i < len(blocks):
            block = pool.by_key[blocks[i]]
            if block.is_split() and block.expandable is None:
                return False  # cannot happen in torch: a block that large is never split
            self._release_block(block)
            return True
        if i == 0:
            return False
        released = 0
        i -= 1  # the largest block
        while released < key_size and i >= 0:
            block = pool.by_key[blocks[i]]
            if block.size < max_split:
                break
            released += block.size
            if not block.is_split():
                self._release_block(block)
            i -= 1
        return released >= key_size

    def _release_cached_blocks(self) -> bool:
        self.stats["num_sync_all_streams"] += 1  # synchronize_and_free_events
        self._release_blocks(self.large)
        self._release_blocks(self.small)
        return True

    def _release_blocks(self, pool: _Pool) -> None:
        to_unmap = []
        for key in list(pool.blocks):
            block = pool.by_key[key]
            if block.expandable is not None:
                to_unmap.append(block)
            elif not block.is_split():
                self._release_block(block)
        for block in to_unmap:
            self._unmap_block(block)
            if not block.is_split() and not block.mapped:
                self._release_expandable_segment(block)

    def _garbage_collect_cached_blocks(self) -> None:
        """Free cached whole segments older than the average, until reserved memory is back
        under ``garbage_collection_threshold`` of the allowed memory."""
        assert self.allowed is not None
        threshold = int(self.conf.garbage_collection_threshold * self.allowed)
        if self.reserved <= threshold:
            return
        target = self.reserved - threshold
        pool = self.large

        def age(block: Block) -> int:
            return pool.get_free_blocks_call_count - block.gc_count_base

        freeable = [b for b in pool.by_key.values() if not b.is_split() and b.expandable is None]
        if not freeable:
            return
        total_age = sum(age(b) for b in freeable)
        count = len(freeable)
        reclaimed, freed = 0, True
        while reclaimed < target and freed and count > 0:
            threshold_age = total_age / count
            freed = False
            for key in list(pool.blocks):
                block = pool.by_key.get(key)
                if block is None or block.is_split() or block.expandable is not None:
                    continue
                if age(block) >= threshold_age:
                    freed = True
                    reclaimed += block.size
                    total_age -= age(block)
                    count -= 1
                    self._release_block(block)

    # ---- expandable segments -------------------------------------------------------------------

    def _find_expandable_block(self, pool: _Pool, size: int) -> Block:
        def allocatable(b: Block | None) -> bool:
            return b is not None and not b.allocated

        def has_room(b: Block | None) -> bool:
            room = 0
            while room < size and b is not None and allocatable(b):
                room += b.size
                b = b.next
            return room >= size

        for ptr in sorted(pool.unmapped):
            candidate = pool.unmapped[ptr]
            if candidate.prev is not None and allocatable(candidate.prev):
                candidate = candidate.prev
            if has_room(candidate):
                return candidate
        page = K_SMALL_BUFFER if pool.is_small else self.conf.large_segment_size
        address_space = self.total_memory + self.total_memory // 8
        segment = _Segment(self._address(), page, -(-address_space // page))
        self._segments.append(segment)
        candidate = Block(segment.size, pool, segment.ptr)
        candidate.mapped = False
        candidate.expandable = segment
        pool.unmapped[candidate.ptr] = candidate
        return candidate

    def _map_block(self, to_map: Block, size: int, force: bool) -> bool:
        segment = to_map.expandable
        assert segment is not None and not to_map.mapped
        begin, end = segment.left(to_map.ptr), segment.right(to_map.ptr + size)
        mapped = (end - begin) * segment.page
        if not force and mapped > self._driver_free():  # cuMemCreate: out of memory
            return False
        segment.handles.extend([False] * (end - len(segment.handles)))
        for i in range(begin, end):
            segment.handles[i] = True
        pool = to_map.pool
        pool.unmapped.pop(to_map.ptr, None)
        to_map.mapped = True
        if mapped < to_map.size:
            remaining = Block(to_map.size - mapped, pool, to_map.ptr + mapped)
            remaining.mapped = False
            remaining.expandable = segment
            remaining.prev, remaining.next = to_map, to_map.next
            if to_map.next is not None:
                to_map.next.prev = remaining
            to_map.next = remaining
            pool.unmapped[remaining.ptr] = remaining
            to_map.size = mapped
        self._try_merge_blocks(to_map, to_map.prev, pool)
        self._try_merge_blocks(to_map, to_map.next, pool)
        pool.insert(to_map)
        self.reserved += mapped
        self._inc("reserved_bytes", pool, mapped)
        self.stats["num_device_alloc"] += 1
        return True

    def _try_allocate_expandable_block(self, pool: _Pool, size: int, force: bool) -> Block | None:
        candidate = self._find_expandable_block(pool, size)
        if not candidate.mapped and not self._map_block(
            candidate, min(candidate.size, size), force
        ):
            return None
        while candidate.size < size:
            following = candidate.next
            assert following is not None
            if not self._map_block(following, min(size - candidate.size, following.size), force):
                return None
            candidate = following
        pool.erase(candidate)
        return candidate

    def _unmap_block(self, block: Block) -> None:
        segment = block.expandable
        assert segment is not None
        begin, end = segment.right(block.ptr), segment.left(block.ptr + block.size)
        if begin >= end:
            return
        pool = block.pool
        pool.erase(block)
        start = segment.ptr + begin * segment.page
        unmapped = (end - begin) * segment.page
        before = start - block.ptr
        if before > 0:  # prev? -> before_free -> block
            before_free = Block(before, pool, block.ptr)
            before_free.expandable = segment
            before_free.prev, before_free.next = block.prev, block
            if block.prev is not None:
                block.prev.next = before_free
            block.prev = before_free
            pool.insert(before_free)
        after = block.size - before - unmapped
        if after > 0:  # block -> after_free -> next?
            after_free = Block(after, pool, start + unmapped)
            after_free.expandable = segment
            after_free.prev, after_free.next = block, block.next
            if block.next is not None:
                block.next.prev = after_free
            block.next = after_free
            pool.insert(after_free)
        block.ptr, block.size, block.mapped = start, unmapped, False
        for i in range(begin, end):
            segment.handles[i] = False
        while segment.handles and not segment.handles[-1]:
            segment.handles.pop()
        self._try_merge_blocks(block, block.prev, pool)
        self._try_merge_blocks(block, block.next, pool)
        pool.unmapped[block.ptr] = block
        self.reserved -= unmapped
        self._dec("reserved_bytes", pool, unmapped)
        self.stats["num_device_free"] += 1

    def _release_expandable_segment(self, block: Block) -> None:
        segment = block.expandable
        assert segment is not None and block.size == segment.size
        self._segments.remove(segment)
        block.pool.unmapped.pop(block.ptr, None)

    # ---- the snapshot --------------------------------------------------------------------------

    def snapshot(self, device: int = 0) -> list[dict[str, Any]]:
        """``torch.cuda.memory_snapshot()``: segments (one per contiguous mapped range of an
        expandable segment) and their blocks, by address."""
        blocks = [pool.by_key[k] for pool in (self.small, self.large) for k in pool.blocks]
        blocks.extend(self.active)
        segments = []
        for head in blocks:
            if head.prev is not None and head.prev.mapped:
                continue
            infos = []
            total = allocated = active = requested = 0
            block: Block | None = head
            while block is not None and block.mapped:
                state = "active_allocated" if block.allocated else "inactive"
                infos.append(
                    {
                        "address": block.ptr,
                        "size": block.size,
                        "requested_size": block.requested_size,
                        "state": state,
                        "frames": [],
                    }
                )
                total += block.size
                if block.allocated:
                    allocated += block.size
                    active += block.size
                    requested += block.requested_size
                block = block.next
            segments.append(
                {
                    "device": device,
                    "address": head.ptr,
                    "total_size": total,
                    "allocated_size": allocated,
                    "active_size": active,
                    "requested_size": requested,
                    "stream": 0,
                    "segment_type": "small" if head.pool.is_small else "large",
                    "segment_pool_id": (0, 0),
                    "is_expandable": head.expandable is not None,
                    "frames": [],
                    "blocks": infos,
                }
            )
        segments.sort(key=lambda s: s["address"])
        return segments


def _expandable_size(block: Block) -> int:
    following = block.next
    return block.size + (following.size if following is not None and not following.mapped else 0)

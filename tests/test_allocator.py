"""The simulated card's caching allocator against what PyTorch's own tests and sources expect.

Each test names what it mirrors: a test of ``test/test_cuda.py`` (torch 2.13), or the comment or
note of ``c10/cuda/CUDACachingAllocator.cpp`` whose behaviour it checks. The expected numbers are
worked out here from torch's documented arithmetic, never read back from the port.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

from jupyter_gpumem.backends.alloc_conf import parse_alloc_conf
from jupyter_gpumem.backends.simulated.caching_allocator import (
    AllocatorOOM,
    Block,
    CachingAllocator,
)

MiB, GiB = 1 << 20, 1 << 30


def allocator(settings: str = "", capacity: int = 8 * GiB, **kwargs: Any) -> CachingAllocator:
    return CachingAllocator(parse_alloc_conf(settings), capacity=capacity, **kwargs)


def power2_div(size: int, div_factor: int) -> int:
    """test_cuda.py::test_allocator_settings' own helper."""
    pow2 = 1
    while pow2 < size:
        pow2 = pow2 * 2
    if pow2 == size:
        return pow2
    step = pow2 / 2 / div_factor
    ret = pow2 / 2
    while ret < size:
        ret = ret + step
    return int(ret)


# ---- test_cuda.py::TestCuda::test_allocator_settings ---------------------------------------------


def test_allocator_settings_roundup_power2_divisions() -> None:
    nbytes = 4 * 21 * MiB  # torch.rand(21 * 1024 * 1024) floats
    nbytes_big = 4 * 100 * MiB

    def grown(settings: str, size: int) -> tuple[int, int]:
        a = allocator(settings)
        before = a.stat("active_bytes", "all", "allocated")
        requested = a.stat("requested_bytes", "all", "allocated")
        a.malloc(size)
        return (
            a.stat("active_bytes", "all", "allocated") - before,
            a.stat("requested_bytes", "all", "allocated") - requested,
        )

    assert grown("", nbytes) == (nbytes, nbytes)
    assert grown("roundup_power2_divisions:4", nbytes) == (power2_div(nbytes, 4), nbytes)
    assert grown("garbage_collection_threshold:0.5,max_split_size_mb:40", nbytes)[0] == nbytes
    knob = "garbage_collection_threshold:0.5,roundup_power2_divisions:[64:8,128:2,256:2,512:2,1024:1,>:1]"
    assert grown(knob, nbytes)[0] == power2_div(nbytes, 8)
    assert grown(knob, nbytes_big)[0] == power2_div(nbytes_big, 2)
    assert grown("release_lock_on_cudamalloc:True", nbytes)[0] == nbytes


def test_allocator_settings_through_the_simulated_torch() -> None:
    torch = pytest.importorskip("torch")
    from jupyter_gpumem.backends import simulated

    nelems = 21 * 1024 * 1024
    try:
        simulated.start(1 * GiB, alloc_conf="roundup_power2_divisions:4")
        start = torch.cuda.memory_stats()["active_bytes.all.allocated"]
        y = torch.rand(nelems, device="cuda")
        grew = torch.cuda.memory_stats()["active_bytes.all.allocated"] - start
        assert grew == power2_div(4 * nelems, 4) and torch.cuda.memory_allocated() == grew
        del y
    finally:
        simulated.stop()


# ---- the fragmentation the allocator's comments describe ----------------------------------------


def test_two_free_5mib_blocks_apart_cannot_hold_6mib() -> None:
    """CUDACachingAllocator.cpp: "requests between 1MB and 10MB will allocate and split a 20MB
    block"; a freed block merges only with free neighbours (free_block / try_merge_blocks)."""
    a = allocator()
    blocks = [a.malloc(5 * MiB) for _ in range(4)]
    assert a.reserved == 20 * MiB and a.stat("segment") == 1
    a.free(blocks[0])
    a.free(blocks[2])
    assert a.allocated_bytes == 10 * MiB and a.reserved == 20 * MiB
    assert a.stat("inactive_split") == 2 and a.stat("inactive_split_bytes") == 10 * MiB
    six = a.malloc(6 * MiB)
    assert a.reserved == 40 * MiB and a.stat("segment") == 2  # a second 20 MiB segment
    a.free(blocks[1])  # now blocks 0-2 merge: 15 MiB free in the first segment
    five = a.malloc(6 * MiB)
    assert a.reserved == 40 * MiB  # best fit: the second segment's 14 MiB rest, not the 15
    assert five.ptr == six.ptr + 6 * MiB


def test_best_fit_takes_the_smallest_cached_block_that_holds_it() -> None:
    a = allocator()
    big, small = a.malloc(40 * MiB), a.malloc(24 * MiB)
    small_at = small.ptr
    a.free(big)
    a.free(small)
    again = a.malloc(22 * MiB)
    assert again.ptr == small_at and a.reserved == 64 * MiB
    assert again.size == 22 * MiB  # split: the 2 MiB left is over kSmallSize, worth keeping
    assert a.stat("inactive_split_bytes") == 2 * MiB
    a.free(again)
    exact = a.malloc(23 * MiB)  # the rest would be 1 MiB: not over kSmallSize, not split
    assert exact.ptr == small_at and exact.size == 24 * MiB


def test_small_pool_packs_512_byte_blocks_into_2mib() -> None:
    a = allocator()
    blocks = [a.malloc(1000) for _ in range(10)]
    assert a.allocated_bytes == 10 * 1024 and a.reserved == 2 * MiB
    assert a.stat("segment", "small_pool") == 1 and a.stat("segment", "large_pool") == 0
    one_mib = a.malloc(MiB)  # kSmallSize is "<= 1 MiB": still the small pool
    assert a.stat("segment", "small_pool") == 1 and a.reserved == 2 * MiB
    a.malloc(MiB + 1)
    assert a.stat("segment", "large_pool") == 1 and a.reserved == 22 * MiB
    del blocks, one_mib


# ---- empty_cache: only wholly free segments ------------------------------------------------------


def test_empty_cache_releases_only_fully_free_segments() -> None:
    """torch/cuda/memory.py's Segment: "empty_cache() frees Segments that are entirely inactive"
    (release_blocks frees blocks with neither prev nor next)."""
    a = allocator()
    first, second = a.malloc(5 * MiB), a.malloc(5 * MiB)
    lone = a.malloc(30 * MiB)
    a.free(first)
    a.free(lone)
    a.empty_cache()
    assert a.reserved == 20 * MiB  # the 20 MiB segment still holds `second`; the 30 MiB went
    assert a.stat("num_device_free") == 1
    a.free(second)
    a.empty_cache()
    assert a.reserved == 0 and a.allocated_bytes == 0


# ---- max_split_size_mb ---------------------------------------------------------------------------


def test_oversize_blocks_are_not_split_nor_given_to_much_smaller_requests() -> None:
    """get_free_block: "Do not return an oversized block for a large request" and "Allow
    oversized block size to be rounded up but within a limit" (max_non_split_rounding_mb, which
    is large_segment_size, 20 MiB, unless set)."""
    a = allocator("max_split_size_mb:40")
    block = a.malloc(60 * MiB)
    at = block.ptr
    assert a.stat("oversize_allocations") == 1 and a.stat("oversize_segments") == 1
    a.free(block)
    small = a.malloc(10 * MiB)  # under max_split: the 60 MiB cached block is not for it
    assert small.ptr != at and a.reserved == 70 * MiB
    near = a.malloc(45 * MiB)  # 60 < 45 + 20: the oversize block serves it, whole
    assert near.ptr == at and near.size == 60 * MiB
    a.free(near)
    far = a.malloc(40 * MiB)  # 60 >= 40 + 20: too much rounding, a segment of its own
    assert far.ptr != at and a.reserved == 110 * MiB


def test_without_max_split_a_large_cached_block_is_split() -> None:
    a = allocator()
    block = a.malloc(60 * MiB)
    at = block.ptr
    a.free(block)
    small = a.malloc(10 * MiB)
    assert small.ptr == at and a.reserved == 60 * MiB
    assert a.stat("inactive_split_bytes") == 50 * MiB


def test_max_split_expandable() -> None:
    """test_cuda.py::TestCuda::test_max_split_expandable, on an allocator allowed 120 MiB."""
    a = allocator("expandable_segments:False,max_split_size_mb:40", allowed=120 * MiB)
    first = a.malloc(40 * MiB)
    a.conf = parse_alloc_conf("expandable_segments:True,max_split_size_mb:40")
    second = a.malloc(40 * MiB)
    a.conf = parse_alloc_conf("expandable_segments:False,max_split_size_mb:40")
    third = a.malloc(40 * MiB)
    with pytest.raises(AllocatorOOM):
        a.malloc(40 * MiB)
    for block in (first, second, third):
        a.free(block)
    # release_cached_blocks runs with an expandable segment in the free list, and 120 fits
    whole = a.malloc(120 * MiB)
    assert whole.size == 120 * MiB and a.reserved <= 120 * MiB


def test_release_available_cached_blocks_frees_oversize_blocks_first() -> None:
    """malloc: "Free enough available cached blocks to satisfy alloc and retry alloc" before
    freeing every cached block: with max_split_size_mb set, the oversize ones go."""
    a = allocator("max_split_size_mb:40", capacity=200 * MiB)
    oversize = [a.malloc(50 * MiB) for _ in range(3)]
    keep_small = a.malloc(5 * MiB)  # a 20 MiB segment, split, never freed by the retry
    for block in oversize:
        a.free(block)
    assert a.reserved == 170 * MiB
    a.malloc(80 * MiB)
    assert a.stat("num_alloc_retries") == 0  # freed only what it needed, no full retry
    assert a.reserved == 20 * MiB + 50 * MiB + 80 * MiB
    del keep_small


# ---- the OOM path ------------------------------------------------------------------------------


def test_out_of_memory_retry() -> None:
    """test_cuda.py::TestCuda::test_out_of_memory_retry on a T4 (its CUDA context outside
    PyTorch): half the card twice does not fit; freed, the cached block serves the next one."""
    from jupyter_gpumem.backends.simulated.profiles import PROFILES

    t4 = PROFILES["T4"]
    a = CachingAllocator(capacity=t4.total_bytes - t4.context_bytes, total_memory=t4.total_bytes)
    size = int(t4.total_bytes * 0.5)
    first = a.malloc(size)
    with pytest.raises(AllocatorOOM):
        a.malloc(size)
    assert a.stat("num_ooms") == 1 and a.stat("num_alloc_retries") == 1
    a.free(first)
    again = a.malloc(size)
    assert again.ptr == first.ptr and a.stat("segment") == 1
    a.free(again)
    a.empty_cache()
    assert a.reserved == 0


def test_set_per_process_memory_fraction() -> None:
    """test_cuda.py::TestCuda::test_set_per_process_memory_fraction, on a 256 MiB card."""
    torch = pytest.importorskip("torch")
    from jupyter_gpumem.backends import simulated

    try:
        simulated.start(256 * MiB)
        tensor = torch.zeros(1024, device="cuda")
        torch.cuda.empty_cache()
        total_memory = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(0.5, 0)
        application = int(total_memory * 0.499) - torch.cuda.max_memory_reserved()
        tmp_tensor = torch.empty(application, dtype=torch.int8, device="cuda")
        del tmp_tensor
        torch.cuda.empty_cache()
        application = int(total_memory * 0.5)
        with pytest.raises(RuntimeError, match="out of memory"):
            torch.empty(application, dtype=torch.int8, device="cuda")
        tensor.fill_(1)
        assert (tensor == 1).all()
    finally:
        simulated.stop()


def test_the_oom_message_counts_after_the_cache_was_emptied() -> None:
    """malloc: "at this point free_cached_blocks has already returned all possible cached
    memory to the driver": the message's reserved memory is what could not be given back."""
    torch = pytest.importorskip("torch")
    from jupyter_gpumem.backends import simulated

    try:
        gpu = simulated.start(100 * MiB)
        keep = torch.empty(30 * MiB, dtype=torch.uint8, device="cuda")
        t = torch.empty(60 * MiB, dtype=torch.uint8, device="cuda")
        del t  # cached: 60 MiB reserved
        assert gpu.reserved_bytes == 90 * MiB
        with pytest.raises(torch.OutOfMemoryError) as raised:
            torch.empty(80 * MiB, dtype=torch.uint8, device="cuda")
        message = str(raised.value)
        assert "Tried to allocate 80.00 MiB" in message
        assert "this process has 30.00 MiB memory in use" in message  # the 60 went back
        assert "0 bytes is reserved by PyTorch but unallocated" in message
        assert torch.cuda.memory_stats()["num_alloc_retries"] == 1
        del keep
    finally:
        simulated.stop()


# ---- garbage_collection_threshold ----------------------------------------------------------------


def test_garbage_collection_frees_old_cached_blocks_past_the_threshold() -> None:
    """garbage_collect_cached_blocks: with a fraction set, once reserved memory passes the
    threshold's share of it, cached whole segments at least as old as the average go first."""
    gc = allocator("garbage_collection_threshold:0.5", allowed=100 * MiB)
    plain = allocator("", allowed=100 * MiB)
    for a in (gc, plain):
        blocks = [a.malloc(30 * MiB) for _ in range(2)]
        for block in blocks:
            a.free(block)
        a.malloc(40 * MiB)
    assert plain.reserved == 100 * MiB  # 60 cached + 40
    assert gc.reserved == 40 * MiB  # the cached 60 were collected first


def test_garbage_collection_needs_a_memory_fraction() -> None:
    """set_fraction && garbage_collection_threshold() > 0: without a fraction it never runs."""
    a = allocator("garbage_collection_threshold:0.5")
    for block in [a.malloc(30 * MiB) for _ in range(2)]:
        a.free(block)
    a.malloc(40 * MiB)
    assert a.reserved == 100 * MiB


def test_garbage_collect_expandable() -> None:
    """test_cuda.py::TestCuda::test_garbage_collect_expandable, allowed 120 MiB."""
    a = allocator("expandable_segments:False,garbage_collection_threshold:0.5", allowed=120 * MiB)
    first = a.malloc(40 * MiB)
    a.conf = parse_alloc_conf("expandable_segments:True,garbage_collection_threshold:0.5")
    second = a.malloc(40 * MiB)
    a.free(first)
    a.free(second)
    a.malloc(80 * MiB)  # GC runs with an expandable block in the free list
    assert a.reserved <= 120 * MiB


# ---- expandable segments -------------------------------------------------------------------------


def test_expandable_segments_grow_in_place_for_batch_n_plus_1() -> None:
    """Note [Expandable Segments]: a run at N + 1 after N tiles into the one segment instead of
    a new, slightly larger cudaMalloc."""
    plain, grown = allocator(), allocator("expandable_segments:True")
    for a in (plain, grown):
        a.free(a.malloc(50 * MiB))
        a.malloc(55 * MiB)
    assert plain.reserved == 50 * MiB + 56 * MiB and plain.stat("segment") == 2
    assert grown.reserved == 60 * MiB  # three 20 MiB pages, mapped once
    (segment,) = grown.snapshot()
    assert segment["is_expandable"] and segment["total_size"] == 60 * MiB


def test_expandable_segments_map_2mib_pages_for_the_small_pool() -> None:
    """Note [Expandable Segments]: "we use 2MiB pages for our small pool and 20MiB pages for our
    large pool"; one segment per pool grows."""
    a = allocator("expandable_segments:True")
    small = [a.malloc(600 * 1024) for _ in range(5)]  # 3 MiB of small blocks
    assert a.reserved == 4 * MiB  # two 2 MiB pages of one segment
    a.malloc(5 * MiB)
    assert a.reserved == 4 * MiB + 20 * MiB
    kinds = sorted(s["segment_type"] for s in a.snapshot())
    assert kinds == ["large", "small"]
    del small


def test_expandable_segments_give_back_free_pages_of_a_busy_segment() -> None:
    """unmap_block: empty_cache unmaps every wholly free page, even inside a segment still in
    use; a plain segment goes back only when all of it is free."""
    plain, grown = allocator(), allocator("expandable_segments:True")
    for a in (plain, grown):
        a.free(a.malloc(100 * MiB))
        a.malloc(10 * MiB)  # best fit: the cached 100 MiB block, split
        a.empty_cache()
    assert plain.reserved == 100 * MiB  # split: the segment cannot go back
    assert grown.reserved == 20 * MiB  # pages 1-4 were free and unmapped; page 0 holds the 10
    (segment,) = grown.snapshot()
    assert segment["allocated_size"] == 10 * MiB and segment["total_size"] == 20 * MiB


def test_expandable_segments_are_left_out_of_inactive_split() -> None:
    """free_block: "we simply just exclude expandable segments from inactive_split"."""
    a = allocator("expandable_segments:True")
    blocks = [a.malloc(5 * MiB) for _ in range(4)]
    a.free(blocks[0])
    a.free(blocks[2])
    assert a.stat("inactive_split") == 0 and a.stat("inactive_split_bytes") == 0


# ---- test_cuda.py::TestCuda::test_memory_stats (_test_memory_stats_generator) ------------------


def _memory_stats_generator(a: CachingAllocator, n: int = 35) -> Iterator[None]:
    """The generator's checks, on the allocator (torch.cuda.FloatTensor(*size) -> malloc)."""
    last_m, max_m = [a.allocated_bytes], [a.stat("allocated_bytes", "all", "peak")]
    last_r, max_r = [a.reserved], [a.stat("reserved_bytes", "all", "peak")]
    live: dict[int, Block] = {}

    def alloc(*size: int) -> int:
        nbytes = 4
        for s in size:
            nbytes *= s
        if nbytes == 0:  # torch's allocate(0) never reaches malloc
            return 0
        block = a.malloc(nbytes)
        live[id(block)] = block
        return id(block)

    def free(key: int) -> None:
        if key:
            a.free(live.pop(key))

    def assert_change(comp: int = 1, empty_cache: bool = False, reset_peak: bool = False) -> None:
        new_m, new_max_m = a.allocated_bytes, a.stat("allocated_bytes", "all", "peak")
        if comp > 0:
            assert new_m > last_m[0]
        elif comp < 0:
            assert new_m < last_m[0]
        else:
            assert new_m == last_m[0]
        assert new_m <= new_max_m and new_max_m >= max_m[0]
        last_m[0], max_m[0] = new_m, new_max_m
        new_r, new_max_r = a.reserved, a.stat("reserved_bytes", "all", "peak")
        assert new_r <= new_max_r and new_max_r >= max_r[0]
        last_r[0], max_r[0] = new_r, new_max_r
        if empty_cache:
            stats = a.memory_stats()
            num_sync_1, num_alloc_1 = stats["num_sync_all_streams"], stats["num_device_alloc"]
            num_free_1 = stats["num_device_free"]
            assert num_alloc_1 >= (0 if new_m == 0 else 1)
            a.empty_cache()
            stats = a.memory_stats()
            assert stats["num_sync_all_streams"] == num_sync_1 + 1
            assert stats["num_device_alloc"] >= num_alloc_1
            assert stats["num_device_free"] >= num_free_1
            new_r, new_max_r = a.reserved, a.stat("reserved_bytes", "all", "peak")
            assert new_r <= last_r[0] and new_r <= new_max_r and new_max_r == max_r[0]
            last_r[0] = new_r
        if reset_peak:
            a.reset_peak_stats()
            assert a.stat("allocated_bytes", "all", "peak") == last_m[0] == a.allocated_bytes
            max_m[0] = last_m[0]
            assert a.reserved == last_r[0] == a.stat("reserved_bytes", "all", "peak")
            max_r[0] = last_r[0]

    m0 = a.allocated_bytes
    assert_change(0)
    assert_change(0, reset_peak=True)
    assert_change(0, empty_cache=True)
    assert_change(0, reset_peak=True)
    assert_change(0)
    yield
    tensors1 = [alloc(1), alloc(10, 20), alloc(200, 300, 2000)]
    m1 = a.allocated_bytes
    assert_change(1)
    yield
    tensors2 = []
    for i in range(1, n // 2 + 1):  # small ones
        tensors2.append(alloc(i, i * 4))
        assert_change(1)
        yield
    for i in range(5, n // 2 + 5):  # large ones
        tensors2.append(alloc(i, i * 7, i * 9, i * 11))
        assert_change(1, reset_peak=(i % 2 == 0))
        yield
    tensors2.append(alloc(0, 0, 0))
    assert_change(0)
    yield
    random.Random(0).shuffle(tensors2)
    assert_change(0)
    yield
    for _ in range(n // 2):
        key = tensors2.pop(0)
        free(key)
        assert_change(-1 if key else 0)
        yield
    for i in range(2, int(2 * n / 3) + 2):
        tensors2.append(alloc(i, i * 3, i * 8))
        assert_change(1)
        yield
    for key in tensors2:
        free(key)
    assert_change(-1, reset_peak=True)
    assert_change(0)
    assert a.allocated_bytes == m1
    yield
    for key in tensors1:
        free(key)
    assert_change(-1, reset_peak=True)
    assert a.allocated_bytes == m0
    assert_change(0, empty_cache=True)
    assert_change(0, reset_peak=True)
    assert a.reserved == 0


@pytest.mark.parametrize("settings", ["", "expandable_segments:True", "max_split_size_mb:20"])
def test_memory_stats(settings: str) -> None:
    for _ in _memory_stats_generator(allocator(settings)):
        pass


# ---- torch's readings ----------------------------------------------------------------------------


def test_memory_stats_keys_are_torchs() -> None:
    """torch.cuda.memory_stats' docstring: the core statistics by pool and metric, the event
    counters, max_split_size and the oversize counters; sorted, as torch returns them."""
    stats = allocator().memory_stats()
    metrics = ("current", "peak", "allocated", "freed")
    for name in (
        "allocation",
        "segment",
        "active",
        "inactive_split",
        "allocated_bytes",
        "reserved_bytes",
        "active_bytes",
        "inactive_split_bytes",
        "requested_bytes",
    ):
        for kind in ("all", "large_pool", "small_pool"):
            for metric in metrics:
                assert stats[f"{name}.{kind}.{metric}"] == 0
    for name in ("oversize_allocations", "oversize_segments"):
        for metric in metrics:
            assert f"{name}.{metric}" in stats
    for name in ("num_alloc_retries", "num_ooms", "num_sync_all_streams", "num_device_alloc"):
        assert stats[name] == 0
    assert stats["num_device_free"] == 0 and "num_oom_rejections" in stats
    assert stats["max_split_size"] == -1  # SIZE_MAX as an int64
    assert allocator("max_split_size_mb:64").memory_stats()["max_split_size"] == 64 * MiB
    assert list(stats) == sorted(stats)


def test_memory_snapshot() -> None:
    """test_cuda.py::TestCuda::test_memory_snapshot: x is the second block of its segment and
    its block carries the requested size; every segment has frames."""
    torch = pytest.importorskip("torch")
    from jupyter_gpumem.backends import simulated

    try:
        simulated.start(1 * GiB)
        torch.cuda.memory.empty_cache()
        torch.rand(2 * 311, 411, device="cuda")  # make x the second block in a segment
        unused = torch.rand(310, 410, device="cuda")
        x = torch.rand(311, 411, device="cuda")
        tensors = [torch.rand(128, device="cuda") for _ in range(1000)]
        rng = random.Random(0)
        while tensors:
            del tensors[rng.randint(0, len(tensors) - 1)]
        torch.rand(128 * 5, device="cuda")
        segments = torch.cuda.memory_snapshot()
        found = []
        for seg in segments:
            assert "frames" in seg and seg["segment_type"] in ("small", "large")
            assert seg["total_size"] == sum(b["size"] for b in seg["blocks"])
            for i, b in enumerate(seg["blocks"]):
                assert b["state"] in ("active_allocated", "inactive")
                if b["requested_size"] == 311 * 411 * 4 and b["state"] == "active_allocated":
                    found.append(i)
        assert found == [1]
        allocated = sum(s["allocated_size"] for s in segments)
        assert allocated == torch.cuda.memory_allocated()
        assert sum(s["total_size"] for s in segments) == torch.cuda.memory_reserved()
        del unused, x
    finally:
        simulated.stop()


def test_cuda_malloc_async_is_refused_in_one_line() -> None:
    pytest.importorskip("torch")
    from jupyter_gpumem.backends import simulated

    with pytest.raises(ValueError) as raised:
        simulated.start(1 * GiB, alloc_conf="backend:cudaMallocAsync")
    message = str(raised.value)
    assert "cudaMallocAsync" in message and "native" in message and "\n" not in message
    assert simulated.current() is None


def test_the_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    from jupyter_gpumem.backends import simulated

    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    try:
        gpu = simulated.start(1 * GiB)
        t = torch.empty(50 * MiB, dtype=torch.uint8, device="cuda")
        assert gpu.reserved_bytes == 60 * MiB  # 20 MiB pages
        assert torch.cuda.memory_snapshot()[0]["is_expandable"]
        del t
    finally:
        simulated.stop()
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:10")
    with pytest.raises(ValueError, match="max_split_size_mb too small"):
        simulated.start(1 * GiB)


def test_the_card_shares_no_arithmetic_with_the_batch_replay() -> None:
    """Issue 18: the predictor must not check itself. The simulated card counts with the ported
    allocator; from backends/allocator.py it takes only the log types of the backend protocol,
    and the batch replay imports nothing of the card's."""
    import ast
    from pathlib import Path

    import jupyter_gpumem

    root = Path(jupyter_gpumem.__file__).parent

    def imports(path: Path) -> Iterator[tuple[str, set[str]]]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                yield node.module, {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    yield alias.name, set()

    for path in (root / "backends" / "simulated").glob("*.py"):
        for module, names in imports(path):
            if module == "jupyter_gpumem.backends.allocator":
                assert names <= {"SizeLog", "SizeRecorder"}, path.name
    for module, names in imports(root / "fixes" / "batch" / "replay.py"):
        assert "simulated" not in module and "caching_allocator" not in module
        assert not names & {"simulated", "caching_allocator"}


def test_per_process_memory_fraction_setting_caps_the_card() -> None:
    """CUDAAllocatorConfig's per_process_memory_fraction: the cap set_per_process_memory_fraction
    sets, from the environment (and garbage_collection_threshold's base)."""
    torch = pytest.importorskip("torch")
    from jupyter_gpumem.backends import simulated

    try:
        gpu = simulated.start(1 * GiB, alloc_conf="per_process_memory_fraction:0.25")
        assert gpu.devices[0]._alloc.allowed == GiB // 4
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(300 * MiB, dtype=torch.uint8, device="cuda")
        torch.cuda.set_per_process_memory_fraction(0.5)  # the call wins over the setting
        t = torch.empty(300 * MiB, dtype=torch.uint8, device="cuda")
        del t
    finally:
        simulated.stop()

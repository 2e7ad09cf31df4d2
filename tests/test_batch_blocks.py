"""The batch replay's own model of the caching allocator (``fixes/batch/blocks.py``), checked
against PyTorch's documented rules (``CUDACachingAllocator.cpp``'s constants and comments, the
CUDA semantics notes), not against the simulated card: it shares no code with it."""

from __future__ import annotations

import ast
from pathlib import Path

from jupyter_gpumem.fixes.batch.blocks import BlockModel, block_size

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]


def _model(*steps: tuple[str, int, int]) -> BlockModel:
    m = BlockModel()
    for op, key, nbytes in steps:
        if op == "a":
            m.alloc(key, nbytes)
        else:
            m.free(key)
    return m


def test_requests_round_to_512_bytes() -> None:
    assert block_size(1) == 512 and block_size(512) == 512 and block_size(513) == 1024


def test_small_requests_share_2_mib_segments() -> None:
    m = _model(*(("a", i, 100_000) for i in range(20)))  # 20 x ~98 KiB: one 2 MiB segment
    assert m.reserved == 2 * MiB
    m.alloc(99, 200_000)  # past 2 MiB: a second small segment
    assert m.reserved == 4 * MiB


def test_mid_sized_requests_share_20_mib_segments() -> None:
    m = _model(("a", 1, 5 * MiB), ("a", 2, 5 * MiB))
    assert m.reserved == 20 * MiB


def test_large_requests_take_their_size_rounded_to_2_mib() -> None:
    assert _model(("a", 1, 11 * MiB)).reserved == 12 * MiB


def test_a_freed_block_is_reused_best_fit_and_split() -> None:
    # 12 MiB freed, then 11 MiB: the cached block is reused (split would leave 1 MiB: kept whole)
    m = _model(("a", 1, 12 * MiB), ("f", 1, 0), ("a", 2, 11 * MiB))
    assert m.reserved == m.peak == 12 * MiB
    # a 20 MiB segment: 8 MiB taken, the 12 MiB left holds a 10 MiB request
    m = _model(("a", 1, 8 * MiB), ("a", 2, 10 * MiB))
    assert m.reserved == 20 * MiB


def test_fragmentation_two_free_holes_cannot_hold_a_larger_request() -> None:
    """Four 5 MiB blocks in one 20 MiB segment; the first and third freed: 10 MiB is free but in
    two 5 MiB holes, so 9 MiB needs a new segment (a count of bytes would say 19 MiB fit in 20)."""
    m = _model(*(("a", i, 5 * MiB) for i in range(4)), ("f", 0, 0), ("f", 2, 0), ("a", 9, 9 * MiB))
    assert m.reserved == 40 * MiB
    # freeing the block between two holes merges them: 15 MiB in one piece
    m = _model(*(("a", i, 5 * MiB) for i in range(4)), ("f", 0, 0), ("f", 2, 0), ("f", 1, 0))
    m.alloc(9, 14 * MiB)
    assert m.reserved == 20 * MiB


def test_at_the_limit_entirely_free_segments_go_back_first() -> None:
    # 12 MiB cached and free, then 14 MiB: the 12 MiB segment is given back before the new one
    m = _model(("a", 1, 12 * MiB), ("f", 1, 0), ("a", 2, 14 * MiB))
    assert m.reserved == m.peak == 14 * MiB


def test_need_replays_a_size_log() -> None:
    # resident 4 MiB; a 30 MiB activation and a 1 KiB loss; the activation freed; a resident freed
    events = [(0, 30 * MiB), (1, 1024), (-1, 0), (-2, 4 * MiB)]
    assert BlockModel.need([4 * MiB], events) == 20 * MiB + 30 * MiB + 2 * MiB


def test_the_replay_shares_no_code_with_the_simulated_card() -> None:
    """Issue 18: the predictor must not count with the card's arithmetic (backends.allocator's
    Pools, rounded, ceil_to), or its error is zero by construction."""
    for name in ("replay.py", "blocks.py", "search.py"):
        tree = ast.parse((ROOT / "jupyter_gpumem" / "fixes" / "batch" / name).read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module == "jupyter_gpumem.backends.allocator"
            ):
                assert {a.name for a in node.names} <= {"SizeLog", "SizeRecorder"}, name
            if isinstance(node, ast.ImportFrom) and node.module:
                assert "simulated" not in node.module, name


def test_a_split_after_segments_were_given_back_stays_in_the_pool() -> None:
    # the free 12 MiB segment is given back before a new small one, whose block splits: what is
    # left must serve the next small request (was: lost in the pool's old list, a second segment)
    m = _model(("a", 1, 12 * MiB), ("f", 1, 0), ("a", 2, 100_000), ("a", 3, 100_000))
    assert m.reserved == 2 * MiB

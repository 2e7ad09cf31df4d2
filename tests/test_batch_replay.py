"""Reduce batch's replay of a run's allocations (fixes/batch/replay.py, fixes/batch/blocks.py).

The replay's predictions are checked against what the simulated card counts at batches the replay
never saw: the replay counts with its own model of the allocator (blocks.py, not the card's
arithmetic), so they agree to within its measured error, one small-pool segment (2 MiB); `%gpumem retry batch` on a workload where the allocator's blocks make a line
through the peaks overshoot; the prime first probe; tracing keeps recording while Reduce batch
logs sizes. Torch's CUDA history is parsed from a snapshot written by hand in torch's format (no
GPU here: the only mock in this file, and it says so).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import jupyter_gpumem  # noqa: E402
from jupyter_gpumem.backends.allocator import Pools, SizeLog  # noqa: E402
from jupyter_gpumem.backends.cuda import size_log_from_snapshot  # noqa: E402
from jupyter_gpumem.fixes.batch.replay import Replay, is_prime  # noqa: E402
from jupyter_gpumem.fixes.batch.search import BatchSearch, Observation  # noqa: E402

MiB = 1 << 20
# The replay's error against the simulated card (PyTorch's caching allocator, ported) at the
# card's limit, measured on this file's MLP at 700 to 9000 and 4220: none; one small-pool
# segment allowed.
_ERROR = 2 * MiB


def _run(gpu: Any, batch: int, adam: bool = True, hidden: int = 512) -> tuple[int, SizeLog | None]:
    """Two training steps of an MLP at ``batch`` from a fresh model and optimizer (its state made
    on the first step): (reserved peak, the log of the run)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
    ).cuda()
    opt = (torch.optim.Adam if adam else torch.optim.SGD)(model.parameters(), lr=1e-3)
    torch.cuda.reset_peak_memory_stats()
    with gpu.record_sizes() as log:
        for _ in range(2):
            x = torch.randn(batch, 64, device="cuda")
            y = torch.randint(0, 10, (batch,), device="cuda")
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        del x, y, loss, opt
    return torch.cuda.memory_stats()["reserved_bytes.all.peak"], log


def _card_need(batch: int, **kw: Any) -> int:
    """The smallest simulated card (to 1 MiB) the run fits on: what the replay predicts. On a
    card with a cache the reserved peak of a roomy card is more than that (cached blocks are
    kept), so the need is found at the limit, where the allocator gives free segments back."""
    lo, hi = 0, 512  # MiB; fits at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            with jupyter_gpumem.simulate(mid * MiB) as gpu:
                _run(gpu, batch, **kw)
            hi = mid
        except torch.OutOfMemoryError:
            lo = mid
    return hi * MiB


def test_one_run_at_a_prime_batch_predicts_the_card_at_other_batches() -> None:
    with jupyter_gpumem.simulate("1GiB") as gpu:
        _, log = _run(gpu, 509)
    assert log is not None and log.complete and log.resident  # the weights were there
    replay = Replay.from_runs([(509, _card_need(509), log)])
    assert replay is not None and replay.how == "one run at a prime batch"
    for batch in (700, 2048, 4097, 9000):  # 4097: the input passes 1 MiB, a 20 MiB block
        assert abs(replay.need(batch) - _card_need(batch)) <= _ERROR, batch


def test_two_runs_give_each_allocation_its_line() -> None:
    with jupyter_gpumem.simulate("1GiB") as gpu:
        runs = [(b, *_run(gpu, b, adam=False)) for b in (600, 1000)]
        replay = Replay.from_runs(runs)
        assert replay is not None and replay.how == "two runs"
        assert abs(replay.need(5000) - _run(gpu, 5000, adam=False)[0]) <= _ERROR


def test_one_run_at_a_composite_batch_is_no_model() -> None:
    """A multiple of 1024 divides weights' sizes too: one run there cannot tell what grows."""
    with jupyter_gpumem.simulate("1GiB") as gpu:
        peak, log = _run(gpu, 1024)
        assert Replay.from_runs([(1024, peak, log)]) is None


def test_a_line_through_the_peaks_cannot_see_the_blocks() -> None:
    """Why the replay exists: between 4000 and 4220 samples the reserved peak jumps by a 20 MiB
    block (the input passes 1 MiB), which the line through two smaller batches misses; the
    replay of the run at 2003 (a prime) does not."""
    with jupyter_gpumem.simulate("1GiB") as gpu:
        _, log = _run(gpu, 2003, hidden=2048)
    p1, p2 = _card_need(2003, hidden=2048), _card_need(4000, hidden=2048)
    measured = _card_need(4220, hidden=2048)
    assert measured > p2 + (p2 - p1) / 1997 * 220 + 15 * MiB
    replay = Replay.from_runs([(2003, p1, log)])
    assert replay is not None and abs(replay.need(4220) - measured) <= _ERROR


def test_the_first_probe_is_a_prime() -> None:
    search = BatchSearch(capacity_bytes=128 * MiB, max_batch=16383, replay_logs=True)
    search.observe(Observation(16384, False, None, requested_bytes=64 * MiB))
    first = search.next_batch()
    assert first is not None and is_prime(first) and first < 16384


def test_pools_count_blocks_as_the_allocator_does() -> None:
    pools = Pools()
    pools.grow(100, 1)  # a small tensor: a 2 MiB block
    assert pools.reserved() == 2 * MiB
    pools.grow(3 * MiB, 1)  # mid-sized: a 20 MiB block
    assert pools.reserved() == 22 * MiB
    pools.grow(11 * MiB + 1, 1)  # large: its size rounded up to 2 MiB
    assert pools.reserved() == 22 * MiB + 12 * MiB
    pools.grow(3 * MiB, -1)
    assert pools.reserved() == 14 * MiB


def test_tracing_keeps_recording_while_sizes_are_logged(shell: Any) -> None:
    from jupyter_gpumem import backends
    from jupyter_gpumem.readings import trace

    shell.run_cell("%gpumem simulate 256MiB")
    shell.run_cell("import torch")
    trace.start(shell=shell)
    try:
        with backends.active().record_sizes() as log:
            assert shell.run_cell("keep = torch.ones(1000, device='cuda')").success
        assert log is not None and log.sizes() == [4000]
        rows = trace.allocated_by_line(shell)
        assert [r.bytes for r in rows if r.where.endswith("line 1")] == [4000]  # told too
    finally:
        trace.stop()


def test_record_sizes_gives_the_hook_back_after_an_interrupt() -> None:
    with jupyter_gpumem.simulate("64MiB") as gpu:
        card = gpu.card(None)
        with pytest.raises(KeyboardInterrupt), gpu.record_sizes():
            torch.ones(10, device="cuda")
            raise KeyboardInterrupt
        assert card._history is None


@pytest.mark.slow
def test_retry_batch_lands_on_the_largest_in_two_runs(shell: Any, capsys: Any) -> None:
    """The benchmark's MLP + Adam row through `%gpumem retry batch`: a 128 MiB card, the largest
    batch that fits found by bisection, each probe from a fresh card and a fresh model, the cell
    run twice (measured: 4352 fits one, two and three runs in a row; 4353 does not).

    Was marked order-dependent (after tests/test_batch_effective.py and test_batch_steady.py in
    one process it kept 4608); run in that order and in the suite's (test_batch_blocks, _device,
    _effective, _loaders, then this file) it keeps a batch within the bracket."""
    setup = """\
import torch
import torch.nn.functional as F
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(64, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 10),
).cuda()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
"""
    cell = """\
batch_size = 16384
for step in range(2):
    x = torch.randn(batch_size, 64, device="cuda")
    y = torch.randint(0, 10, (batch_size,), device="cuda")
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
"""

    def fits(b: int) -> bool:
        ns: dict[str, Any] = {}
        with jupyter_gpumem.simulate("128MiB"):
            exec(setup, ns)
            try:
                exec(cell.replace("16384", str(b)), ns)
                exec(cell.replace("16384", str(b)), ns)  # the next steps too
                return True
            except torch.OutOfMemoryError:
                return False
            finally:
                ns.clear()

    lo, hi = 0, 16384
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)

    shell.run_cell("%gpumem simulate 128MiB")
    assert shell.run_cell(setup).success
    assert not shell.run_cell(cell).success
    capsys.readouterr()
    shell.run_cell("%gpumem retry batch")
    cap = capsys.readouterr()
    out = cap.out + cap.err
    m = re.search(r"Fits at batch (\d+) \(was 16384\).*?(\d+) rehearsals? \+ 1 real run", out)
    assert m, out
    batch, rehearsals = int(m.group(1)), int(m.group(2))
    assert rehearsals + 1 <= 3, out  # runs after the failure, the kept one included
    assert 0.95 * lo <= batch <= lo, (batch, lo, out)
    assert shell.ev("batch_size") == batch
    first = int(re.findall(r"batch (\d+) +fits", out)[0])
    assert (
        f"How: the allocations of the run at batch {first}, replayed at other batches with the "
        f"allocator's block sizes, put the largest batch that fits at {batch}." in out
    ), out
    assert shell.run_cell(cell.replace("16384", str(batch))).success  # the next steps fit


def test_torch_history_read_into_a_size_log() -> None:
    """torch.cuda.memory._snapshot()'s format, written by hand (no GPU here): a resident weight,
    an activation made and freed, a resident block freed, an output kept."""
    snapshot = {
        "segments": [
            {
                "device": 0,
                "address": 1000,
                "blocks": [
                    {"size": 2048, "requested_size": 2000, "state": "active_allocated"},
                    {"size": 4096, "requested_size": 4096, "state": "active_allocated"},
                    {"size": 512, "state": "inactive"},
                ],
            },
            {"device": 1, "address": 0, "blocks": [{"size": 512, "state": "active_allocated"}]},
        ],
        "device_traces": [
            [
                {"action": "alloc", "addr": 9000, "size": 8192},
                {"action": "free_requested", "addr": 9000, "size": 8192},
                {"action": "free_completed", "addr": 9000, "size": 8192},
                {"action": "free_completed", "addr": 7000, "size": 1024},
                {"action": "alloc", "addr": 3048, "size": 4096},
            ],
            [],
        ],
    }
    log = size_log_from_snapshot(snapshot, 0, max_events=100)
    assert log.events == [(0, 8192), (-1, 0), (-2, 1024), (1, 4096)]
    assert sorted(log.resident) == [1024, 2000]  # the block at 3048 was allocated in the run
    assert log.complete
    assert not size_log_from_snapshot(snapshot, 0, max_events=5).complete


def test_largest_sees_past_a_bump_in_the_need() -> None:
    """One tensor of 1 KiB a sample: a 2 MiB block up to 1024 samples, a 20 MiB block up to 10 MiB,
    then its own block rounded to 2 MiB. Within 15 MiB: up to 1024, and again from 10240 to
    14336; bisection over the whole range would stop at 1024."""
    replay = Replay(((0.0, 1024.0),), SizeLog(events=[(0, 1024)], allocations=1), 0, "test")
    assert replay.need(1024) == 2 * MiB and replay.need(5000) == 20 * MiB
    assert replay.need(12000) == 12 * MiB
    assert replay.largest(15 * MiB, 1, 20000) == 14336
    assert replay.largest(15 * MiB, 1, 9000) == 1024

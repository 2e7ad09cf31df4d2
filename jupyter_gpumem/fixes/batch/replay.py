"""Reduce batch's model from sizes: a recorded run replayed, at another batch, through the allocator.

A line through measured peaks cannot see the allocator's blocks: on a small card a tensor that
grows past 1 MiB takes a 20 MiB block of its own, and the peak jumps by a sixth of the card between
two batches that a line puts a few MiB apart (measured on the MLP workload of
``benchmarks/batch_search.py``: reserved 98 MiB at batch 4000, 124 MiB at 4220, while allocated
went from 95 to 101). So Reduce batch also records what each run allocated and freed, in order
(``MemoryBackend.record_sizes()``), and predicts the need at a batch ``b`` by replaying that log
with each allocation resized for ``b``, through the replay's own model of the caching allocator
(``blocks.py``: best fit in cached blocks, splitting, segments, written from PyTorch's documented
rules and sharing no code with the simulated card, so that its error can be measured; with
``expandable_segments:True``, one segment per pool mapped page by page).

How an allocation's size follows the batch:

- from two runs of the same code (the same events, other sizes): a line through its two sizes,
  exact for every tensor whose size is affine in the batch;
- from one run at a prime batch ``p``: a size divisible by ``p`` is ``p`` times a per-sample size,
  anything else does not depend on the batch (a weight, a loss, the optimizer's state). A size that
  happens to be a multiple of a prime near a thousand is rare; the search makes its first probe a
  prime for this reason, so that one fit is enough to aim at the largest batch.

The steady state: a rehearsal runs two passes of the loop (a cell without one, twice), and the
allocator's blocks are not always settled by then (the CIFAR-10 tutorial at 1448 on 128 MiB: two
steps fit, the third runs out). The replay finds the log's last pass and plays it again until the
peak stops rising (:class:`Cycle`), so that ``need`` is what the rest of the run needs, not the
rehearsed passes (``recorded_need``); it costs no run.

The replay is calibrated on the run it came from (on the passes it recorded): what the run measured, less what the replay
gives at its batch, is added to every prediction (what the model leaves out or adds: memory
outside the allocator's blocks, a cache the run found warm, holes the card did not leave).
Measured against the simulated card with PyTorch's caching allocator ported (f566edc), as the
smallest card a run fits on: exact on an MLP at 700 to 9000 from one run at 509
(``tests/test_batch_replay.py``). Against the card before it (no cache), 6-19% over alone. ``benchmarks/batch_search.py`` reports the error that remains at the
batch proposed (the "replay error" column).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from jupyter_gpumem.backends.allocator import SizeLog
from jupyter_gpumem.fixes.batch.blocks import LARGE_ALONE, BlockModel
from jupyter_gpumem.units import format_bytes

__all__ = [
    "MIN_PRIME_BATCH",
    "REPLAY_MARGIN",
    "Cycle",
    "Replay",
    "is_prime",
    "prime_at_most",
    "replay_note",
]

# One run tells which allocations grow with the batch from a prime batch this large. A constant
# size that is a multiple of it by chance (a 7x7 kernel's weights at 7) counts as growing: the
# replay then overstates the need and proposes a batch that fits, never one that does not.
MIN_PRIME_BATCH = 7
# The search aims where the replay leaves this much of the card free: the replay counts the
# allocator's blocks, so the head-room covers only what the arithmetic leaves out.
REPLAY_MARGIN = 0.01

# A log with more events than this is not replayed: each prediction walks it once (about 1 µs an
# event) and a proposal asks for a few dozen, so this keeps one under a second or two.
_MAX_EVENTS = 50_000
# The last pass played again at most this many times for the steady state (see Cycle); on the
# CIFAR-10 tutorial and nanoGPT the peak stops rising after the first (the second confirms it).
_MAX_EXTRA_PASSES = 4


@dataclass(frozen=True)
class Replay:
    """Predicts the reserved peak of the recorded code at any batch."""

    # (size at batch 0, bytes per sample) of each allocation, by number
    sizes: tuple[tuple[float, float], ...]
    log: SizeLog
    offset: int  # measured less replayed, at the run the replay came from
    how: str  # for people: "two runs" or "one run at a prime batch"
    batches: tuple[int, ...] = ()  # of the runs it came from
    # the recorded run's last pass, repeated after it for the steady state (None: no pass found)
    cycle: Cycle | None = None
    # the allocator runs with ``expandable_segments:True`` (blocks.ExpandableModel)
    expandable: bool = False
    # peak(batch, steady) already replayed: a search asks for the same batches again
    _peaks: dict[tuple[int, bool], int] = dataclasses.field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    @classmethod
    def from_runs(
        cls, runs: list[tuple[int, int, SizeLog | None]], expandable: bool = False
    ) -> Replay | None:
        """From fitted runs ``(batch, measured peak, log)``, the largest batches first;
        ``expandable``: the allocator runs with ``expandable_segments:True``."""
        logged = [(b, p, log) for b, p, log in runs if log is not None and _usable(log)]
        if not logged:
            return None
        b2, p2, log2 = max(logged, key=lambda r: r[0])
        shape = log2.shape()
        pair = [r for r in logged if r[0] < b2 and r[2].shape() == shape]
        batches: tuple[int, ...]
        if pair:
            b1, _, log1 = max(pair, key=lambda r: r[0])
            sizes = tuple(
                (s1 - (s2 - s1) / (b2 - b1) * b1, (s2 - s1) / (b2 - b1))
                for s1, s2 in zip(log1.sizes(), log2.sizes(), strict=True)
            )
            how, batches = "two runs", (b1, b2)
        elif b2 >= MIN_PRIME_BATCH and is_prime(b2):
            sizes = tuple(
                (0.0, s / b2) if s and s % b2 == 0 else (float(s), 0.0) for s in log2.sizes()
            )
            how, batches = "one run at a prime batch", (b2,)
        else:
            return None
        if not any(k > 0 for _, k in sizes):
            return None  # nothing grows with the batch: the batch is not what fills the card
        replay = cls(sizes, log2, 0, how, batches, Cycle.last_of(log2, expandable), expandable)
        # calibrated on what the run measured: the recorded passes, not the steady state
        return dataclasses.replace(replay, offset=p2 - replay.peak(b2, steady=False))

    def need(self, batch: int) -> int:
        """The reserved peak at ``batch`` in the steady state: the log replayed with each
        allocation resized, then its last pass again until the allocator's blocks settle,
        through the replay's own model of the caching allocator (``blocks.py``)."""
        return self.peak(batch) + self.offset

    def recorded_need(self, batch: int) -> int:
        """The reserved peak at ``batch`` of the recorded passes alone (what a rehearsal of them
        measures)."""
        return self.peak(batch, steady=False) + self.offset

    def peak(self, batch: int, steady: bool = True) -> int:
        """The replayed reserved peak at ``batch``, uncalibrated."""
        known = self._peaks.get((batch, steady))
        if known is not None:
            return known
        sized = [max(0, round(base + k * batch)) for base, k in self.sizes]
        model = BlockModel.starting(self.log.resident, self.expandable)
        model.replay((n, sized[n]) if n >= 0 else (n, value) for n, value in self.log.events)
        if steady and self.cycle is not None:
            self.cycle.repeat(model, sized, self.log.allocations)
        self._peaks[batch, steady] = model.peak
        return model.peak

    def largest(self, budget: float, lo: int, hi: int) -> int:
        """The largest batch in ``[lo, hi)`` whose need is within ``budget`` (``lo`` if none).

        The need is not monotonic: where a tensor passes 10 MiB it leaves the shared 20 MiB
        blocks for a block of its own, and the total can drop (the benchmark's convnet needs
        126 MiB at 832 and at 896, more at 839). Between two such crossings it only grows. So the
        range is cut at every crossing, the segments tried from the top, and the need bisected
        in the highest segment that starts within the budget."""
        if self.need(lo) > budget:
            return lo
        starts = {lo}
        for base, k in self.sizes:
            if k > 0:
                at = math.ceil((LARGE_ALONE - 512 - base) / k)
                starts.update(c for c in (at - 1, at, at + 1) if lo < c < hi)
        edges = sorted(starts)
        for start, end in reversed(list(zip(edges, [*edges[1:], hi], strict=True))):
            if self.need(start) <= budget:
                return self._bisect(budget, start, end)
        return lo

    def largest_below(self, capacity: float, lo: int, failed: int) -> int | None:
        """The largest batch under ``failed`` (a batch that ran out) that fits ``capacity``; None
        when the replay says ``failed`` fits too: it is wrong about this code."""
        full = self.largest(capacity, lo, failed)
        return None if full >= failed - 1 and self.need(failed) <= capacity else full

    def _bisect(self, budget: float, lo: int, hi: int) -> int:
        """``lo`` fits the budget: the largest that does below ``hi``, if the need grows."""
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.need(mid) <= budget else (lo, mid)
        return lo


@dataclass(frozen=True)
class Cycle:
    """The recorded run's last pass, as what every pass after it does.

    A rehearsal stops after two passes of the loop (a cell without a loop runs twice), and the
    allocator's blocks are not always settled by then: on PyTorch's CIFAR-10 tutorial at 1448 on
    128 MiB, two steps fit and the third ran out, 26 MiB asked with 42.76 MiB of the 106 MiB
    reserved free in pieces (the blocks the second step left are laid out otherwise than the
    first's). So the replay plays the last pass again, as many times as it takes for the peak
    to stop rising (at least twice, at most :data:`_MAX_EXTRA_PASSES`), which costs no run.

    Found in the log alone: the pass is the longest run of allocation sizes at the end of the log
    that also occurs, whole, before it (the first pass may do more, as an optimizer making its
    state does, so the match is the second pass's allocations against the first's), with the
    frees before its first allocation that start it (word_language_model's ``model.zero_grad()``
    freeing the last pass's gradients: left out, each pass replayed kept its gradients and
    stopped the search at 7 of 16). It is the
    steady state when what it frees from before it (the last pass's inputs, gradients, loss) is,
    size for size, what it leaves allocated at its end: the next pass frees those in their
    place. A pass that frees something it does not make again is no steady state: no cycle, and
    the replay is the recorded passes alone. What a pass leaves allocated and the next one does
    not free (a list of GPU losses growing) stays, and grows with each pass replayed.
    """

    # (0, n): allocate a copy of allocation n; (1, n): free this pass's copy of n; (2, n): free
    # the previous pass's copy of n (what the pass freed from before it, in its place)
    ops: tuple[tuple[int, int], ...]
    start: int  # where the last pass starts in the log's events

    @classmethod
    def last_of(cls, log: SizeLog, whole: bool = False) -> Cycle | None:
        """The log's last pass, where it is one of a steady state (see the class). ``whole``:
        a pass that starts as the log starts is taken whole (see below)."""
        where = [i for i, (n, _) in enumerate(log.events) if n >= 0]
        sizes = [log.events[i][1] for i in where]
        length, earlier = _repeated_tail(sizes)
        start, head = _repeated_head(sizes)
        if whole and head > length:
            # the last pass starts as the log starts and ends otherwise: a cell run twice whose
            # first run made state in its middle (Adam's at the first step()), so that only the
            # pass's end (the optimizer's update) recurs whole. Taken where the next pass frees
            # all it leaves (the pairing of its frees with the first run's is by size there).
            # With expandable segments the third run of the one-Adam-step cell needs more than
            # the update replayed shows (142 MiB at 1156 on 128 MiB, 122 replayed); with the
            # default allocator the update alone was measured enough, and the whole pass moved
            # pytorch/examples VAE on 48 MiB to a batch whose real run ran out (1101 kept of
            # 1904): not taken there.
            found = cls._of(log, where, sizes, len(sizes) - start, 0, leak_free=True)
            if found is not None:
                return found
        return cls._of(log, where, sizes, length, earlier)

    @classmethod
    def _of(
        cls,
        log: SizeLog,
        where: list[int],
        sizes: list[int],
        length: int,
        earlier: int,
        leak_free: bool = False,
    ) -> Cycle | None:
        """The pass of the last ``length`` allocations, the same sizes as those from
        ``earlier``; None where it is no steady state (``leak_free``: or leaves something the
        next pass does not free)."""
        if length < 2:
            return None
        first = len(sizes) - length  # the number of the pass's first allocation
        window = log.events[where[first] :]
        freed = {v for n, v in window if n == -1 and v >= first}
        # what the pass left allocated at its end, by size; an allocation the pass frees from
        # before it is, next time, the pass's own allocation in the same place of the repeated
        # sizes (the earlier pass's n-th is this pass's n-th), else one of the same size
        left: dict[int, list[int]] = {}
        for n, _ in window:
            if n >= 0 and n not in freed:
                left.setdefault(sizes[n], []).append(n)

        def twin(n: int) -> int:
            return n - earlier + first if 0 <= n - earlier < length else -1

        ops: list[tuple[int, int]] = []
        # The frees between the earlier pass's last allocation and this pass's first: of those,
        # the frees of an allocation whose twin this pass leaves allocated start the pass (a
        # `zero_grad()` freeing the last pass's gradients); the others end the earlier pass,
        # and this pass's own frees at its end stand for them.
        for n, value in log.events[where[first - 1] + 1 if first else 0 : where[first]]:
            same = left.get(sizes[value], []) if n == -1 else []
            if twin(value) in same:
                same.remove(twin(value))
                ops.append((2, twin(value)))
        for n, value in window:
            if n >= 0:
                ops.append((0, n))
            elif n == -1 and value >= first:
                ops.append((1, value))
            else:
                same = left.get(sizes[value] if n == -1 else value, [])
                instead = twin(value) if n == -1 and twin(value) in same else None
                instead = same[0] if instead is None and same else instead
                if instead is None:
                    return None
                same.remove(instead)
                ops.append((2, instead))
        if leak_free and any(left.values()):
            return None
        return cls(tuple(ops), where[first])

    def repeat(self, model: BlockModel, sized: list[int], numbered: int) -> None:
        """Play the pass on ``model`` (which has run the log) until the peak stops rising;
        ``sized``: each allocation's size at the batch; ``numbered``: the log's allocations."""
        previous: dict[int, int] | None = None  # the last copy's keys; None: the log's own
        for extra in range(_MAX_EXTRA_PASSES):
            before = model.peak
            copies: dict[int, int] = {}
            for op, n in self.ops:
                if op == 0:
                    copies[n] = numbered
                    model.alloc(numbered, sized[n])
                    numbered += 1
                elif op == 1:
                    model.free(copies[n])
                else:
                    model.free(n if previous is None else previous[n])
            previous = copies
            if extra >= 1 and model.peak == before:
                return


def _z_function(values: list[int]) -> list[int]:
    """``z[i]``: how long ``values[i:]`` agrees with ``values`` from its start (linear)."""
    n = len(values)
    z = [0] * n
    left = right = 0
    for i in range(1, n):
        if i < right:
            z[i] = min(right - i, z[i - left])
        while i + z[i] < n and values[z[i]] == values[i + z[i]]:
            z[i] += 1
        if i + z[i] > right:
            left, right = i, i + z[i]
    return z


def _repeated_tail(values: list[int]) -> tuple[int, int]:
    """The longest tail of ``values`` that also occurs, whole and apart from it, earlier: its
    length and where the nearest such occurrence starts (a Z-function over the reversed list:
    linear)."""
    n = len(values)
    z = _z_function(values[::-1])
    best = at = 0
    for i in range(1, n):
        if min(z[i], i) > best:
            best, at = min(z[i], i), n - i - min(z[i], i)
    return best, at


def _repeated_head(values: list[int]) -> tuple[int, int]:
    """Where the latest of the longest repeats of ``values``' head starts, and its length (a
    Z-function: linear); ``(0, 0)`` when the head does not recur."""
    n = len(values)
    z = _z_function(values)
    start = best = 0
    for i in range(1, n):
        if min(z[i], i) >= best and z[i] > 0:
            start, best = i, min(z[i], i)
    return start, best


def replay_note(batches: tuple[int, ...], full: int, chosen: int, capacity: int) -> str:
    """How the replay placed ``chosen``, for people."""
    runs = " and ".join(map(str, batches))
    note = (
        f"How: the allocations of the run at batch {runs}, replayed at other batches with the "
        f"allocator's block sizes, put the largest batch that fits at {full}"
    )
    if chosen < full:
        return f"{note}; {chosen} leaves {format_bytes(int(capacity * REPLAY_MARGIN))} of the card free."
    return note + "."


def _usable(log: SizeLog) -> bool:
    return log.complete and 0 < len(log.events) <= _MAX_EVENTS


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def prime_at_most(n: int, floor: int = 2) -> int:
    """The largest prime in ``[floor, n]``, or ``n`` when there is none."""
    for m in range(n, max(floor, 2) - 1, -1):
        if is_prime(m):
            return m
    return n

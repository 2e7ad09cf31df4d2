"""Search for the largest batch that fits, with a memory model instead of blind halving.

Where the runs logged their allocations (``Observation.log``), the model is their replay at another
batch through the allocator's arithmetic (``batch_replay.py``; a prime first probe makes one fit
enough): aim where the replay leaves 1% of the card, stop at 96% of what it allows. A replay that
says a failed batch fits is wrong: the line model below takes over.

The line model is ``need(b) = max(fixed, base + k*b)``: a fixed peak (often the optimizer step) that
dominates at small batches, and a line (weights, grads, then ``k`` bytes of activations per sample).
What each run tells us:

- a fit at ``b`` with peak ``p``: ``need(b) = p``, so the line at ``b`` is at most ``p``, and exactly
  ``p`` when ``p`` is above the smallest peak seen (the fixed part cannot explain a higher one);
- an OOM at ``b``: ``need(b) > capacity`` (and at least what was allocated plus what was requested).

From these, ``k`` is bracketed: at most ``(p - baseline) / b`` for any fit (the memory held before
the cell stays held), at least the slope from the largest fit to the smallest failure, and exactly
the slope between two fits that both sit on the line. The search keeps the bracket
``[largest fit, smallest failure]`` and never proposes outside it.

How it proposes. An OOM says only "more than the card" (allocated plus requested lands near the
capacity whatever the batch), so the first probe is a blind cut to 1/8 of the failing batch. From a
fit, the *safe* guess assumes the line starts at the baseline, which overstates ``k``; once two fits
sit on the line, the model's guess; in between (a slope that may be bent by the fixed peak, or a
guess that failed) a geometric blend of the two. It aims at ``capacity * (1 - margin)``, or at 96.5%
of the batch that fills the card when the margin alone would cost more than that.

The safeguard. Once a guess has failed, the next guess is at most the bracket's midpoint (and,
after a fit that followed one miss, at most three quarters of the way in); after two misses,
always the midpoint. So a failure at least halves the bracket: bisection is the floor, and the
search never creeps down one sample under a failure. Only fits give peaks: a failed run says
"more than the card", never how much. ``bisect_from_now`` (a real run failed where its rehearsal
fitted: the peaks understate the need) turns the line model off; the replay goes on where it
agrees with that failure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from jupyter_gpumem.backends.allocator import SizeLog
from jupyter_gpumem.fixes.batch.replay import (
    MIN_PRIME_BATCH,
    REPLAY_MARGIN,
    Replay,
    prime_at_most,
    replay_note,
)
from jupyter_gpumem.readings.allocator_state import read_allocator_state
from jupyter_gpumem.units import format_bytes

# Close enough: the accepted loss against the largest batch that fits.
_GOOD_ENOUGH = 0.95
# Peaks closer than this (fraction of capacity) count as equal: allocator rounding and cuDNN
# workspace choices move a peak by a few MiB.
_PEAK_TOLERANCE = 0.01
# A slope is trusted when the peaks it joins differ by this much (fraction of capacity).
_RELIABLE_RISE = 0.02

# The constants below were tuned on the simulated workloads of tests/test_batch_search.py,
# which prints how many runs the search takes.
# Until a batch fits, an OOM says only "more than the card": the first probe is a blind cut.
_BLIND_DIVISOR = 8.0
# When the head-room margin alone would cost more than 3.5% of the batch (a large fixed base),
# aim at this fraction of the batch that fills the card instead.
_AIM_FULL = 0.965
# A measured model that puts the best fit this close to the largest batch ends the search.
_STOP_FRACTION = 0.96
# Each proposal grows the best fit by at least this much: no creeping one sample at a time.
_MIN_STEP = 0.02
# After one guess failed and a fit followed, a guess goes at most this far into the bracket.
_AFTER_MISS = 0.75
# Where a guess falls between the safe one (0) and the model's (1), geometrically.
_ALPHA_LOWER_MIN = 0.2  # after the first fits on the line, when the slopes disagree
_AGREE_LOW, _AGREE_HIGH = 0.4, 0.5  # slope ratios where the lean moves from safe to the model
_ALPHA_BURNED = 0.5  # after the model's guess failed
_ALPHA_LOWER_BURNED = 0.6
_ALPHA_FIXED = 0.6  # only the fixed peak seen: between safe and the line to the failure,
_FIXED_CAP = 2.0  # but at most doubling the best fit (a failure far above says little)


@dataclass(frozen=True)
class Observation:
    """One run of the cell at ``batch``."""

    batch: int
    fit: bool
    # Measured peak allocated over the whole run (memory held before it included) of a run that
    # fitted; for an OOM, allocated at failure plus the request, a lower bound of the need.
    peak_bytes: int | None
    requested_bytes: int | None = None
    allocated_at_failure_bytes: int | None = None
    # What a run that fitted allocated and freed, in order (None where it could not be recorded).
    log: SizeLog | None = None


@dataclass(frozen=True)
class _Estimate:
    base: float
    k: float
    # "line": k measured between fits on the line; "lower": a lower bound of k (the fit below
    # may be on the fixed part); "upper": one fit, k from the baseline (an upper bound);
    # "fixed": only the fixed peak seen so far.
    kind: str


@dataclass
class BatchSearch:
    """Propose batch sizes until the largest one that fits is found (to within 95%)."""

    # What the process may use: min(total - other processes, allowed).
    capacity_bytes: int
    # Held before the cell started (weights, optimizer state): the line never starts below it.
    baseline_bytes: int = 0
    min_batch: int = 1
    max_batch: int | None = None
    # Head-room kept free, so that the next epoch's fragmentation does not tip it over.
    margin: float = 0.03
    observations: list[Observation] = field(default_factory=list)
    # Peaks no longer predict (a real run failed where its rehearsal fitted): bisect.
    bisecting: bool = False
    # The runs log their allocations: probe at primes until one fits (see batch_replay.py).
    replay_logs: bool = False
    # The allocator runs with ``expandable_segments:True`` (the replay models it so); None: the
    # settings in force, read at the first replay.
    expandable_segments: bool | None = None
    # the replay's last proposal: (batches it came from, largest it says fits, the proposal)
    _proposed: tuple[tuple[int, ...], int, int] | None = field(default=None, init=False, repr=False)
    # the last proposal came from the replay (which agreed with every failure)
    _steady_guess: bool = field(default=False, init=False, repr=False)

    def observe(self, obs: Observation) -> None:
        """Record a run."""
        if obs.batch < 1:
            raise ValueError(f"batch must be >= 1, got {obs.batch}")
        self.observations.append(obs)

    def bisect_from_now(self) -> None:
        """The measured peaks understate the need (a whole run failed where its rehearsal, two
        passes, fitted): from now on, halve the bracket, unless the replay (the steady state of
        the allocator's blocks, see ``replay.Cycle``) says the failed batch does not fit either,
        and so places the largest below it."""
        self.bisecting = True

    # -- bracket --------------------------------------------------------------------------

    def _smallest_fail(self) -> int | None:
        fails = [o.batch for o in self.observations if not o.fit]
        return min(fails) if fails else None

    def best(self) -> int | None:
        """The largest batch that fitted (and is below every batch that failed)."""
        # A fit above a failure means memory conditions changed between runs: trust the failure.
        hi = self._smallest_fail()
        fits = [o.batch for o in self.observations if o.fit and (hi is None or o.batch < hi)]
        return max(fits) if fits else None

    def _bracket(self) -> tuple[int, float]:
        lo = self.best()
        hi: float = math.inf
        fail = self._smallest_fail()
        if fail is not None:
            hi = fail
        if self.max_batch is not None:
            hi = min(hi, self.max_batch + 1)
        return (lo if lo is not None else self.min_batch - 1), hi

    def _trusted_fits(self) -> list[Observation]:
        """The fits with a known peak below every failure."""
        hi = self._smallest_fail()
        return [
            o
            for o in self.observations
            if o.fit and o.peak_bytes is not None and (hi is None or o.batch < hi)
        ]

    def _fit_peaks(self) -> list[tuple[int, int]]:
        """(batch, peak) of the trusted fits, by batch; one peak per batch."""
        peaks: dict[int, int] = {}
        for o in self._trusted_fits():
            peaks[o.batch] = max(o.peak_bytes or 0, peaks.get(o.batch, 0))
        return sorted(peaks.items())

    # -- model ----------------------------------------------------------------------------

    def _estimate(self) -> _Estimate | None:
        fits = self._fit_peaks()
        if not fits or self.capacity_bytes <= 0:  # no capacity known: bisect
            return None
        _, hi = self._bracket()
        b_top, p_top = fits[-1]
        k_upper, k_lower = self._k_bounds(fits, hi)
        tol = _PEAK_TOLERANCE * self.capacity_bytes
        p_min = min(p for _, p in fits)
        # A fit with a peak above the smallest one is on the line: the fixed part cannot be it.
        on_line = [(b, p) for b, p in fits if p > p_min + tol]
        if len(on_line) >= 2 and self._reliable(on_line[-1][1] - on_line[0][1], p_top):
            k = min(max(_slope(on_line), k_lower), k_upper)
            return _Estimate(p_top - k * b_top, k, kind="line")
        below = [(b, p) for b, p in fits if on_line and b < on_line[-1][0]]
        if below and self._reliable(on_line[-1][1] - below[-1][1], p_top):
            # The fit below may sit on the fixed part, so this slope is a lower bound of k.
            (b1, p1), (b2, p2) = below[-1], on_line[-1]
            k = min(max((p2 - p1) / (b2 - b1), k_lower), k_upper)
            return _Estimate(p2 - k * b2, k, kind="lower")
        if math.isinf(k_upper):
            return None
        # One point on the line, or only the fixed part seen: assume nothing but the baseline
        # below the line, which overstates k and so predicts a batch that fits.
        k = max(k_upper, k_lower)
        kind = "fixed" if len(fits) >= 2 and not on_line else "upper"
        return _Estimate(p_top - k * b_top, k, kind=kind)

    def _reliable(self, rise: float, p_top: float) -> bool:
        """Is a slope over a rise of ``rise`` bytes worth extrapolating from ``p_top``?"""
        # Measured peaks wobble by allocator rounding; a short rise extrapolated far amplifies it.
        return rise >= _RELIABLE_RISE * self.capacity_bytes or rise >= self.capacity_bytes - p_top

    def _k_bounds(self, fits: list[tuple[int, int]], hi: float) -> tuple[float, float]:
        """(upper, lower) bounds of bytes per sample that the runs so far allow."""
        b_top, p_top = fits[-1]
        k_upper = min(
            ((p - self.baseline_bytes) / b for b, p in fits if p > self.baseline_bytes),
            default=math.inf,
        )
        k_lower = 0.0
        if math.isfinite(hi) and p_top < self.capacity_bytes:
            k_lower = (self.capacity_bytes - p_top) / (hi - b_top)
        return k_upper, k_lower

    def model(self) -> tuple[float, float] | None:
        """(base_bytes, bytes_per_sample) currently estimated, None before a batch fits."""
        est = self._estimate()
        return None if est is None else (est.base, est.k)

    def replay(self) -> Replay | None:
        """The model from sizes, where the fits recorded their allocations (see batch_replay)."""
        fits = self._trusted_fits()
        if not any(o.log is not None for o in fits):
            return None
        return Replay.from_runs(
            [(o.batch, o.peak_bytes or 0, o.log) for o in fits], self._expandable()
        )

    def _expandable(self) -> bool:
        if self.expandable_segments is None:
            self.expandable_segments = expandable_segments_in_force()
        return self.expandable_segments

    def _from_replay(self, lo: int, hi: float) -> float | None:
        """The replay's guess; ``-1`` when it says the best fit is close enough; None when there
        is no replay to go by."""
        replay = self.replay() if self.capacity_bytes > 0 and lo >= self.min_batch else None
        top = int(hi) if math.isfinite(hi) else 64 * lo
        full = None if replay is None else replay.largest_below(self.capacity_bytes, lo, top)
        if replay is None or full is None:
            return None
        if lo >= _STOP_FRACTION * full:
            return -1
        aim = replay.largest(self.capacity_bytes * (1 - REPLAY_MARGIN), lo, top)
        # No batch above the best fit leaves the head-room (the allocator's blocks fill the card
        # in steps): the largest the replay allows, not creeping up by halves.
        guess = aim if aim > lo else full
        self._proposed = (replay.batches, full, guess)
        return guess

    def replay_note(self) -> str | None:
        """For people, once settled: how the replay placed the batch settled on, if it did."""
        p = self._proposed
        return None if p is None or p[2] != self.best() else replay_note(*p, self.capacity_bytes)

    # -- proposals ------------------------------------------------------------------------

    def _blind_probe(self, hi: float) -> float:
        """First guess while only failures are known."""
        fails = [o for o in self.observations if not o.fit]
        top = hi - 1 if math.isfinite(hi) else float(self.max_batch or self.min_batch)
        guess = max(top / _BLIND_DIVISOR, math.sqrt(top)) if fails else top
        # A failing request larger than a slice of the card is batch-sized: it caps the guess.
        for o in fails:
            if o.requested_bytes and o.requested_bytes > 0 and self.capacity_bytes > 0:
                room = self.capacity_bytes * (1 - self.margin) - self.baseline_bytes
                guess = min(guess, room * o.batch / o.requested_bytes)
        return guess

    def _overshot(self) -> bool:
        """Did a run fail after the last run that fitted (the last guess was too large)?"""
        last_fit = max((i for i, o in enumerate(self.observations) if o.fit), default=-1)
        return any(not o.fit for o in self.observations[last_fit + 1 :]) and last_fit >= 0

    def _guess(self, est: _Estimate, hi: float) -> float:
        target = self.capacity_bytes * (1 - self.margin)
        fits = self._fit_peaks()
        b_top, p_top = fits[-1]
        k_upper, k_lower = self._k_bounds(fits, hi)
        # A failure that proves a steeper slope than the baseline's bound (k_lower > k_upper: the
        # memory does not start at the baseline) overrides that bound, or the next guess lands
        # right under the failure and the search creeps down one sample at a time.
        k_safe = max(k_upper, k_lower)
        safe = b_top + (target - p_top) / k_safe if math.isfinite(k_safe) else math.inf
        model = (target - est.base) / est.k if est.k > 0 else math.inf
        if est.kind in ("line", "lower"):
            # When the margin alone would cost more than a few % (a large base), aim at the
            # batch that keeps the acceptance target instead.
            full = (self.capacity_bytes - est.base) / est.k if est.k > 0 else math.inf
            model = max(model, _AIM_FULL * full)
        if est.kind == "line":
            return model if not self._overshot() else _blend(safe, model, _ALPHA_BURNED)
        if est.kind == "lower":
            if self._overshot():
                return _blend(safe, model, _ALPHA_LOWER_BURNED)
            # The further the secant's slope sits below the baseline's bound, the likelier the
            # fit below it was on the fixed part (measured over random workloads): lean safe.
            agree = est.k / k_upper if math.isfinite(k_upper) else 1.0
            alpha = min(
                1.0, max(_ALPHA_LOWER_MIN, (agree - _AGREE_LOW) / (_AGREE_HIGH - _AGREE_LOW))
            )
            return _blend(safe, model, alpha)
        if est.kind == "fixed" and k_lower > 0:
            interp = b_top + (target - p_top) / k_lower
            return min(_blend(safe, interp, _ALPHA_FIXED), max(safe, _FIXED_CAP * b_top))
        if math.isfinite(k_safe):
            safe = max(safe, _AIM_FULL * (b_top + (self.capacity_bytes - p_top) / k_safe))
        return safe

    def next_batch(self) -> int | None:
        """The batch to try next; None when the search is done."""
        if not self.observations:
            return self.max_batch
        if any(not o.fit and o.batch <= self.min_batch for o in self.observations):
            return None
        lo, hi = self._bracket()
        if hi - lo <= 1 or (lo >= self.min_batch and lo >= _GOOD_ENOUGH * (hi - 1)):
            return None
        guess = self._proposal(lo, hi)
        if guess is None:
            return None
        if not (self.bisecting and self._steady_guess):
            guess = self._safeguarded(guess, lo, hi)
        elif lo >= self.min_batch:  # the steady state's largest, as the replay places it
            guess = max(guess, lo * (1 + _MIN_STEP))
        return self._as_batch(guess, lo, hi)

    def _proposal(self, lo: int, hi: float) -> float | None:
        """The model's guess (bisection once the peaks no longer predict); None: done."""
        replayed = None if lo < self.min_batch else self._from_replay(lo, hi)
        self._steady_guess = replayed is not None
        if replayed is not None:
            # After a whole run failed where its rehearsal fitted, a replay still counts only
            # where it says that batch does not fit (``_from_replay`` gives None otherwise): it
            # plays the pass until the allocator's blocks settle, which the rehearsal did not;
            # then its guess is the largest batch that fits in that steady state, not the
            # bisection's (a replay that misses again disagrees with that failure: no creeping)
            return None if replayed < 0 else replayed
        if self.bisecting:
            return (max(lo, 0) + hi) / 2 if math.isfinite(hi) else 2 * max(lo, 1)
        est = self._estimate()
        if est is None:
            return self._blind_probe(hi) if lo < self.min_batch else (lo + hi) / 2
        # The model ends the search only when two fits on its line agree and a failure lies
        # above (allocator rounding bends measured peaks; a slope from one fit and the fixed
        # part, "lower", has stopped searches at 21-67% of what fits: it never stops one).
        if est.kind == "line" and lo >= self.min_batch and est.k > 0 and math.isfinite(hi):
            full = (self.capacity_bytes - est.base) / est.k
            if lo >= _STOP_FRACTION * full:
                return None
        return self._guess(est, hi)

    def _safeguarded(self, guess: float, lo: int, hi: float) -> float:
        """The guess inside the bracket's safeguards."""
        if not math.isfinite(guess):
            guess = (lo + hi) / 2 if math.isfinite(hi) else 2 * max(lo, 1)
        misses = sum(not o.fit for o in self.observations[1:])
        if misses and math.isfinite(hi):
            # Safeguard: right after a guess that failed, and always once two have, a guess is at
            # most the bracket's midpoint, so such a failure at least halves the bracket
            # (bisection is the floor: the model only ever does better); in between, a failure
            # cuts it by a quarter at least. It never creeps down under a failure.
            last_failed = not self.observations[-1].fit
            share = 0.5 if last_failed or misses >= 2 else _AFTER_MISS
            guess = min(guess, max(lo, 0) + share * (hi - max(lo, 0)))
        if lo >= self.min_batch:
            # Steps of one sample near a soft limit would take forever: grow by a few % at least.
            guess = max(guess, lo * (1 + _MIN_STEP))
        return guess

    def _as_batch(self, guess: float, lo: int, hi: float) -> int | None:
        """The guess as a batch not tried yet; a prime while nothing has fitted (one logged fit at
        a prime is a model, see batch_replay)."""
        tried = {o.batch for o in self.observations}
        b = int(max(lo + 1, self.min_batch, min(math.floor(guess), hi - 1)))
        if self.replay_logs and lo < self.min_batch and not self.bisecting:
            b = self._prime_probe(b, lo, hi)
        while b in tried and b < hi - 1:
            b += 1
        return None if b in tried else b

    def _prime_probe(self, b: int, lo: int, hi: float) -> int:
        """Before the first fit: a prime at most ``b``; or, when a probe has already failed and
        the blind cut lands under the smallest prime one fit models from, that prime, where it
        lies in the lower half of the bracket (word_language_model: 19 failed, then 4, 5, 15,
        16 and 16; now 7, then the largest). A failure there still halves the bracket."""
        floor = max(lo + 1, self.min_batch, MIN_PRIME_BATCH)
        if b > MIN_PRIME_BATCH:
            return prime_at_most(b, floor=max(floor, b // 2))
        half = (max(lo, 0) + hi) / 2 if math.isfinite(hi) else 0.0
        failed_probes = any(not o.fit for o in self.observations[1:])
        if failed_probes and b < MIN_PRIME_BATCH <= half and lo < MIN_PRIME_BATCH:
            return MIN_PRIME_BATCH
        return b

    def explain(self) -> str:
        """One line for people: the model and what it predicts."""
        if not self.observations:
            return "no runs yet"
        est = self._estimate()
        nxt = self.next_batch()
        best = self.best()
        if est is None:
            if best is None and nxt is None and self.observations:
                return f"even batch {self.min_batch} does not fit in {format_bytes(self.capacity_bytes)}"
            return f"no batch has fitted yet; trying {nxt}" if nxt else "no batch has fitted yet"
        per_sample = format_bytes(round(est.k))
        line = f"model: {format_bytes(round(est.base))} + {per_sample} × batch"
        full = (self.capacity_bytes - est.base) / est.k if est.k > 0 else math.inf
        if math.isfinite(full):
            line += f" → predicts {max(0, math.floor(full))} fits"
        if nxt is None:
            return f"{line}; best found: {best}"
        return f"{line}; trying {nxt}"


def _blend(low: float, high: float, alpha: float) -> float:
    """Between two guesses, geometrically: 0 gives ``low``, 1 gives ``high``."""
    if not math.isfinite(high) or not math.isfinite(low) or low <= 0 or high <= low:
        return min(low, high)
    return math.exp(math.log(low) + alpha * (math.log(high) - math.log(low)))


def _slope(points: list[tuple[int, int]]) -> float:
    """Least-squares slope: measured peaks carry allocator rounding."""
    n = len(points)
    mb = sum(b for b, _ in points) / n
    mp = sum(p for _, p in points) / n
    var = sum((b - mb) ** 2 for b, _ in points)
    return sum((b - mb) * (p - mp) for b, p in points) / var if var else 0.0


def expandable_segments_in_force() -> bool:
    """Whether the caching allocator runs with ``expandable_segments:True``, as torch parsed
    its settings (the flag set at run time included); False where they cannot be read (the
    replay then models the defaults)."""
    try:
        conf = read_allocator_state(None).conf
    except Exception:
        return False
    return conf is not None and conf.native and conf.expandable_segments

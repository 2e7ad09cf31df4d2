"""What each cell cost on the GPU: ``%gpumem cells on``.

Before a cell: the allocator's counters on the current device, and ``allocated`` on each other
visible one; after it: the same again, the peak and the time. Two allocator readings per device
(~0.1 ms each on an H100), whatever the notebook holds. One quiet line after each cell
(``In [12]: +1.20 GiB, peak 9.84 GiB of 80 GiB, 3.2 s``; what it added on other GPUs after the
peak), ``%gpumem history`` for the table, and the diagnosis of an OOM names the cells over which
the card that ran out filled (``filled_by(device=...)``).

torch's peak counters are the notebook's and are never reset here (``backends.peaks``): a cell
that stays under an earlier cell's peak is shown as ``peak ≤`` that peak, the most it can have
reached; a cell that sets a new peak is shown exactly.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jupyter_gpumem import backends
from jupyter_gpumem.backends.peaks import PeakWatch
from jupyter_gpumem.units import format_bytes


@dataclass(frozen=True)
class CellRecord:
    count: int | None  # In [count]
    before_bytes: int
    after_bytes: int
    peak_bytes: int
    capacity_bytes: int | None
    seconds: float
    failed: bool
    device: int = 0  # the device the numbers above are: the current one when the cell started
    # False: an earlier peak hides this cell's; ``peak_bytes`` is then the most it can have been
    peak_exact: bool = True
    # (device, bytes the cell added there) for every other visible device
    others: tuple[tuple[int, int], ...] = ()

    @property
    def delta_bytes(self) -> int:
        return self.after_bytes - self.before_bytes

    def delta_on(self, device: int | None) -> int:
        """What the cell added on ``device`` (None: the record's own device)."""
        if device is None or device == self.device:
            return self.delta_bytes
        return dict(self.others).get(device, 0)

    def line(self) -> str:
        sign = "+" if self.delta_bytes >= 0 else "-"
        cap = f" of {format_bytes(self.capacity_bytes)}" if self.capacity_bytes else ""
        label = f"In [{self.count}]" if self.count is not None else "cell"
        elsewhere = "".join(
            f", GPU {d} {'+' if n >= 0 else '-'}{format_bytes(abs(n))}" for d, n in self.others if n
        )
        tail = ", out of memory" if self.failed else ""
        return (
            f"{label}: {sign}{format_bytes(abs(self.delta_bytes))}, peak {self.peak_text()}"
            f"{cap}{elsewhere}, {self.seconds:.1f} s{tail}"
        )

    def peak_text(self) -> str:
        return ("" if self.peak_exact else "≤ ") + format_bytes(self.peak_bytes)


def _reading(device: int | None = None) -> tuple[int, int] | None:
    stats = backends.active().allocator_stats(device)
    if not stats:
        return None
    return (
        int(stats.get("allocated_bytes.all.current", 0)),
        int(stats.get("allocated_bytes.all.peak", 0)),
    )


def _allocated_elsewhere(device: int) -> dict[int, int]:
    """``allocated`` on every visible device but ``device`` (one allocator reading each)."""
    from jupyter_gpumem.backends import active

    out = {}
    for index in active().visible_devices():
        r = _reading(index) if index != device else None
        if r is not None:
            out[index] = r[0]
    return out


def _changes(before: dict[int, int], after: dict[int, int]) -> tuple[tuple[int, int], ...]:
    return tuple((d, after[d] - before.get(d, 0)) for d in sorted(after))


class CellStats:
    """Per-cell GPU memory for one shell; started and stopped by ``%gpumem cells on|off``."""

    def __init__(self, shell: Any, *, say: Callable[[str], None] = print, keep: int = 1000):
        self.shell = shell
        self.say = say
        self.records: collections.deque[CellRecord] = collections.deque(maxlen=keep)
        self.active = False
        self.quiet = False
        self._t0 = 0.0
        self._before: int | None = None
        self._device = 0
        self._watch = PeakWatch()
        self._elsewhere: dict[int, int] = {}
        self._count: int | None = None

    def start(self, *, quiet: bool = False) -> None:
        self.quiet = quiet
        if self.active:
            return
        self.shell.events.register("pre_run_cell", self._pre)
        self.shell.events.register("post_run_cell", self._post)
        self.active = True

    def stop(self) -> None:
        if not self.active:
            return
        for event, cb in (("pre_run_cell", self._pre), ("post_run_cell", self._post)):
            try:
                self.shell.events.unregister(event, cb)
            except ValueError:
                pass
        self.active = False

    def _pre(self, info: Any) -> None:
        try:
            self._device = device = backends.active().current_device()
            self._watch = PeakWatch(device)
            r = _reading(device)
            self._before = None if r is None else r[0]
            if r is not None:
                self._watch.start()
                self._elsewhere = _allocated_elsewhere(device)
            self._count = getattr(self.shell, "execution_count", None)
            self._t0 = time.perf_counter()
        except Exception:
            self._before = None

    def _post(self, result: Any) -> None:
        before, self._before = self._before, None
        if before is None:
            return
        try:
            peaks = self._watch.stop()
            r = _reading(self._device)
            if r is None or peaks is None:
                return
            from jupyter_gpumem.rescue.rerun import capacity_bytes

            err = getattr(result, "error_in_exec", None)
            info = getattr(result, "info", None)
            count = getattr(result, "execution_count", None) or self._count
            raw = getattr(info, "raw_cell", "") or ""
            if raw.lstrip().startswith("%gpumem"):
                return  # the magic's own cell is not a cell of the notebook's work
            rec = CellRecord(
                count=count,
                before_bytes=before,
                after_bytes=r[0],
                peak_bytes=peaks.at_most_bytes,
                peak_exact=peaks.exact,
                capacity_bytes=capacity_bytes(),
                seconds=time.perf_counter() - self._t0,
                failed=err is not None and type(err).__name__.endswith("OutOfMemoryError"),
                device=self._device,
                others=_changes(self._elsewhere, _allocated_elsewhere(self._device)),
            )
            self.records.append(rec)
            if not self.quiet:
                self.say(rec.line())
        except Exception:
            pass  # a reading, never a reason to disturb the cell

    def table(self) -> str:
        if not self.records:
            return "No cells recorded yet: `%gpumem cells on` records from the next cell."
        rows = [("cell", "change", "after", "peak", "time")]
        for r in self.records:
            sign = "+" if r.delta_bytes >= 0 else "-"
            rows.append(
                (
                    f"In [{r.count}]" if r.count is not None else "?",
                    f"{sign}{format_bytes(abs(r.delta_bytes))}",
                    format_bytes(r.after_bytes),
                    r.peak_text() + (" OOM" if r.failed else ""),
                    f"{r.seconds:.1f} s",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        return "\n".join(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        )

    def filled_by(self, limit: int = 4, device: int | None = None) -> str:
        """One line for a diagnosis: the recent cells that added the most memory on ``device``
        (the one that ran out; None: each record's own, the current device when it ran)."""
        grew = sorted(
            (r for r in list(self.records)[-20:] if r.delta_on(device) > 0),
            key=lambda r: -r.delta_on(device),
        )[:limit]
        if not grew:
            return ""
        grew.sort(key=lambda r: r.count or 0)
        parts = [
            f"In [{r.count}] +{format_bytes(r.delta_on(device))}" if r.count is not None else "?"
            for r in grew
        ]
        return "The card filled over these cells: " + ", ".join(parts) + "."

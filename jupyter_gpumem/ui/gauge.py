"""The live memory gauge: a plotly FigureWidget with a gauge of used/total, split into PyTorch
allocated, reserved but unallocated, and other processes, over a short history.

A daemon thread samples (NVML + torch allocator, about 0.1 ms a sample) and touches only widget
traits, inside one ``batch_update`` per sample, and only when something changed; it never calls
``display``. No GPU, NVML errors and the simulated GPU are states the gauge shows, not crashes.

With several visible GPUs the dial shows one (the last OOM's, else the current one) and a line
under the title lists every GPU's use, the OOM's marked.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from jupyter_gpumem.readings.snapshot import MemorySnapshot, read_snapshot
from jupyter_gpumem.units import GiB, format_gib

COLORS = {
    "allocated": "#3b7dd8",  # PyTorch allocated
    "cache": "#9cc3f0",  # reserved but unallocated
    "other": "#d98b2b",  # other processes and CUDA contexts
    "free": "rgba(127,127,127,0.12)",
}
GRID_COLOR = "rgba(127,127,127,0.25)"
_gauges: weakref.WeakSet[Gauge] = weakref.WeakSet()


def stop_all() -> None:
    """Stop every gauge's thread (on unload)."""
    for g in list(_gauges):
        g.stop()


def mark_oom(device_index: int | None) -> None:
    """Every gauge marks this device as the one that ran out (None: no mark), from the next sample."""
    for g in list(_gauges):
        g.marked = device_index


def devices_line(s: MemorySnapshot, marked: int | None = None) -> str:
    """Every visible GPU's use on one line (empty with one GPU); ``marked`` flagged as the OOM's."""
    devices = s.all_devices
    if len(devices) < 2:
        return ""
    parts = []
    for d in devices:
        used = d.used_bytes if d.used_bytes is not None else d.reserved_bytes
        reading = (
            f"{format_gib(used)} / {format_gib(d.total_bytes)}"
            if used is not None and d.total_bytes
            else "no reading"
        )
        oom = " ◀ OOM" if marked is not None and d.device_index == marked else ""
        parts.append(f"GPU {d.device_index} {reading}{oom}")
    return " · ".join(parts)


def gib_ticks(top: float, count: int = 4) -> tuple[list[float], list[str]]:
    """Ticks from 0 to at least ``top`` GiB at a round step (1, 2, 2.5 or 5 × 10^k), labelled as
    the gauge's other numbers are (``format_gib``), with as many decimals as the step needs."""
    top = max(top, 1e-3)
    raw = top / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * 0.999)
    digits = max(0, -math.floor(math.log10(step) + 1e-9)) + (1 if step / power == 2.5 else 0)
    values = [round(i * step, 9) for i in range(math.ceil(top / step - 1e-9) + 1)]
    labels = ["0" if v == 0 else format_gib(round(v * GiB), digits=digits) for v in values]
    return values, labels


def read_numbers() -> MemorySnapshot:
    """The gauge's reading, once a second: numbers only, other processes not named (naming reads
    ``/proc`` for each; the dial shows their bytes)."""
    return read_snapshot(describe_processes=False)


def describe(s: MemorySnapshot) -> tuple[str, float, float, float, float, float]:
    """(title, used, allocated, cache, other, total) in GiB; zeros with a title saying why when
    there is no reading."""
    if not s.available:
        why = s.nvml_error or "torch has not used CUDA in this kernel yet"
        return f"no GPU reading ({why[:60]})", 0.0, 0.0, 0.0, 0.0, 1.0
    total = s.total_bytes or s.reserved_bytes or 1
    allocated = s.allocated_bytes or 0
    cache = s.reserved_unallocated_bytes or 0
    used = s.used_bytes if s.used_bytes is not None else allocated + cache
    other = max(used - allocated - cache, 0)
    return s.label, used / GiB, allocated / GiB, cache / GiB, other / GiB, total / GiB


def _dial(narrow: bool) -> go.Indicator:
    """The dial, empty: its bar transparent, since the coloured steps ``sample`` sets are the bar
    (allocated, cache, other), and a red line at the card's total."""
    return go.Indicator(
        mode="gauge+number",
        value=0,
        number={
            "suffix": " GiB",
            "valueformat": ".2f",
            "font": {"size": 22 if narrow else 28, "color": "#4a8fe0"},
        },
        title={"text": "GPU memory", "font": {"size": 12}},
        gauge={
            "axis": {"range": [0, 1], "tickmode": "array", "tickvals": [], "ticktext": []},
            "bar": {"color": "rgba(0,0,0,0)", "thickness": 0.0},
            "steps": [],
            "threshold": {"line": {"color": "#c0392b", "width": 3}, "value": 1},
        },
    )


def _history_axes(fig: go.Figure) -> None:
    """The history's axes: no x labels, y ticks set by ``sample``, nothing to zoom.

    plotly's default template draws white grid, zero and axis lines: invisible on a white page,
    harsh on a dark theme; these are grey at low alpha on both."""
    fig.update_xaxes(
        showticklabels=False, fixedrange=True, showgrid=False, zeroline=False,
        showline=False, row=2, col=1,
    )  # fmt: skip
    fig.update_yaxes(
        row=2,
        col=1,
        range=[0, 1],
        fixedrange=True,
        tickmode="array",
        tickvals=[],
        ticktext=[],
        gridcolor=GRID_COLOR,
        zeroline=False,
        showline=False,
    )


def _figure(width: int, height: int, narrow: bool) -> go.FigureWidget:
    """The empty gauge: a dial (the card's use, split by colour) above a stacked history of the
    last minutes; ``sample`` fills both in."""
    fig = make_subplots(
        rows=2,
        cols=1,
        specs=[[{"type": "indicator"}], [{"type": "xy"}]],
        row_heights=[0.62, 0.38],
        vertical_spacing=0.08,
    )
    fig.add_trace(_dial(narrow), row=1, col=1)
    for name, key in (("allocated", "allocated"), ("+ cache", "cache"), ("+ other", "other")):
        fig.add_trace(
            go.Scatter(
                x=[], y=[], name=name, mode="lines", stackgroup="mem",
                line={"width": 1, "color": COLORS[key]},
                hovertemplate="%{y:.2f} GiB<extra>" + name + "</extra>",
            ),
            row=2,
            col=1,
        )  # fmt: skip
    fig.update_layout(
        width=width,
        height=height,
        margin={"l": 30, "r": 55 if narrow else 30, "t": 90 if narrow else 65, "b": 20},
        showlegend=not narrow,
        legend={"orientation": "h", "y": -0.15, "font": {"size": 10}, "traceorder": "normal"},
        paper_bgcolor="rgba(0,0,0,0)",
        plot_bgcolor="rgba(0,0,0,0)",
        font={"size": 11, "color": "#8c8c8c"},  # readable on light and dark themes
    )
    _history_axes(fig)
    widget = go.FigureWidget(fig)
    widget._config = {**widget._config, "displayModeBar": False}  # no zoom/pan/share
    return widget


class Gauge:
    """``Gauge().widget`` is the FigureWidget; ``start()`` begins sampling."""

    def __init__(
        self,
        *,
        interval: float = 1.0,
        history_s: float = 120.0,
        width: int = 420,
        height: int = 330,
        read: Callable[[], MemorySnapshot] = read_numbers,
        narrow: bool = False,
    ) -> None:
        self.interval = interval
        self.read = read
        self.narrow = narrow
        self.samples: deque[tuple[float, float, float, float]] = deque(
            maxlen=max(int(history_s / interval), 2)
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: tuple[Any, ...] | None = None
        self.marked: int | None = None  # the device of the last OOM, marked in the devices line
        self._device_lines = 0
        self.updates = 0  # widget updates sent (for tests and the benchmark)
        self.errors = 0
        self.last_error: str | None = None
        self.widget = _figure(width, height, narrow)
        _gauges.add(self)
        self.sample()

    # ---- sampling -------------------------------------------------------------------------------

    def sample(self) -> None:
        """Read once and update the widget if anything changed. Never raises."""
        reading, devices = self._read()
        title, used, alloc, cache, other, total = reading
        now = time.monotonic()
        self.samples.append((now, alloc, cache, other))
        key = (
            title,
            devices,
            round(used, 3),
            round(alloc, 3),
            round(cache, 3),
            round(other, 3),
            total,
        )
        if key == self._last and len(self.samples) > 2:
            return  # nothing new to draw: no comm message
        self._last = key
        self._draw(now, reading, devices)
        self.updates += 1

    def _read(self) -> tuple[tuple[str, float, float, float, float, float], str]:
        """(``describe``'s numbers for the dial's device, the devices line). A failed read is a
        state the gauge shows, counted in ``errors``, never an exception on the sampling thread."""
        devices = ""
        try:
            snap = self.read()
            devices = devices_line(snap, self.marked)
            shown = snap.on_device(self.marked) if self.marked is not None else None
            return describe(shown or snap), devices
        except Exception as exc:
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            return (f"reading failed: {self.last_error[:60]}", 0.0, 0.0, 0.0, 0.0, 1.0), devices

    def _draw(
        self, now: float, reading: tuple[str, float, float, float, float, float], devices: str
    ) -> None:
        """One sample onto the widget, inside one ``batch_update`` (one comm message): the dial,
        its ticks at round numbers, the history rescaled to its peak."""
        title, used, alloc, cache, other, total = reading
        pct = f" · {100 * used / total:.0f}% of {total:.2f} GiB" if total > 1e-9 and used else ""
        steps = [
            {"range": [0, alloc], "color": COLORS["allocated"]},
            {"range": [alloc, alloc + cache], "color": COLORS["cache"]},
            {"range": [alloc + cache, alloc + cache + other], "color": COLORS["other"]},
        ]
        xs = [t - now for t, *_ in self.samples]
        ind = self.widget.data[0]
        with self.widget.batch_update():
            lines = devices.count(" · ") + 1 if devices else 0
            if lines != self._device_lines:  # room above the dial for the devices' lines
                self._device_lines = lines
                top = (90 if self.narrow else 65) + 13 * (lines if self.narrow else min(lines, 1))
                self.widget.layout.margin.t = top
            ind.value = used
            ind.title.text = self._title(title, pct, alloc, cache, other, devices)
            ind.gauge.axis.range = [0, total]
            dial = [
                (v, t)
                for v, t in zip(*gib_ticks(total, 4 if self.narrow else 6), strict=True)
                if v <= total * 1.0001
            ]
            ind.gauge.axis.tickvals = [v for v, _ in dial]
            ind.gauge.axis.ticktext = [t for _, t in dial]
            peak = max((sum(s[1:]) for s in self.samples), default=0.0)
            yvals, ytext = gib_ticks(peak * 1.05 or total / 4, 4)
            self.widget.layout.yaxis.range = [0, yvals[-1]]
            self.widget.layout.yaxis.tickvals, self.widget.layout.yaxis.ticktext = yvals, ytext
            ind.gauge.steps = steps
            ind.gauge.threshold.value = total
            for i, series in enumerate(zip(*[s[1:] for s in self.samples], strict=False)):
                self.widget.data[1 + i].x = xs
                self.widget.data[1 + i].y = list(series)

    def _title(
        self, title: str, pct: str, alloc: float, cache: float, other: float, devices: str = ""
    ) -> str:
        def gib(v: float) -> str:
            return format_gib(int(v * GiB))

        if self.narrow:  # ~240 px: one short fact per line, nothing clipped
            every = "".join(f"<br>{part}" for part in devices.split(" · ")) if devices else ""
            return (
                f"{title}<br>{pct.removeprefix(' · ')}<br><span style='font-size:10px'>"
                f"allocated {gib(alloc)}<br>cache {gib(cache)} · other {gib(other)}{every}</span>"
            )
        every = f"<br>{devices}" if devices else ""
        return (
            f"{title}{pct}<br><span style='font-size:10px'>allocated {gib(alloc)} · "
            f"cache {gib(cache)} · other {gib(other)}{every}</span>"
        )

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> Gauge:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._loop, name="jupyter_gpumem-gauge", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

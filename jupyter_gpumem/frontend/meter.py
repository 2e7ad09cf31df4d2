"""Samples for JupyterLab's status-bar meter (the ``jupyter-gpumem`` lab extension), sent by the kernel.

The kernel opens a comm (target ``jupyter_gpumem.frontend.meter``) and a daemon thread sends one small JSON
sample a second over it. Kernel-to-front-end messages go out on iopub, which a running cell does not
block (front-end-to-kernel messages wait for the cell), so the meter moves while a cell allocates.
A sample is sent when the reading changed, and at least every ``_HEARTBEAT_S`` so a page opened later
catches up (a sample reads the numbers only: other processes are not described, which costs a
``/proc`` read each): the lab extension reads samples from any comm message that carries ``"meter"``, comm
known to it or not. A sample lists every visible GPU and the device of the shell's last OOM, which
the meter shows when there are several.

Without ipykernel (a terminal IPython, a plain ``InteractiveShell``) ``start`` does nothing. A front
end that shows no meter closes the comm on arrival, and the thread stops: one without the lab
extension, Notebook 7 (no status bar), JupyterLab with the meter off in the Settings Editor. The
lab extension sends ``{"interval": seconds}`` (its "Refresh" setting): how often to read and send.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from jupyter_gpumem.readings.snapshot import MemorySnapshot, read_snapshot

TARGET = "jupyter_gpumem.frontend.meter"
MARKER = "jupyter_gpumem"  # the sample's "meter" field: what the front end looks for
INTERVAL_S = 1.0
_INTERVALS_S = (0.2, 60.0)  # what the front end may ask for (its settings schema's bounds)
_HEARTBEAT_S = 5.0

_lock = threading.Lock()
_meter: _Meter | None = None


def sample(snap: MemorySnapshot, oom_device: int | None = None) -> dict[str, Any]:
    """The JSON sample for one reading. ``used_bytes`` is the whole device's use (nvidia-smi's
    number) where the driver answers, else what this kernel's allocator reserved. ``devices`` lists
    every visible GPU (one GPU: just this one); ``oom_device`` is the device of the last OOM, if any,
    which the meter marks when it shows several."""
    return {
        "meter": MARKER,
        "device_index": snap.device_index,
        "device_name": snap.device_name,
        "note": snap.note,  # the backend's words after the device's name ("simulated")
        "used_bytes": _used(snap),
        "total_bytes": snap.total_bytes,
        "allocated_bytes": snap.allocated_bytes,
        "reserved_bytes": snap.reserved_bytes,
        "error": None if snap.available else (snap.nvml_error or "no GPU reading in this kernel"),
        "title": snap.label,
        "devices": [
            {
                "device_index": d.device_index,
                "used_bytes": _used(d),
                "total_bytes": d.total_bytes,
                "allocated_bytes": d.allocated_bytes,
                "reserved_bytes": d.reserved_bytes,
                "title": d.label,
                "note": d.note,
            }
            for d in snap.all_devices
        ],
        "oom_device": oom_device,
    }


def _used(snap: MemorySnapshot) -> int | None:
    return snap.used_bytes if snap.used_bytes is not None else snap.reserved_bytes


def oom_device(failed: Any) -> int | None:
    """The device a failed cell (a ``FailedCell``, or None) ran out on, as ``%gpumem status``
    marks it; else None."""
    if failed is None:
        return None
    if failed.report.device_index is not None:
        return failed.report.device_index
    return failed.snapshot.device_index if failed.snapshot is not None else None


class _Meter:
    def __init__(
        self, comm: Any, interval: float, last_failure: Callable[[], Any] | None = None
    ) -> None:
        self.comm = comm
        self.last_failure = last_failure
        self.interval = interval
        self.stopped = threading.Event()
        self.sent = 0  # samples sent (for tests)
        comm.on_close(lambda _msg: self.stopped.set())
        comm.on_msg(self._on_msg)
        self.thread = threading.Thread(target=self._loop, name="jupyter_gpumem-meter", daemon=True)

    def _on_msg(self, msg: dict[str, Any]) -> None:
        """The front end's refresh setting; anything else is ignored."""
        try:
            seconds = float(msg["content"]["data"]["interval"])
        except (KeyError, TypeError, ValueError):
            return
        if seconds == seconds:  # not NaN
            self.interval = min(max(seconds, _INTERVALS_S[0]), _INTERVALS_S[1])

    def _loop(self) -> None:
        last: dict[str, Any] | None = None
        quiet_s = 0.0
        while True:
            try:
                failed = self.last_failure() if self.last_failure is not None else None
                data = sample(read_snapshot(describe_processes=False), oom_device(failed))
            except Exception as exc:  # a reading must never kill the thread
                data = {"meter": MARKER, "error": f"reading failed: {type(exc).__name__}: {exc}"}
            if data != last or quiet_s >= _HEARTBEAT_S:
                if self.stopped.is_set():
                    return
                try:
                    self.comm.send(data)
                except Exception:
                    return  # kernel shutting down: nothing left to tell
                self.sent += 1
                last, quiet_s = data, 0.0
            if self.stopped.wait(self.interval):
                return
            quiet_s += self.interval

    @property
    def running(self) -> bool:
        return self.thread.is_alive() and not self.stopped.is_set()


def _open_comm() -> Any:
    from comm import create_comm

    return create_comm(target_name=TARGET, data={"meter": MARKER})


def start(
    shell: Any,
    interval: float = INTERVAL_S,
    last_failure: Callable[[], Any] | None = None,
) -> None:
    """Start sending samples from this kernel. Idempotent; never raises; a no-op outside
    ipykernel. ``last_failure`` returns the shell's last failed cell (its device is marked)."""
    global _meter
    try:
        if getattr(shell, "kernel", None) is None:
            return  # no front end to send to
        with _lock:
            if _meter is not None and _meter.running:
                return
            _meter = _Meter(_open_comm(), interval, last_failure)
            _meter.thread.start()
    except Exception as exc:
        print(f"jupyter_gpumem: the status-bar meter did not start ({type(exc).__name__}: {exc})")


def stop() -> None:
    """Stop the thread and close the comm. Idempotent; never raises."""
    global _meter
    with _lock:
        m, _meter = _meter, None
    if m is None:
        return
    m.stopped.set()
    if m.thread is not threading.current_thread() and m.thread.ident is not None:
        m.thread.join(timeout=5)
    try:
        m.comm.close()
    except Exception:
        pass  # kernel shutting down


def running() -> bool:
    return _meter is not None and _meter.running

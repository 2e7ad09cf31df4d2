"""One consistent reading of GPU memory: the torch allocator and NVML side by side, in bytes.

torch's words: *allocated* is memory in live tensors; *reserved* is what the caching allocator holds
(allocated plus its cache); NVML's *used* is what ``nvidia-smi`` shows for the whole device, every
process and every CUDA context included.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from jupyter_gpumem.backends import DeviceReading, MemoryBackend, active
from jupyter_gpumem.readings.kernels import kernel_id_in

_CONTEXT_SLACK_BYTES = 768 << 20  # a CUDA context plus cuBLAS/cuDNN handles is about 0.3-0.7 GiB
NOT_DESCRIBED = "another process"  # a reading taken without describing processes (the meter's)
KERNEL = "another notebook kernel"  # a kernel's name as read here; its notebook is asked on demand


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    used_bytes: int
    description: (
        str  # "another notebook kernel", "python train.py", "unknown (pid not visible here)"
    )
    is_self: bool = False


@dataclass(frozen=True)
class MemorySnapshot:
    device_index: int
    device_name: str | None
    total_bytes: int | None
    free_bytes: int | None  # free on the device, from the driver
    used_bytes: int | None  # used on the device by everyone (nvidia-smi's number)
    allocated_bytes: int | None
    reserved_bytes: int | None
    peak_allocated_bytes: int | None
    peak_reserved_bytes: int | None
    num_ooms: int | None
    allowed_bytes: int | None  # per-process cap, if one is set
    processes: tuple[ProcessInfo, ...] = ()
    uuid: str | None = None
    nvml_error: str | None = None
    taken_at: float = field(default_factory=time.time)
    title: str = ""  # the backend's name for the device ("NVIDIA H100 80GB HBM3 (GPU 0)")
    note: str | None = None  # what the backend says after a label: "simulated"; None on a real card
    # every visible device's reading, this one included, in index order (() when not read)
    devices: tuple[MemorySnapshot, ...] = ()

    @property
    def label(self) -> str:
        return self.title or self.device_name or f"GPU {self.device_index}"

    @property
    def all_devices(self) -> tuple[MemorySnapshot, ...]:
        return self.devices or (self,)

    def on_device(self, index: int | None) -> MemorySnapshot | None:
        """The reading of device ``index`` (None: this one), if it was read."""
        if index is None or index == self.device_index:
            return self
        return next((d for d in self.devices if d.device_index == index), None)

    @property
    def reserved_unallocated_bytes(self) -> int | None:
        """The allocator's cache: reserved by PyTorch but in no tensor (fragmentation lives here)."""
        if self.reserved_bytes is None or self.allocated_bytes is None:
            return None
        return max(self.reserved_bytes - self.allocated_bytes, 0)

    @property
    def other_processes(self) -> tuple[ProcessInfo, ...]:
        return tuple(p for p in self.processes if not p.is_self)

    @property
    def other_processes_bytes(self) -> int:
        return sum(p.used_bytes for p in self.other_processes)

    @property
    def available(self) -> bool:
        return self.total_bytes is not None or self.allocated_bytes is not None


def describe_process(pid: int) -> str:
    """What another process on the GPU is, from its command line when this container can see it
    (``/proc``). Never a request: which notebook a kernel serves is asked of the Jupyter servers
    on demand (``kernels.find_kernel``: the panel's "Shut down" offer, ``%gpumem shutdown``)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "pid not visible from here (another container or user)"
    args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    text = " ".join(args)
    if "ipykernel" in text:
        return KERNEL if kernel_id_in(args) is not None else "probably another notebook kernel"
    if not args:
        return "unknown process"
    short = " ".join(Path(args[0]).name if i == 0 else a for i, a in enumerate(args[:3]))
    return short[:60]


def _processes(
    raw: tuple[tuple[int, int], ...], reserved: int | None, describe: bool = True
) -> tuple[ProcessInfo, ...]:
    me = os.getpid()
    out = []
    has_self = any(pid == me for pid, _ in raw)
    for pid, used in raw:
        is_self = pid == me
        if not is_self and not has_self and reserved is not None and raw:
            # in containers NVML reports host pids, so our own pid is missing: the process whose
            # use matches our reserved memory plus a context is almost certainly this one
            is_self = (
                0 <= used - reserved <= _CONTEXT_SLACK_BYTES and not Path(f"/proc/{pid}").exists()
            )
            has_self = is_self
        desc = "this kernel" if is_self else describe_process(pid) if describe else NOT_DESCRIBED
        out.append(ProcessInfo(pid=pid, used_bytes=used, description=desc, is_self=is_self))
    return tuple(out)


def _snapshot(r: DeviceReading, describe: bool) -> MemorySnapshot:
    stats = r.stats
    allocated = reserved = peak_alloc = peak_res = ooms = None
    if stats is not None:
        allocated = stats.get("allocated_bytes.all.current", 0)
        reserved = stats.get("reserved_bytes.all.current", 0)
        peak_alloc = stats.get("allocated_bytes.all.peak", 0)
        peak_res = stats.get("reserved_bytes.all.peak", 0)
        ooms = stats.get("num_ooms", 0)
    described = tuple(
        ProcessInfo(p.pid, p.used_bytes, p.description, is_self=p.is_self)
        for p in r.processes
        if p.description is not None
    )
    raw = tuple((p.pid, p.used_bytes) for p in r.processes if p.description is None)
    return MemorySnapshot(
        device_index=r.index,
        device_name=r.name,
        total_bytes=r.total_bytes,
        free_bytes=r.free_bytes,
        used_bytes=r.used_bytes,
        allocated_bytes=allocated,
        reserved_bytes=reserved,
        peak_allocated_bytes=peak_alloc,
        peak_reserved_bytes=peak_res,
        num_ooms=ooms,
        allowed_bytes=r.allowed_bytes,
        processes=described + _processes(raw, reserved, describe),
        uuid=r.uuid,
        nvml_error=r.error,
        title=r.title,
        note=r.note,
    )


def read_snapshot(
    device_index: int | None = None,
    *,
    backend: MemoryBackend | None = None,
    describe_processes: bool = True,
) -> MemorySnapshot:
    """Read the allocator and the driver once: device ``device_index`` (None: the current one),
    with every visible device's reading in ``devices``. Never raises; unavailable numbers are
    None. Other processes are named from ``/proc`` (``describe_process``), never by asking a Jupyter
    server; ``describe_processes=False`` leaves them undescribed (``NOT_DESCRIBED``), for
    readings taken every second (the meter)."""
    backend = backend or active()
    index = backend.current_device() if device_index is None else device_index
    try:
        visible = backend.visible_devices()
    except Exception:
        visible = ()
    if len(visible) <= 1 or index not in visible:
        return _snapshot(backend.read(index), describe_processes)
    devices = tuple(_snapshot(backend.read(i), describe_processes) for i in visible)
    this = next(d for d in devices if d.device_index == index)
    return replace(this, devices=devices)

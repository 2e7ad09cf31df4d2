"""The CUDA backend: torch's allocator (``_torch``) and the driver through NVML (``_nvml``).

Reading never creates a CUDA context: ``torch.cuda.is_initialized()`` gates every torch call that
would, and NVML needs none. Devices are torch's (logical) indices: ``CUDA_VISIBLE_DEVICES`` and
``CUDA_DEVICE_ORDER`` decide which physical GPUs they are (``visible_devices.py``), and NVML is
asked about those only; where that cannot be told, NVML's numbers are left out and said why.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

from jupyter_gpumem.backends import _nvml
from jupyter_gpumem.backends.allocator import SizeLog
from jupyter_gpumem.backends.base import DeviceLabel, DeviceReading, RawProcess, StorageInfo
from jupyter_gpumem.backends.cuda_to_cpu import cuda_to_cpu
from jupyter_gpumem.backends.torch_objects import cuda_ready, move_objects, torch_module

__all__ = [
    "CudaBackend",
    "history_recording",
    "size_log_from_snapshot",
    "trace_since",
]

# torch's allocation history holds this many events for ``record_sizes`` (two passes of a
# transformer's training step are a few thousand); past it the ring buffer wraps and the log is
# marked incomplete.
_MAX_EVENTS = 200_000


def size_log_from_snapshot(
    snapshot: dict[str, Any],
    device: int,
    max_events: int,
    trace: list[dict[str, Any]] | None = None,
) -> SizeLog:
    """A :class:`SizeLog` from ``torch.cuda.memory._snapshot()``: resident blocks are those the
    trace never allocated. ``trace``: the device's entries since the run started, where the
    history was already recording before it (default: the whole trace, recording started empty)."""
    if trace is None:
        trace = _device_trace(snapshot, device)
    # a history recorded with skip_actions=["free_completed"] still has the requests
    freed = "free_completed"
    if not any(e.get("action") == freed for e in trace):
        freed = "free_requested"
    log, numbers = SizeLog(), {}
    for entry in trace:
        action, addr = entry.get("action"), entry.get("addr")
        if action == "alloc":
            numbers[addr] = log.alloc(int(entry.get("size", 0)))
        elif action == freed:
            n = numbers.pop(addr, None)
            log.events.append((-1, n) if n is not None else (-2, int(entry.get("size", 0))))
    allocated_here = set(numbers)
    for segment in snapshot.get("segments", []):
        if segment.get("device") != device:
            continue
        addr = segment.get("address", 0)
        for block in segment.get("blocks", []):
            if block.get("state") == "active_allocated" and addr not in allocated_here:
                log.resident.append(int(block.get("requested_size", block.get("size", 0))))
            addr += block.get("size", 0)
    # frees of resident blocks were appended as (-2, size): put them back among the resident
    log.resident.extend(size for n, size in log.events if n == -2)
    log.complete = len(trace) < max_events
    return log


def _device_trace(snapshot: dict[str, Any], device: int) -> list[dict[str, Any]]:
    traces = snapshot.get("device_traces") or []
    return list(traces[device]) if device < len(traces) else []


def _entry_key(entry: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(entry.get(k) for k in ("action", "addr", "size", "stream", "time_us"))


def trace_since(
    before: list[dict[str, Any]], after: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], bool]:
    """The entries of ``after`` recorded since ``before`` was read (the same ring buffer read
    twice), and whether none were lost: False when the buffer wrapped past ``before``'s last
    entries (a history with fewer ``max_entries`` than the run made events, or ``"state"`` only)."""
    if not before:
        return after, True
    mark = [_entry_key(e) for e in before[-2:]]
    keys = [_entry_key(e) for e in after]
    for end in range(len(keys), len(mark) - 1, -1):
        if keys[end - len(mark) : end] == mark:
            return after[end:], True
    return after, False


def history_recording(torch: Any) -> bool | None:
    """Whether torch's allocation history is being recorded (by the notebook, ``%gpumem trace``,
    cudagraph trees); None where this torch cannot tell (older than 2.1)."""
    probe = getattr(torch._C, "_cuda_isHistoryEnabled", None)
    if probe is None:
        return None
    try:
        return bool(probe())
    except Exception:
        return None


def _fill(log: SizeLog, read: SizeLog) -> None:
    log.resident, log.events = read.resident, read.events
    log.allocations, log.complete = read.allocations, read.complete


def _gpus(visible: tuple[int, ...]) -> str:
    if not visible:
        return "no GPU"
    return f"GPU {visible[0]}" if len(visible) == 1 else f"GPU {visible[0]} to {visible[-1]}"


class CudaBackend:
    """Real GPUs. Anything that cannot be read is None; nothing here raises on a reading."""

    note: str | None = None
    sizes_note: str | None = None  # why the last ``record_sizes`` gave no log, or an incomplete one
    _uuids: tuple[str, ...] | None = None

    def visible_devices(self) -> tuple[int, ...]:
        torch = torch_module()
        if torch is not None:
            try:
                if torch.cuda.is_available():
                    return tuple(range(int(torch.cuda.device_count())))
            except Exception:
                pass
        count = _nvml.visible_count()
        return () if count is None else tuple(range(count))

    def _torch_uuids(self) -> tuple[str, ...] | None:
        """The UUID of each of torch's devices, once torch has a context (reading them then
        creates none): they tell which NVML GPU each is whatever CUDA_DEVICE_ORDER says."""
        if self._uuids is None and cuda_ready():
            torch = torch_module()
            try:
                count = int(torch.cuda.device_count())
                self._uuids = tuple(
                    str(torch.cuda.get_device_properties(i).uuid) for i in range(count)
                )
            except Exception:
                return None
        return self._uuids

    def current_device(self) -> int:
        if cuda_ready():
            try:
                return int(torch_module().cuda.current_device())
            except Exception:
                return 0
        return 0

    def read(self, index: int | None = None) -> DeviceReading:
        index = self.current_device() if index is None else index
        stats = self.allocator_stats(index)
        dev = _nvml.read_device(index, self._torch_uuids())
        total = free = used = None
        name = uuid = None
        procs: tuple[RawProcess, ...] = ()
        if dev is not None:
            total, free, used, name, uuid = (
                dev.total_bytes, dev.free_bytes, dev.used_bytes, dev.name, dev.uuid,
            )  # fmt: skip
            procs = tuple(RawProcess(pid, n) for pid, n in dev.processes)
        else:
            # without NVML only torch can tell, and cudaMemGetInfo on another device would create
            # a context there (hundreds of MiB): the current device only
            info = self.mem_get_info(index) if index == self.current_device() else None
            if info is not None:
                free, total = info
                used = total - free
            name = self._device_name(index)
        return DeviceReading(
            index=index,
            name=name,
            title=f"{name or 'GPU'} (GPU {index})",
            total_bytes=total,
            free_bytes=free,
            used_bytes=used,
            stats=stats,
            allowed_bytes=self.process_cap(index),
            processes=procs,
            uuid=uuid,
            error=_nvml.error() if dev is None else None,
        )

    def allocator_stats(self, index: int | None = None) -> dict[str, int] | None:
        """torch.cuda.memory_stats() of the device, or None when there is nothing to read."""
        if not cuda_ready():
            return None
        try:
            stats = torch_module().cuda.memory_stats(index)
        except Exception:
            return None
        return dict(stats) if stats else None

    def mem_get_info(self, index: int | None = None) -> tuple[int, int] | None:
        """(free, total) from the driver, only where a context already exists."""
        if not cuda_ready():
            return None
        try:
            free, total = torch_module().cuda.mem_get_info(index)
        except Exception:
            return None
        return int(free), int(total)

    def _device_name(self, index: int | None = None) -> str | None:
        if not cuda_ready():
            return None
        try:
            return str(torch_module().cuda.get_device_name(index))
        except Exception:
            return None

    def process_cap(self, index: int | None = None) -> int | None:
        """The per-process cap set with set_per_process_memory_fraction, if torch can tell."""
        if not cuda_ready():
            return None
        torch = torch_module()
        getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if getter is None:
            return None
        try:
            fraction = float(getter(index))
            if fraction >= 1.0:
                return None
            _free, total = torch.cuda.mem_get_info(index)
            return int(total * fraction)
        except Exception:
            return None

    def set_limit(self, limit_bytes: int | None, index: int | None = None) -> int:
        """Cap device ``index``, or every visible device when it is None (as the simulated GPU
        does: ``%gpumem limit 1GiB`` rehearses a smaller card on each GPU the notebook may use).
        torch's fraction is per device and set through the driver, so each device capped gets a
        CUDA context. Returns the total bytes of ``index`` (None: the current device)."""
        torch = torch_module()
        if torch is None or not torch.cuda.is_available():
            raise RuntimeError(
                "no CUDA GPU here: use `%gpumem simulate SIZE` to rehearse a small card"
            )
        visible = self.visible_devices()
        if index is not None and index not in visible:
            raise RuntimeError(f"no GPU {index} here: this process sees {_gpus(visible)}")
        totals = {}
        for i in visible if index is None else (index,):
            _free, total = torch.cuda.mem_get_info(i)
            fraction = 1.0 if limit_bytes is None else min(limit_bytes / total, 1.0)
            torch.cuda.set_per_process_memory_fraction(fraction, i)
            totals[i] = int(total)
        return totals.get(self.current_device() if index is None else index, totals[min(totals)])

    def storage_of(self, tensor: Any) -> StorageInfo | None:
        try:
            dev = tensor.device
            if dev.type in ("cpu", "meta"):
                return None
            storage = tensor.untyped_storage()
            device = DeviceLabel(str(dev), dev.index if dev.type == "cuda" else None)
            return (device, storage.data_ptr()), int(storage.nbytes()), device
        except Exception:
            # sparse, nested and subclass tensors may have no plain storage: skip them, never fail
            return None

    def empty_cache(self) -> None:
        """Give cached blocks (and cuBLAS workspaces) back to the driver; a no-op without a context."""
        if not cuda_ready():
            return
        torch = torch_module()
        for call in (
            torch.cuda.synchronize,
            getattr(torch._C, "_cuda_clearCublasWorkspaces", None),
            torch.cuda.empty_cache,
        ):
            if callable(call):
                try:
                    call()
                except Exception:
                    pass

    def reset_peak(self, index: int | None = None) -> None:
        if cuda_ready():
            try:
                torch_module().cuda.reset_peak_memory_stats(index)
            except Exception:
                pass

    def move_to_cpu(self, obj: Any) -> tuple[Any, int]:
        return move_objects(obj, self.storage_of, lambda t: t.to("cpu"))

    def host_only(self) -> AbstractContextManager[Any]:
        return contextlib.nullcontext()  # CPU tensors never count on a real card

    def placements_to_cpu(self) -> AbstractContextManager[Any]:
        return cuda_to_cpu()

    def on_this_thread(self) -> AbstractContextManager[Any]:
        return contextlib.nullcontext()  # a real card is the same from every thread

    def autocast_device_type(self) -> str:
        return "cuda"

    @contextlib.contextmanager
    def record_sizes(self, index: int | None = None) -> Iterator[SizeLog | None]:
        """torch's own allocation history of device ``index`` (None: the current one), without
        stacks (a few µs an event), read when the block ends. torch records every device at once;
        the log is that device's trace and segments. Where a history is already being recorded (the notebook's own, to debug this OOM, or
        ``%gpumem trace``'s) it is read, never changed, cleared or stopped: the block's entries
        are those after the ones it found. None where torch cannot say whether one is recorded;
        ``sizes_note`` says why."""
        torch = torch_module()
        self.sizes_note = None
        if torch is None or not cuda_ready():
            yield None
            return
        recording = history_recording(torch)
        if recording is None:
            self.sizes_note = (
                "this torch cannot say whether a memory history is being recorded, and starting "
                "one would clear it: no replay (torch 2.1 or later has one)"
            )
            yield None
            return
        device = self.current_device() if index is None else index
        if recording:
            with self._read_history(torch, device) as log:
                yield log
            return
        memory = torch.cuda.memory
        try:
            memory._record_memory_history(
                "all", context=None, stacks="python", max_entries=_MAX_EVENTS, clear_history=True
            )
        except Exception as exc:  # no model from sizes: the line model runs instead
            self.sizes_note = f"torch's memory history could not start: {exc}"
            yield None
            return
        log = SizeLog(complete=False)
        try:
            yield log
        finally:
            try:
                read = size_log_from_snapshot(memory._snapshot(), device, _MAX_EVENTS)
                _fill(log, read)
            except Exception:
                pass
            finally:
                with contextlib.suppress(Exception):
                    memory._record_memory_history(None)

    @contextlib.contextmanager
    def _read_history(self, torch: Any, device: int) -> Iterator[SizeLog | None]:
        """A log of ``device`` from a history someone else records: two snapshots, the entries
        between them."""
        memory = torch.cuda.memory
        try:
            before = _device_trace(memory._snapshot(), device)
        except Exception as exc:
            self.sizes_note = f"the memory history being recorded could not be read: {exc}"
            yield None
            return
        log = SizeLog(complete=False)
        try:
            yield log
        finally:
            try:
                snapshot = memory._snapshot()
                entries, whole = trace_since(before, _device_trace(snapshot, device))
                read = size_log_from_snapshot(snapshot, device, _MAX_EVENTS, entries)
                _fill(log, read)
                log.complete = read.complete and whole
                if not whole:
                    self.sizes_note = (
                        "the memory history being recorded kept fewer events than the run made "
                        "(its max_entries, or context 'state'): no replay"
                    )
            except Exception:
                pass

    def supports_bf16(self, index: int | None = None) -> bool:
        """bfloat16 in hardware on device ``index``: compute capability 8.0 or later (Ampere on),
        or a ROCm device. ``torch.cuda.is_bf16_supported()`` also says True where it is emulated
        (a T4 or V100 runs it several times slower than float16), and asks the current device."""
        torch = torch_module()
        if torch is None or not cuda_ready():
            return False
        try:
            if getattr(torch.version, "hip", None):
                return True
            device = self.current_device() if index is None else index
            return int(torch.cuda.get_device_properties(device).major) >= 8
        except Exception:
            pass
        try:  # no properties: the current device, asked without emulation where torch takes it
            if index is not None and index != self.current_device():
                return False
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except Exception:
            return False

    def user_traceback(self, tb: TracebackType | None) -> TracebackType | None:
        return tb  # a real OOM is raised in C++, under the user's last frame

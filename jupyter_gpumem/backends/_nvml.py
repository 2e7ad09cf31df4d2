"""The only module that imports pynvml (from nvidia-ml-py). NVML starts lazily, once.

Anything NVML cannot tell (library missing, no driver, not supported, no permission, GPU lost) is
None; nothing here raises.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

_lock = threading.Lock()
_state: dict[str, Any] = {"tried": False, "nvml": None, "error": None}


@dataclass(frozen=True)
class NvmlDevice:
    index: int  # physical NVML index (what nvidia-smi shows)
    uuid: str | None
    name: str | None
    total_bytes: int
    used_bytes: int  # by every process on the device, as nvidia-smi shows it
    free_bytes: int
    processes: tuple[tuple[int, int], ...]  # (pid, used bytes); pids are host pids in containers


def _nvml() -> Any | None:
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            try:
                import pynvml

                pynvml.nvmlInit()
                _state["nvml"] = pynvml
            except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
                _state["error"] = f"{type(exc).__name__}: {exc}"
        return _state["nvml"]


def error() -> str | None:
    """Why NVML gives no readings, once it has been tried."""
    return _state["error"]


def _as_str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def physical_index(logical: int, visible: str | None = None) -> int | str:
    """Map torch's device index through CUDA_VISIBLE_DEVICES to NVML's index (or a UUID prefix)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if not visible:
        return logical
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if logical >= len(entries):
        return logical
    entry = entries[logical]
    return int(entry) if entry.isdigit() else entry  # "GPU-8a3f..." or "MIG-..."


def _handle(nvml: Any, logical: int) -> Any:
    target = physical_index(logical)
    if isinstance(target, int):
        return nvml.nvmlDeviceGetHandleByIndex(target)
    count = nvml.nvmlDeviceGetCount()
    for i in range(count):  # CUDA accepts unique UUID prefixes
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        if _as_str(nvml.nvmlDeviceGetUUID(h)).startswith(target):
            return h
    return nvml.nvmlDeviceGetHandleByUUID(target)


def read_device(logical_index: int = 0) -> NvmlDevice | None:
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        handle = _handle(nvml, logical_index)
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        index = int(nvml.nvmlDeviceGetIndex(handle))
    except Exception as exc:
        _state["error"] = f"{type(exc).__name__}: {exc}"
        return None
    uuid = name = None
    try:
        uuid = _as_str(nvml.nvmlDeviceGetUUID(handle))
        name = _as_str(nvml.nvmlDeviceGetName(handle))
    except Exception:
        pass
    procs: dict[int, int] = {}
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            for p in getattr(nvml, getter)(handle):
                used = p.usedGpuMemory
                if isinstance(used, int) and used >= 0:  # None / NVML_VALUE_NOT_AVAILABLE otherwise
                    procs[int(p.pid)] = max(procs.get(int(p.pid), 0), int(used))
        except Exception:
            continue
    return NvmlDevice(
        index=index,
        uuid=uuid,
        name=name,
        total_bytes=int(mem.total),
        used_bytes=int(mem.used),
        free_bytes=int(mem.free),
        processes=tuple(sorted(procs.items(), key=lambda kv: -kv[1])),
    )


def device_count() -> int | None:
    """How many GPUs NVML sees on the machine (before CUDA_VISIBLE_DEVICES), or None."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        return int(nvml.nvmlDeviceGetCount())
    except Exception as exc:
        _state["error"] = f"{type(exc).__name__}: {exc}"
        return None

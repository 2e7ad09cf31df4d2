"""The only module that imports pynvml (from nvidia-ml-py). NVML starts lazily, once.

Anything NVML cannot tell (library missing, no driver, not supported, no permission, GPU lost) is
None; nothing here raises.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from jupyter_gpumem.backends.visible_devices import Gpu, Mapping, Target, map_devices

_lock = threading.Lock()
_state: dict[str, Any] = {"tried": False, "nvml": None, "error": None}


@dataclass(frozen=True)
class NvmlDevice:
    index: int  # physical NVML index (what nvidia-smi shows); a MIG device's GPU's
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


def _gpus(nvml: Any) -> list[Gpu]:
    """Every GPU NVML sees, with its MIG devices; read once (they do not change under a kernel)."""
    cached = _state.get("gpus")
    if cached is not None:
        return cast("list[Gpu]", cached)
    gpus = []
    for i in range(int(nvml.nvmlDeviceGetCount())):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        name = None
        with contextlib.suppress(Exception):
            name = _as_str(nvml.nvmlDeviceGetName(h))
        mig_enabled, migs = _migs(nvml, h)
        uuid = _as_str(nvml.nvmlDeviceGetUUID(h))
        gpus.append(Gpu(i, uuid, name, mig_enabled, migs))
    _state["gpus"] = gpus
    return gpus


def _migs(nvml: Any, handle: Any) -> tuple[bool, tuple[str, ...]]:
    """Whether the GPU is in MIG mode, and its MIG devices' UUIDs."""
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except Exception:  # not supported (pre-Ampere), or an older pynvml
        return False, ()
    if current != getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1):
        return False, ()
    uuids = []
    try:
        count = int(nvml.nvmlDeviceGetMaxMigDeviceCount(handle))
    except Exception:
        return True, ()
    for j in range(count):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)
            uuids.append(_as_str(nvml.nvmlDeviceGetUUID(mig)))
        except Exception:
            continue  # an empty slot
    return True, tuple(uuids)


def mapping(torch_uuids: Sequence[str] | None = None) -> Mapping | None:
    """torch's devices mapped to NVML's (``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER``
    applied), or None without NVML."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        gpus = _gpus(nvml)
    except Exception as exc:
        _state["error"] = f"{type(exc).__name__}: {exc}"
        return None
    env = os.environ
    return map_devices(
        env.get("CUDA_VISIBLE_DEVICES"), env.get("CUDA_DEVICE_ORDER"), gpus, torch_uuids
    )


def _handle(nvml: Any, target: Target) -> tuple[Any, int]:
    """NVML's handle of a GPU or MIG device, and the physical GPU's index."""
    if isinstance(target, int):
        return nvml.nvmlDeviceGetHandleByIndex(target), target
    handle = nvml.nvmlDeviceGetHandleByUUID(target)
    parent = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
    return handle, int(nvml.nvmlDeviceGetIndex(parent))


def read_device(
    logical_index: int = 0, torch_uuids: Sequence[str] | None = None
) -> NvmlDevice | None:
    """torch's device ``logical_index`` as NVML reads it; None where NVML cannot tell, or cannot
    tell which GPU it is (then :func:`error` says why)."""
    nvml = _nvml()
    found = mapping(torch_uuids)
    if nvml is None or found is None:
        return None
    if found.uncertain is not None:
        _state["error"] = found.uncertain
        return None
    if logical_index >= len(found.targets):
        _state["error"] = f"CUDA_VISIBLE_DEVICES shows no GPU {logical_index} to this process"
        return None
    try:
        handle, index = _handle(nvml, found.targets[logical_index])
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
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


def visible_count(torch_uuids: Sequence[str] | None = None) -> int | None:
    """How many devices CUDA shows this process (``CUDA_VISIBLE_DEVICES`` applied), or None."""
    found = mapping(torch_uuids)
    return None if found is None else len(found.targets)


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

"""The only module that touches torch's CUDA API (and the simulated GPU, which stands in for it).

torch is never imported to find out whether it is in use: if the user has not imported it, nothing
here runs. Reading never creates a CUDA context: ``torch.cuda.is_initialized()`` gates every call
that would.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any

from . import simulated

if TYPE_CHECKING:
    import torch


def torch_module() -> Any:
    """torch if the user has imported it, else None."""
    return sys.modules.get("torch")


def cuda_ready() -> bool:
    """A CUDA context exists in this process (so reading it costs no new context)."""
    torch = torch_module()
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_initialized())
    except Exception:
        return False


def current_device_index() -> int:
    sim = simulated.current()
    if sim is not None:
        return sim.device_index
    if cuda_ready():
        try:
            return int(torch_module().cuda.current_device())
        except Exception:
            return 0
    return 0


def allocator_stats(device_index: int | None = None) -> dict[str, int] | None:
    """torch.cuda.memory_stats() of the device, or None when there is nothing to read."""
    sim = simulated.current()
    if sim is not None:
        return sim.memory_stats()
    if not cuda_ready():
        return None
    try:
        stats = torch_module().cuda.memory_stats(device_index)
    except Exception:
        return None
    return dict(stats) if stats else None


def mem_get_info(device_index: int | None = None) -> tuple[int, int] | None:
    """(free, total) from the driver, only where a context already exists."""
    sim = simulated.current()
    if sim is not None:
        return sim.mem_get_info()
    if not cuda_ready():
        return None
    try:
        free, total = torch_module().cuda.mem_get_info(device_index)
    except Exception:
        return None
    return int(free), int(total)


def device_name(device_index: int | None = None) -> str | None:
    sim = simulated.current()
    if sim is not None:
        return sim.name
    if not cuda_ready():
        return None
    try:
        return str(torch_module().cuda.get_device_name(device_index))
    except Exception:
        return None


def allowed_bytes(device_index: int | None = None) -> int | None:
    """The per-process cap set with set_per_process_memory_fraction, if torch can tell."""
    sim = simulated.current()
    if sim is not None:
        return sim.allowed_bytes
    if not cuda_ready():
        return None
    torch = torch_module()
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if getter is None:
        return None
    try:
        fraction = float(getter(device_index))
        if fraction >= 1.0:
            return None
        _free, total = torch.cuda.mem_get_info(device_index)
        return int(total * fraction)
    except Exception:
        return None


def set_memory_limit(limit_bytes: int | None, device_index: int | None = None) -> int:
    """Cap what this process may reserve (None lifts the cap); returns the card's total bytes."""
    sim = simulated.current()
    if sim is not None:
        simulated.set_limit(limit_bytes)
        return sim.total_bytes
    torch = torch_module()
    if torch is None or not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU here: use `%gpumem simulate SIZE` to rehearse a small card")
    _free, total = torch.cuda.mem_get_info(device_index)
    fraction = 1.0 if limit_bytes is None else min(limit_bytes / total, 1.0)
    torch.cuda.set_per_process_memory_fraction(fraction, device_index)
    return int(total)


def empty_cache() -> None:
    """Give cached blocks (and cuBLAS workspaces) back to the driver; a no-op without a context."""
    if simulated.current() is not None or not cuda_ready():
        return
    torch = torch_module()
    try:
        torch.cuda.synchronize()
    except Exception:
        pass
    clear_ws = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if callable(clear_ws):
        try:
            clear_ws()
        except Exception:
            pass
    try:
        torch.cuda.empty_cache()
    except Exception:
        pass


def reset_peak(device_index: int | None = None) -> None:
    sim = simulated.current()
    if sim is not None:
        sim.reset_peak()
    elif cuda_ready():
        try:
            torch_module().cuda.reset_peak_memory_stats(device_index)
        except Exception:
            pass


def allocated_bytes() -> int | None:
    stats = allocator_stats()
    return None if stats is None else stats.get("allocated_bytes.all.current", 0)


def supports_bf16() -> bool:
    torch = torch_module()
    if torch is None:
        return False
    if simulated.current() is not None:
        return True
    try:
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    except Exception:
        return False


def autocast_device_type() -> str:
    """Where autocast must act: 'cuda' on a GPU, 'cpu' when the simulated GPU keeps tensors on the CPU."""
    return "cpu" if simulated.current() is not None else "cuda"


# ---- what a Python object holds on the GPU ------------------------------------------------------


def is_tensor(obj: object) -> bool:
    torch = torch_module()
    return torch is not None and isinstance(obj, torch.Tensor)


def is_module(obj: object) -> bool:
    torch = torch_module()
    return torch is not None and isinstance(obj, torch.nn.Module)


def is_optimizer(obj: object) -> bool:
    torch = torch_module()
    return torch is not None and isinstance(obj, torch.optim.Optimizer)


def no_torch_function() -> Any:
    """A context where tensor methods skip torch function modes (the simulated GPU's redirect):
    reading 100k tensors' storages must not go through Python for each call."""
    torch = torch_module()
    disable = getattr(getattr(torch, "_C", None), "DisableTorchFunction", None)
    return disable() if disable is not None else contextlib.nullcontext()


def gpu_storage(tensor: torch.Tensor) -> tuple[tuple[str, int], int, str] | None:
    """(key, nbytes, device) of the storage behind a GPU tensor; None for anything not on a GPU.

    The key identifies the storage, so tensors sharing one (views, tied weights) count once.
    Called for every tensor in the namespace: kept lean.
    """
    try:
        sim = simulated.current()
        if sim is not None:
            counted = sim.counted_storage(tensor)
            if counted is None:
                return None
            device = f"cuda:{sim.device_index} (simulated)"
            return (device, counted[0]), counted[1], device
        dev = tensor.device
        if dev.type in ("cpu", "meta"):
            return None
        storage = tensor.untyped_storage()
        device = str(dev)
        return (device, storage.data_ptr()), int(storage.nbytes()), device
    except Exception:
        # sparse, nested and subclass tensors may have no plain storage: skip them, never fail
        return None


def autocast_factory() -> tuple[Any, str]:
    """A factory of ``torch.autocast`` contexts for the re-run, and the dtype's name.

    bf16 where the device supports it (no GradScaler needed), else fp16.
    """
    torch = torch_module()
    if torch is None:
        raise RuntimeError("torch is not imported")
    device_type = autocast_device_type()
    dtype = torch.bfloat16 if supports_bf16() else torch.float16

    def factory() -> Any:
        return torch.autocast(device_type=device_type, dtype=dtype)

    return factory, "bfloat16" if dtype is torch.bfloat16 else "float16"


def move_to_cpu(obj: Any) -> tuple[Any, int]:
    """Move a GPU tensor, model or optimizer's state to the CPU; returns (object, bytes moved).

    Models and optimizers move in place (the same object); a tensor comes back as a new one.
    """
    moved = 0
    sim = simulated.current()

    def _move(t: Any) -> Any:
        nonlocal moved
        info = gpu_storage(t)
        if info is None:
            return t
        moved += info[1]
        if sim is not None:
            return sim.untrack(t)  # already on the CPU: it just stops counting
        return t.to("cpu")

    if is_tensor(obj):
        return _move(obj), moved
    if is_module(obj):
        for p in obj.parameters():
            p.data = _move(p.data)
            if p.grad is not None:
                p.grad = _move(p.grad)
        for mod in obj.modules():
            for name, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[name] = _move(b)
        return obj, moved
    if is_optimizer(obj):
        for state in obj.state.values():
            for k, v in list(state.items()):
                if is_tensor(v):
                    state[k] = _move(v)
        return obj, moved
    return obj, 0

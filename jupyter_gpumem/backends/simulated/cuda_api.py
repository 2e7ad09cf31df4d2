"""``torch.cuda`` and ``torch.accelerator`` while a simulation runs: their functions answer for
the simulated cards (``torch.accelerator``: as on a CUDA machine, the current accelerator is
``cuda``, which is how pytorch/examples and torch.optim choose their device).

Patched on the modules by :func:`patch` and put back by :func:`unpatch`: code that ran ``from
torch.cuda import memory_allocated`` earlier keeps the real one. A function someone else patched
over ours is left alone, and ours, left behind, behaves as torch's own once the simulation ends.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jupyter_gpumem.backends.simulated.card import SimulatedCard, format_size
from jupyter_gpumem.units import MiB

if TYPE_CHECKING:
    from jupyter_gpumem.backends.simulated.gpu import SimulatedGPU

__all__ = ["patch", "unpatch"]


@dataclass(frozen=True)
class _DeviceProperties:
    """``torch.cuda.get_device_properties()``: the fields torch's ``_CudaDeviceProperties`` has
    that code reads (a plain size: an A100-like card, compute capability 8.0)."""

    name: str
    total_memory: int
    major: int = 8
    minor: int = 0
    multi_processor_count: int = 108
    is_integrated: bool = False
    is_multi_gpu_board: bool = False
    max_threads_per_multi_processor: int = 2048
    warp_size: int = 32
    L2_cache_size: int = 40 * MiB
    regs_per_multiprocessor: int = 65536

    def __repr__(self) -> str:  # torch's own layout
        return (
            f"_CudaDeviceProperties(name='{self.name}', major={self.major}, minor={self.minor}, "
            f"total_memory={self.total_memory // MiB}MB, "
            f"multi_processor_count={self.multi_processor_count}, "
            f"L2_cache_size={self.L2_cache_size // MiB}MB)"
        )


_THREADS_PER_SM = {(7, 0): 2048, (7, 5): 1024, (8, 0): 2048, (8, 6): 1536, (8, 9): 1536}


def _properties(card: SimulatedCard) -> _DeviceProperties:
    profile = card.profile
    if profile is None:
        return _DeviceProperties(card.name, card.total_bytes)
    return _DeviceProperties(
        card.name,
        card.total_bytes,
        profile.major,
        profile.minor,
        profile.multi_processor_count,
        max_threads_per_multi_processor=_THREADS_PER_SM.get(profile.capability, 2048),
        L2_cache_size=profile.l2_cache_size,
    )


def _capability(card: SimulatedCard) -> tuple[int, int]:
    return (8, 0) if card.profile is None else card.profile.capability


def _bf16(sim: SimulatedGPU, including_emulation: bool = True) -> bool:
    # torch.cuda.is_bf16_supported: native from compute capability 8.0; below, emulated, which
    # torch counts unless including_emulation=False (a tensor can be made: _check_bf16_tensor_supported)
    return _capability(sim.card(None))[0] >= 8 or bool(including_emulation)


def _empty_cache(sim: SimulatedGPU) -> None:
    for card in sim.devices:  # torch empties every device's cache
        card.empty_cache()


def _snapshot(
    sim: SimulatedGPU, mempool_id: object = None, include_traces: bool = True
) -> list[dict[str, Any]]:
    return [segment for card in sim.devices for segment in card.memory_snapshot()]


def _set_fraction(card: SimulatedCard, fraction: float) -> None:
    if not 0 <= fraction <= 1:
        raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
    card.allowed_bytes = int(card.total_bytes * fraction)


def _summary(card: SimulatedCard) -> str:
    stats = card.memory_stats()
    return "\n".join(
        [
            f"|  {card.name}, GPU {card.device_index}: memory summary",
            f"|  allocated: {format_size(stats['allocated_bytes.all.current'])} "
            f"(peak {format_size(stats['allocated_bytes.all.peak'])})",
            f"|  reserved:  {format_size(stats['reserved_bytes.all.current'])} "
            f"(peak {format_size(stats['reserved_bytes.all.peak'])})",
            f"|  OOMs: {stats['num_ooms']}",
        ]
    )


def _rng_state(sim: SimulatedGPU, device: object = "cuda") -> Any:
    # the CPU generator draws what "cuda" tensors get; fork_rng restores it on its own
    return sys.modules["torch"].get_rng_state()


# torch.cuda function -> what it does while a simulation runs (the simulation, then its arguments)
_CUDA: dict[str, Callable[..., Any]] = {
    "is_available": lambda sim: True,
    "device_count": lambda sim: len(sim.devices),
    "current_device": lambda sim: sim.current_device(),
    "set_device": lambda sim, device: sim.set_device(device),
    "_exchange_device": lambda sim, device: sim.exchange_device(device),
    "_maybe_exchange_device": lambda sim, device: sim.exchange_device(device),
    "synchronize": lambda sim, device=None: None,
    "empty_cache": _empty_cache,
    "get_device_name": lambda sim, device=None: sim.card(device).name,
    "get_device_capability": lambda sim, device=None: _capability(sim.card(device)),
    "get_device_properties": lambda sim, device=None: _properties(sim.card(device)),
    "is_bf16_supported": _bf16,
    "get_allocator_backend": lambda sim: "native",
    "memory_snapshot": _snapshot,
    "memory_allocated": lambda sim, device=None: sim.card(device).allocated_bytes,
    "max_memory_allocated": lambda sim, device=None: sim.card(device).peak_allocated_bytes,
    "memory_reserved": lambda sim, device=None: sim.card(device).reserved_bytes,
    "max_memory_reserved": lambda sim, device=None: sim.card(device).peak_reserved_bytes,
    "memory_stats": lambda sim, device=None: sim.card(device).memory_stats(),
    "memory_summary": lambda sim, device=None, abbreviated=False: _summary(sim.card(device)),
    "reset_peak_memory_stats": lambda sim, device=None: sim.card(device).reset_peak(),
    "reset_accumulated_memory_stats": lambda sim, device=None: sim.card(device).reset_accumulated(),
    "reset_max_memory_allocated": lambda sim, device=None: sim.card(device).reset_peak(),
    "mem_get_info": lambda sim, device=None: sim.card(device).mem_get_info(),
    "set_per_process_memory_fraction": lambda sim, fraction, device=None: _set_fraction(
        sim.card(device), fraction
    ),
    "get_rng_state": _rng_state,
    "get_rng_state_all": lambda sim: [_rng_state(sim) for _ in sim.devices],
    "set_rng_state": lambda sim, new_state, device="cuda": None,
    "set_rng_state_all": lambda sim, new_states: None,
    "get_per_process_memory_fraction": lambda sim, device=None: (
        1.0
        if sim.card(device).allowed_bytes is None
        else sim.card(device).allowed_bytes / sim.card(device).total_bytes
    ),
}


class _Stream:
    """``torch.accelerator.current_stream()`` on the simulated card: the default stream, which
    never captures a graph and has nothing queued (the card runs eagerly on the CPU). torch.optim
    asks ``is_capturing()`` before each step on an accelerator."""

    def __init__(self, device: int) -> None:
        self.device_index = device
        self.device_type = "cuda"

    @property
    def device(self) -> Any:
        return sys.modules["torch"].device("cuda", self.device_index)

    def is_capturing(self) -> bool:
        return False

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None

    def wait_stream(self, stream: object) -> None:
        return None

    def __repr__(self) -> str:
        return f"<torch.Stream device_type=cuda device_index={self.device_index} (simulated)>"


def _stream(sim: SimulatedGPU, device: object = None) -> _Stream:
    return _Stream(sim.card(device).device_index)


# torch.accelerator (and torch.accelerator.memory) function -> what it does while a simulation
# runs, as torch.accelerator answers on a machine whose accelerator is CUDA
_MEMORY: dict[str, Callable[..., Any]] = {
    "empty_cache": lambda sim: _empty_cache(sim),
    "get_memory_info": lambda sim, device=None: sim.card(device).mem_get_info(),
    "memory_allocated": _CUDA["memory_allocated"],
    "max_memory_allocated": _CUDA["max_memory_allocated"],
    "memory_reserved": _CUDA["memory_reserved"],
    "max_memory_reserved": _CUDA["max_memory_reserved"],
    "memory_stats": _CUDA["memory_stats"],
    "reset_peak_memory_stats": _CUDA["reset_peak_memory_stats"],
    "reset_accumulated_memory_stats": _CUDA["reset_accumulated_memory_stats"],
}
_ACCELERATOR: dict[str, Callable[..., Any]] = {
    "is_available": lambda sim: True,
    "current_accelerator": lambda sim, check_available=False: sys.modules["torch"].device("cuda"),
    "device_count": lambda sim: len(sim.devices),
    "current_device_index": lambda sim: sim.current_device(),
    "current_device_idx": lambda sim: sim.current_device(),
    "set_device_index": lambda sim, device: sim.set_device(device),
    "set_device_idx": lambda sim, device: sim.set_device(device),
    "synchronize": lambda sim, device=None: None,
    "current_stream": _stream,
    **_MEMORY,
}

# (module, name) -> (original, stand-in)
_patched: dict[tuple[str, str], tuple[Any, Any]] = {}
_running: list[SimulatedGPU] = []  # the simulation the stand-ins answer for (one at most)


def _stand_in(impl: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def stand_in(*args: Any, **kwargs: Any) -> Any:
        sim = _running[0] if _running else None
        if sim is None:  # left patched (someone patched over us): be torch's own again
            return original(*args, **kwargs)
        return impl(sim, *args, **kwargs)

    return stand_in


# cuDNN's switch as the simulation found it: off while it runs, since card tensors report
# ``is_cuda`` and an LSTM would otherwise look for cuDNN in a CPU build (a warning per call)
_cudnn_was: list[bool] = []


def _tables(torch: Any) -> list[tuple[str, Any, dict[str, Callable[..., Any]]]]:
    accelerator = getattr(torch, "accelerator", None)  # torch 2.6+
    return [
        ("torch.cuda", torch.cuda, _CUDA),
        ("torch.accelerator", accelerator, _ACCELERATOR),
        ("torch.accelerator.memory", getattr(accelerator, "memory", None), _MEMORY),
    ]


def patch(torch: Any, sim: SimulatedGPU) -> None:
    """Make ``torch.cuda`` and ``torch.accelerator`` answer for ``sim`` (the caller holds the
    simulation's lock)."""
    _running[:] = [sim]
    cudnn = getattr(getattr(torch, "backends", None), "cudnn", None)
    if cudnn is not None and not _cudnn_was:
        _cudnn_was.append(bool(cudnn.enabled))
        cudnn.enabled = False
    for where, module, table in _tables(torch):
        if module is None:
            continue
        for name, impl in table.items():
            original = getattr(module, name, None)
            if original is not None:
                _patched[(where, name)] = (original, _stand_in(impl, original))
                setattr(module, name, _patched[(where, name)][1])


def unpatch() -> None:
    """Put back every function still ours (the caller holds the simulation's lock)."""
    _running.clear()
    torch = sys.modules.get("torch")
    cudnn = getattr(getattr(torch, "backends", None), "cudnn", None)
    if cudnn is not None and _cudnn_was:
        cudnn.enabled = _cudnn_was.pop()
    modules = {where: module for where, module, _ in _tables(torch)} if torch is not None else {}
    for (where, name), (original, stand_in) in _patched.items():
        module = modules.get(where)
        if module is not None and getattr(module, name, None) is stand_in:
            setattr(module, name, original)
    _patched.clear()

"""``torch.cuda`` while a simulation runs: its functions answer for the simulated cards.

Patched on the module by :func:`patch` and put back by :func:`unpatch`: code that ran ``from
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

if TYPE_CHECKING:
    from jupyter_gpumem.backends.simulated.gpu import SimulatedGPU

__all__ = ["patch", "unpatch"]


@dataclass(frozen=True)
class _DeviceProperties:
    name: str
    total_memory: int
    major: int = 8
    minor: int = 0
    multi_processor_count: int = 108
    is_integrated: bool = False


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
    "empty_cache": lambda sim: None,  # freed blocks already went back
    "get_device_name": lambda sim, device=None: sim.card(device).name,
    "get_device_capability": lambda sim, device=None: (8, 0),
    "get_device_properties": lambda sim, device=None: _DeviceProperties(
        sim.card(device).name, sim.card(device).total_bytes
    ),
    "is_bf16_supported": lambda sim, including_emulation=True: True,
    "memory_allocated": lambda sim, device=None: sim.card(device).allocated_bytes,
    "max_memory_allocated": lambda sim, device=None: sim.card(device).peak_allocated_bytes,
    "memory_reserved": lambda sim, device=None: sim.card(device).reserved_bytes,
    "max_memory_reserved": lambda sim, device=None: sim.card(device).peak_reserved_bytes,
    "memory_stats": lambda sim, device=None: sim.card(device).memory_stats(),
    "memory_summary": lambda sim, device=None, abbreviated=False: _summary(sim.card(device)),
    "reset_peak_memory_stats": lambda sim, device=None: sim.card(device).reset_peak(),
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

_patched: dict[str, tuple[Any, Any]] = {}  # torch.cuda name -> (original, stand-in)
_running: list[SimulatedGPU] = []  # the simulation the stand-ins answer for (one at most)


def _stand_in(impl: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def stand_in(*args: Any, **kwargs: Any) -> Any:
        sim = _running[0] if _running else None
        if sim is None:  # left patched (someone patched over us): be torch's own again
            return original(*args, **kwargs)
        return impl(sim, *args, **kwargs)

    return stand_in


def patch(torch: Any, sim: SimulatedGPU) -> None:
    """Make ``torch.cuda`` answer for ``sim`` (the caller holds the simulation's lock)."""
    _running[:] = [sim]
    for name, impl in _CUDA.items():
        original = getattr(torch.cuda, name, None)
        if original is not None:
            _patched[name] = (original, _stand_in(impl, original))
            setattr(torch.cuda, name, _patched[name][1])


def unpatch() -> None:
    """Put back every function still ours (the caller holds the simulation's lock)."""
    _running.clear()
    cuda = getattr(sys.modules.get("torch"), "cuda", None)
    for name, (original, stand_in) in _patched.items():
        if getattr(cuda, name, None) is stand_in:
            setattr(cuda, name, original)
    _patched.clear()

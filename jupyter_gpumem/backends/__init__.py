"""Backends: the only code that imports torch and pynvml, lazily, behind one interface.

``base.MemoryBackend`` is what the rest of the package reads GPU memory through, and
``base.active()`` the backend that answers now: ``cuda.CudaBackend`` (torch's allocator and NVML)
or the simulated GPU (``simulated``), a GPU of any size that lives on the CPU, with the same
readings as a real one, selected while it runs. Code outside this package starts and stops the
simulated GPU through the three functions below and never imports ``simulated`` itself
(an import-linter contract in ``pyproject.toml``). ``without_dispatch_frames`` is the traceback of
a fix's re-run as the user should see it, whichever backend ran it: the modes a re-run goes
through (Move to CPU's redirect, the op log, the simulated GPU's) are Python frames of ours.
"""

from __future__ import annotations

from typing import Any

from jupyter_gpumem.backends import simulated as _simulated
from jupyter_gpumem.backends.base import (
    DeviceLabel,
    DeviceReading,
    MemoryBackend,
    RawProcess,
    active,
    on_device,
    set_default,
)
from jupyter_gpumem.backends.cuda import CudaBackend
from jupyter_gpumem.backends.simulated import SimulatedGPU
from jupyter_gpumem.backends.tb_frames import without_dispatch_frames

set_default(CudaBackend())  # what answers while no simulated GPU runs

__all__ = [
    "DeviceLabel",
    "DeviceReading",
    "MemoryBackend",
    "RawProcess",
    "SimulatedGPU",
    "active",
    "on_device",
    "simulate",
    "simulated_profiles",
    "simulation",
    "stop_simulation",
    "without_dispatch_frames",
]


def simulate(total_bytes: int | None, **kwargs: Any) -> SimulatedGPU:
    """Start a simulated GPU of ``total_bytes`` per card, or a real card's profile
    (``profile="T4"``: its memory, CUDA context, compute capability, bf16; ``total_bytes`` None);
    ``devices``, ``other_processes``, ``allowed_bytes``, ``context_bytes`` and ``alloc_conf`` as
    ``simulated.start`` takes them. It is the active backend until stopped. A setting torch would
    refuse (``PYTORCH_CUDA_ALLOC_CONF``, an unknown profile) raises ``ValueError`` in one line."""
    return _simulated.start(total_bytes, **kwargs)


def simulation() -> SimulatedGPU | None:
    """The simulated GPU running now, if any."""
    return _simulated.current()


def stop_simulation() -> None:
    """Stop the simulated GPU, if one runs, leaving torch as it was."""
    _simulated.stop()


def simulated_profiles() -> tuple[str, ...]:
    """The card profiles ``simulate(profile=...)`` takes (``T4``, ``A100-40GB``, ...)."""
    profiles = getattr(_simulated, "PROFILES", None)
    return tuple(profiles) if profiles else ()

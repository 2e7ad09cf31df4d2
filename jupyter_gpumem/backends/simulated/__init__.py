"""A simulated GPU: run notebook cells as if on a CUDA card of any size, on a machine without one.

``%gpumem simulate 2GiB`` (from Python: ``with jupyter_gpumem.simulate("2GiB") as gpu:``) makes
what runs next behave as if the process had a 2 GiB CUDA GPU:

- code that places tensors on ``cuda`` runs, with the tensors on the CPU (``.cuda()``,
  ``.to("cuda")``, ``device="cuda"``, ``module.cuda()``, ``torch.set_default_device("cuda")``);
- every tensor allocated counts against the card, and going over raises a real
  ``torch.OutOfMemoryError`` with torch's own CUDA message, numbers and all;
- ``torch.cuda.is_available()`` is True and the readings (``memory_allocated``,
  ``max_memory_allocated``, ``mem_get_info``, ``memory_stats``, ... see ``_CUDA``) report the
  simulated card, so a notebook that measures its peaks runs unchanged.

It is a real backend that lives in memory, like httpx's ``MockTransport``: rehearse a notebook on a
small card, or test code that must survive an OOM::

    import torch
    from jupyter_gpumem.backends import simulated
    from jupyter_gpumem.units import parse_size

    gpu = simulated.start(parse_size("2GiB"))
    try:
        model = torch.nn.Linear(4096, 4096).cuda()      # 64 MiB of weights, counted
        x = torch.randn(150_000, 4096, device="cuda")   # 2.29 GiB: torch.OutOfMemoryError
    finally:
        simulated.stop()
    print(gpu.peak_allocated_bytes, gpu.num_ooms)

``start(size, other_processes=[(pid, nbytes)], allowed_bytes=n)`` adds pretend processes holding
memory on the card (``Process N has ...`` in the message) and a per-process cap like
``torch.cuda.set_per_process_memory_fraction`` (the ``X allowed;`` clause). ``paused()`` stops
counting for a while (CPU work in the middle of a simulation); ``SimulatedGPU.track`` and
``untrack`` put a tensor on the card or take it off.

How it counts: ``caching_allocator.py`` (PyTorch's caching allocator, ported: blocks, cached
segments, ``PYTORCH_CUDA_ALLOC_CONF``'s settings), ``card.py`` (one card on it, the message) and
``counting.py`` (the dispatch mode). ``start("T4")`` (or ``profile="A100-40GB"``, ...) makes cards
like real ones (``profiles.py``): name, memory, compute capability, and a CUDA context that
``mem_get_info`` sees and ``memory_allocated`` does not. ``start(size, devices=2)`` makes two cards: ``cuda:1`` placements go to the
second one, and an OOM there says ``GPU 1`` (``gpu.py``).

Limits:

- A tensor on the card reports ``cuda:N`` (``device``, ``is_cuda``, ``get_device()``, its repr)
  while its data lives on the CPU; host tensors (``torch.randn(n)``, ``from_numpy``, a
  ``get_batch``'s per-sample tensors) count nowhere; an op mixing the card with the host (beyond a
  0-dim scalar) or two cards raises torch's own "Expected all tensors to be on the same device"
  error; ``.numpy()`` of a card tensor is refused as torch refuses it (``devices.py``).
- Tensors made before ``start`` count once moved with ``.cuda()`` / ``.to("cuda")`` (which copy,
  as a real transfer does) or handed to ``SimulatedGPU.track``.
- Not simulated: ``torch.save`` writes the location ``cpu``; ``torch.load(map_location="cuda")``
  is not redirected; ``pin_memory()`` returns the same tensor; streams, events,
  ``torch.Generator("cuda")``; ``torch.autocast("cuda")`` has no effect on the host data;
  code that runs after ``stop`` or on a thread without the modes sees the data's own device,
  ``cpu``.
- ``torch.compile`` compiles (dynamo traces, guards, breaks graphs and recompiles as on CUDA;
  ``compiled.py``), whatever backend was named, the graphs run op by op through the counting
  mode: a compiled step takes its eager memory (Inductor's fusion, less on CUDA, is not
  modelled); code dynamo traces reads ``x.device`` as ``cpu``. A torch without the hooks it needs
  runs compiled code eagerly.
- Storages grown in place (``resize_``, ``out=``) count at their new size but never raise.
- torch's modes are per thread: threads started while the simulation runs count like the one
  that started it; threads that were running before count under ``on_this_thread()`` (see
  ``lifecycle.py``); forked workers (``DataLoader(num_workers=...)``) count nothing (they still
  redirect). ``stop`` from another thread turns counting and redirection off, leaving inert modes
  on the starting thread until the next ``start`` there. If another mode was pushed above ours,
  ``stop`` takes ours from under it and leaves that one working.
- ``torch.cuda`` functions are patched on the module (``cuda_api.py``): code that ran ``from
  torch.cuda import memory_allocated`` earlier keeps the real one. A function someone else patched
  over ours is left.
- The current device is per thread, as torch's is; other processes (``other_processes=``) sit on
  ``cuda:0``; the cap applies to every card (``%gpumem limit SIZE --device N``: card N only).
"""

from __future__ import annotations

from jupyter_gpumem.backends.simulated.card import (
    SimulatedCard,
    allocation_size,
    format_size,
    oom_message,
)
from jupyter_gpumem.backends.simulated.counting import _counting_mode_class
from jupyter_gpumem.backends.simulated.cuda_api import _CUDA
from jupyter_gpumem.backends.simulated.gpu import SimulatedGPU
from jupyter_gpumem.backends.simulated.lifecycle import (
    _borrowed,
    current,
    on_this_thread,
    paused,
    record_history,
    set_limit,
    start,
    stop,
)
from jupyter_gpumem.backends.simulated.profiles import PROFILES, CardProfile, find_profile

__all__ = [
    "PROFILES",
    "CardProfile",
    "SimulatedCard",
    "SimulatedGPU",
    "allocation_size",
    "current",
    "find_profile",
    "format_size",
    "on_this_thread",
    "oom_message",
    "paused",
    "record_history",
    "set_limit",
    "start",
    "stop",
]
__all__ += ["_CUDA", "_borrowed", "_counting_mode_class"]  # for the tests that look inside

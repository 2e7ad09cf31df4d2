"""Card profiles: the simulated GPU as a T4, an A100, an H100, ... as torch and the driver see them.

Each profile is what ``torch.cuda.get_device_properties`` reports on that card (name, total
memory, compute capability, multiprocessors) and the memory a CUDA context holds outside PyTorch
(seen by ``mem_get_info`` and NVML, not by ``memory_allocated`` / ``memory_reserved``).

Where the numbers come from:

- ``total_bytes``: the "total capacity" torch's OOM message prints for that card (2 decimals of
  GiB), set to a whole MiB that prints the same. T4 14.56 GiB, A100-SXM4-40GB 39.39 GiB, RTX 4090
  23.64 GiB and L4 22.03 GiB as OOM messages posted from those cards print them (quoted in
  ``tests/test_profiles.py``); H100 80GB HBM3 79.18 GiB as ``shared/data/oom_messages`` recorded it
  on our own H100 (torch 2.11, CUDA 13.0); V100-SXM2-16GB 15.77 GiB and A100-SXM4-80GB 79.15 GiB
  from OOM messages of those cards as commonly posted (not re-checked on a card).
- ``context_bytes``: this process's memory the allocator does not count, read from OOM messages
  as "this process has X memory in use" less what PyTorch reserved. H100: 518 MiB with nothing
  allocated (``shared/data``, measured). T4: 132 and 152 MiB in two posted T4 messages (lazy module
  loading, CUDA 12): 150 MiB. L4: 256 MiB (a posted vLLM test's message). V100, A100, RTX 4090: no
  clean reading found; 300, 420 and 400 MiB are estimates between those (a context grows with the
  card's SM count and the kernels loaded), marked ``measured=False``.
- Compute capability and multiprocessor counts: NVIDIA's specifications for each card.
"""

from __future__ import annotations

from dataclasses import dataclass

from jupyter_gpumem.units import MiB

__all__ = ["PROFILES", "CardProfile", "find_profile"]


@dataclass(frozen=True)
class CardProfile:
    """One card as torch and the driver report it."""

    key: str  # what ``%gpumem simulate KEY`` takes
    name: str  # torch.cuda.get_device_name()
    total_bytes: int  # get_device_properties().total_memory: what the driver gives processes
    major: int
    minor: int
    multi_processor_count: int
    context_bytes: int  # the CUDA context: memory of this process outside PyTorch's allocator
    context_measured: bool = True  # False: an estimate (see the module's docstring)
    l2_cache_size: int = 0

    @property
    def capability(self) -> tuple[int, int]:
        return (self.major, self.minor)

    @property
    def native_bf16(self) -> bool:
        """torch.cuda.is_bf16_supported(including_emulation=False): compute capability 8.0+."""
        return self.major >= 8


_ALL = (
    CardProfile("T4", "Tesla T4", 14910 * MiB, 7, 5, 40, 150 * MiB, True, 4 * MiB),
    CardProfile(
        "V100-16GB", "Tesla V100-SXM2-16GB", 16149 * MiB, 7, 0, 80, 300 * MiB, False, 6 * MiB
    ),
    CardProfile(
        "A100-40GB", "NVIDIA A100-SXM4-40GB", 40335 * MiB, 8, 0, 108, 420 * MiB, False, 40 * MiB
    ),
    CardProfile(
        "A100-80GB", "NVIDIA A100-SXM4-80GB", 81051 * MiB, 8, 0, 108, 420 * MiB, False, 40 * MiB
    ),
    CardProfile(
        "H100-80GB", "NVIDIA H100 80GB HBM3", 81080 * MiB, 9, 0, 132, 518 * MiB, True, 50 * MiB
    ),
    CardProfile(
        "RTX4090", "NVIDIA GeForce RTX 4090", 24207 * MiB, 8, 9, 128, 400 * MiB, False, 72 * MiB
    ),
    CardProfile("L4", "NVIDIA L4", 22559 * MiB, 8, 9, 58, 256 * MiB, True, 48 * MiB),
)

PROFILES: dict[str, CardProfile] = {p.key: p for p in _ALL}


def _folded(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def find_profile(name: str) -> CardProfile | None:
    """The profile ``name`` names (``T4``, ``a100-40gb``, ``H100``, ``rtx 4090``), or None.

    Case, spaces and dashes do not matter; a name that fits one profile's start only (``H100``,
    ``V100``) is that profile; ``A100`` alone fits two, and is None."""
    folded = _folded(name)
    if not folded:
        return None
    for profile in _ALL:
        if folded in (_folded(profile.key), _folded(profile.name)):
            return profile
    starts = [p for p in _ALL if _folded(p.key).startswith(folded)]
    return starts[0] if len(starts) == 1 else None

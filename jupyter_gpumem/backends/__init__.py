"""Backends: the only code that imports torch and pynvml, lazily, behind one interface.

``base.MemoryBackend`` is what the rest of the package reads GPU memory through, and
``base.active()`` the backend that answers now: ``cuda.CudaBackend`` (torch's allocator and NVML)
or the simulated GPU (``simulated``), a GPU of any size that lives on the CPU, with the same
readings as a real one, selected while it runs.
"""

from jupyter_gpumem.backends.base import DeviceReading, MemoryBackend, RawProcess, active

__all__ = ["DeviceReading", "MemoryBackend", "RawProcess", "active"]

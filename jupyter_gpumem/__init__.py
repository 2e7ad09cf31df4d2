"""jupyter_gpumem: when a cell dies with ``CUDA out of memory``, a diagnosis and a fix instead of a
kernel restart.

In IPython or Jupyter::

    %load_ext jupyter_gpumem

From Python (tests, scripts)::

    from jupyter_gpumem import parse_oom_message, read_snapshot, simulate
    with simulate("2GiB") as gpu:   # a simulated GPU on the CPU, with real torch.OutOfMemoryError
        ...                         # torch is as it was again after the block
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jupyter_gpumem import backends as _backends
from jupyter_gpumem.backends import MemoryBackend
from jupyter_gpumem.config import GpuMem
from jupyter_gpumem.diagnosis.diagnose import diagnose
from jupyter_gpumem.diagnosis.model import Cause, Diagnosis
from jupyter_gpumem.diagnosis.render import render_html, render_text
from jupyter_gpumem.oom.report import OOMReport, find_oom, is_oom, parse_oom_message
from jupyter_gpumem.readings.holders import Holder, HolderSet, find_holders
from jupyter_gpumem.readings.release import ReleaseResult, release_failed_cell
from jupyter_gpumem.readings.snapshot import MemorySnapshot, read_snapshot
from jupyter_gpumem.units import format_bytes, parse_size

if TYPE_CHECKING:
    from jupyter_gpumem.cells.failure import FailedCell

__version__ = "0.1.0"
__all__ = [
    "Cause",
    "Diagnosis",
    "GpuMem",
    "Holder",
    "HolderSet",
    "MemoryBackend",
    "MemorySnapshot",
    "OOMReport",
    "ReleaseResult",
    "__version__",
    "diagnose",
    "find_holders",
    "find_oom",
    "format_bytes",
    "is_oom",
    "last_failure",
    "load_ipython_extension",
    "parse_oom_message",
    "parse_size",
    "read_snapshot",
    "release_failed_cell",
    "render_html",
    "render_text",
    "simulate",
    "stop_simulation",
    "unload_ipython_extension",
]

_loaded: dict[int, Any] = {}


def simulate(size: str | int, **kwargs: Any) -> _backends.SimulatedGPU:
    """Run as if on a GPU of ``size`` (``"2GiB"`` or bytes): see ``%gpumem simulate``.

    ``with simulate("2GiB", devices=2) as gpu:`` ends it with the block, leaving torch as it
    was; ``devices``, ``other_processes`` and ``allowed_bytes`` as ``backends.simulate``
    takes them. The returned ``SimulatedGPU`` is a :class:`MemoryBackend`.
    """
    total = parse_size(size) if isinstance(size, str) else int(size)
    return _backends.simulate(total, **kwargs)


def stop_simulation() -> None:
    _backends.stop_simulation()


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """For `jupyter labextension develop`: the prebuilt JupyterLab extension in this package."""
    return [{"src": "labextension", "dest": "jupyter-gpumem"}]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext jupyter_gpumem``: loading twice does nothing."""
    if id(ipython) in _loaded:
        return
    from jupyter_gpumem.ipython.extension import Extension

    ext = Extension(ipython)
    ext.load()
    _loaded[id(ipython)] = ext


def unload_ipython_extension(ipython: Any) -> None:
    ext = _loaded.pop(id(ipython), None)
    if ext is not None:
        ext.unload()


def _extension_for(ipython: Any) -> Any | None:
    return _loaded.get(id(ipython))


def last_failure(ipython: Any) -> FailedCell | None:
    """The last cell of ``ipython`` that ran out of memory, as the fixes see it (source, failing
    line, diagnosis); None when none has, or the extension is not loaded there."""
    ext = _loaded.get(id(ipython))
    return None if ext is None else ext.hook.last_failure

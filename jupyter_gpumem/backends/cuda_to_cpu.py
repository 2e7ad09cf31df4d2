"""Send CUDA placements to the CPU: a torch function mode, for code written for a GPU.

Under the mode, code that places tensors on ``cuda`` gets CPU tensors instead:

- ``x.cuda()``, ``x.to("cuda")``, ``x.to("cuda:0")``, ``x.to(0)``, ``x.to(torch.device("cuda"))``,
  ``x.to(device="cuda")``, and so ``module.cuda()`` / ``module.to("cuda")`` (they call these);
- ``device="cuda"`` (or ``cuda:N``, a ``torch.device``, a bare ordinal) in any torch function;
- factories under ``torch.set_default_device("cuda")`` or ``with torch.device("cuda"):``;
- ``x.pin_memory()`` and ``pin_memory=True``, which need an accelerator, do nothing.

``mode.redirected`` counts what was sent, by torch's name for the function
(``Counter({"torch.Tensor.to": 12, "torch.zeros": 1})``), so a fix can say what it moved.

Not redirected (say so to users): ``torch.load(map_location="cuda")``, legacy types
(``torch.cuda.FloatTensor``, ``x.type("torch.cuda.FloatTensor")``), a device passed positionally
to a factory (``torch.as_tensor(data, None, "cuda")``), ``torch.Generator("cuda")``, and
``torch.cuda.*`` calls. Tensors report ``device == cpu``, so code that checks ``x.is_cuda`` sees
False. Function modes are thread-local: the mode covers the thread that entered it.

Usage::

    with cuda_to_cpu() as mode:
        run_the_cell()
    print(mode.redirected)

``holds`` (used by the simulated GPU): a predicate telling whether a tensor is already "on the
GPU". A placement whose result is not, such as ``cpu_tensor.to("cuda")`` (which on the CPU returns
the tensor itself), returns a copy instead, as a real host-to-device copy does. ``place`` (also the
simulated GPU's): given the CUDA index a placement names (None for plain ``"cuda"``), a context
the placement runs in, so the simulated GPU counts it on that card; what it enters as, if not None,
is told of each tensor sent there (``moved(source, result)``).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch

__all__ = ["cuda_index", "cuda_to_cpu", "cuda_to_cpu_mode_class", "is_cuda_device"]

_NOWHERE = -1  # a placement that names no CUDA device (``.to(other_tensor)``, ``pin_memory``)


def is_cuda_device(device: object) -> bool:
    """``"cuda"``, ``"cuda:1"``, ``torch.device("cuda")`` or a bare ordinal (CUDA in ``.to(0)``)."""
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    if isinstance(device, int):
        return not isinstance(device, bool)
    return getattr(device, "type", None) == "cuda"


def cuda_index(device: object) -> int | None:
    """The index a CUDA device argument names: ``"cuda:1"`` and ``1`` are 1, ``"cuda"`` None."""
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    if isinstance(device, str):
        _, _, rest = device.partition(":")
        return int(rest) if rest.isdigit() else None
    index = getattr(device, "index", None)
    return index if isinstance(index, int) else None


class _Torch(NamedTuple):
    """What the mode compares a call with, read from torch once."""

    tensor_cuda: Any
    tensor_to: Any
    tensor_pin: Any
    constructors: Any  # the factories that follow the default device
    cpu: Any
    Tensor: Any
    preserve_format: Any
    mode_stack: Any  # torch.overrides._get_current_function_mode_stack
    DeviceContext: Any


def _torch_names() -> _Torch:
    """torch's objects the mode compares each call with, read once (the class is built once)."""
    import torch
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._device import DeviceContext, _device_constructors

    return _Torch(
        torch.Tensor.cuda,
        torch.Tensor.to,
        torch.Tensor.pin_memory,
        _device_constructors(),
        torch.device("cpu"),
        torch.Tensor,
        torch.preserve_format,
        _get_current_function_mode_stack,
        DeviceContext,
    )


def _default_cuda(t: _Torch) -> Any:
    """The default device when it is a CUDA one, else None."""
    # set_default_device / `with torch.device(...)` put a DeviceContext at the bottom of the
    # stack, below us; torch.get_default_device() would make a tensor and recurse.
    for mode in reversed(t.mode_stack()):
        if isinstance(mode, t.DeviceContext):
            return mode.device if mode.device.type == "cuda" else None
    return None


@functools.cache
def _name_of(func: Any) -> str:
    from torch.overrides import resolve_name

    return str(resolve_name(func) or getattr(func, "__qualname__", func))


def _on_cpu(
    t: _Torch, holds: Any, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[bool, int | None, Any, tuple[Any, ...], dict[str, Any]]:
    """The call as it runs on the CPU: (moved, the CUDA index it named, func, args, kwargs).

    ``moved``: the call placed something on the GPU, so it is counted and run in ``place``;
    the index is ``_NOWHERE`` where the placement names no card (``.to(other)``, pinning)."""
    moved = False
    target: int | None = _NOWHERE
    if func is t.tensor_cuda:
        target = cuda_index(args[1] if len(args) > 1 else kwargs.get("device"))
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        fmt = kwargs.get("memory_format", t.preserve_format)
        func, args = t.tensor_to, (args[0], t.cpu)
        kwargs = {"non_blocking": non_blocking, "memory_format": fmt}
        moved = True
    elif func is t.tensor_to:
        if len(args) > 1 and is_cuda_device(args[1]):
            target = cuda_index(args[1])
            args = (args[0], t.cpu, *args[2:])
            moved = True
        elif (
            holds is not None and len(args) > 1 and isinstance(args[1], t.Tensor) and holds(args[1])
        ):
            moved = True  # .to(other) where other is "on the GPU"
    device = kwargs.get("device")
    if device is not None:
        if is_cuda_device(device):
            target = cuda_index(device)
            kwargs = {**kwargs, "device": t.cpu}
            moved = True
    elif func in t.constructors and (default := _default_cuda(t)) is not None:
        target = default.index
        kwargs = {**kwargs, "device": t.cpu}
        moved = True
    if kwargs.get("pin_memory"):
        kwargs = {**kwargs, "pin_memory": False}
        moved = True
    return moved, target, func, args, kwargs


@functools.cache
def cuda_to_cpu_mode_class() -> type[Any]:
    """The ``CudaToCpuMode`` class (a ``TorchFunctionMode``), built on first use."""
    import torch
    from torch.overrides import TorchFunctionMode

    t = _torch_names()
    Tensor = torch.Tensor

    class CudaToCpuMode(TorchFunctionMode):
        """Redirect CUDA placements to the CPU; ``redirected`` counts them by function name."""

        def __init__(
            self,
            holds: Callable[[torch.Tensor], bool] | None = None,
            place: Callable[[int | None], Any] | None = None,
        ) -> None:
            super().__init__()
            self.holds = holds
            self.place = place
            self.active = True  # False: pass everything through (a stopped simulation's mode)
            self.redirected: collections.Counter[str] = collections.Counter()

        def __torch_function__(
            self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
        ) -> Any:
            if kwargs is None:
                kwargs = {}
            if not self.active:
                return func(*args, **kwargs)
            if func is t.tensor_pin:
                self.redirected[_name_of(func)] += 1
                return args[0]
            moved, target, call, args, kwargs = _on_cpu(t, self.holds, func, args, kwargs)
            if not moved:
                return call(*args, **kwargs)
            self.redirected[_name_of(func)] += 1
            place = self.place
            if place is None or target == _NOWHERE:
                return self._placed(call, args, kwargs)
            with place(target) as placement:
                out = self._placed(call, args, kwargs)
            if call is t.tensor_to and placement is not None and isinstance(args[0], Tensor):
                placement.moved(args[0], out)  # a tensor sent to the card named
            return out

        def _placed(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            out = func(*args, **kwargs)
            holds = self.holds
            if holds is not None and isinstance(out, Tensor) and out.is_cpu and not holds(out):
                out = out.clone()  # a placement on the GPU is a copy: never alias host memory
            return out

    return CudaToCpuMode


def cuda_to_cpu(*, holds: Callable[[torch.Tensor], bool] | None = None) -> Any:
    """A fresh ``CudaToCpuMode``: use it as ``with cuda_to_cpu() as mode: ...``."""
    return cuda_to_cpu_mode_class()(holds=holds)

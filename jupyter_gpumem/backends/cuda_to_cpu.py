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
``torch.cuda.*`` calls. On its own (Move to CPU) tensors report ``device == cpu``, so code that
checks ``x.is_cuda`` sees False. Function modes are thread-local: the mode covers the thread that
entered it.

Usage::

    with cuda_to_cpu() as mode:
        run_the_cell()
    print(mode.redirected)

``holds`` (used by the simulated GPU): a predicate telling whether a tensor is already where a
placement sends it. A placement whose result is not, such as ``cpu_tensor.to("cuda")`` (which on
the CPU returns the tensor itself), returns a copy instead, as a real host-to-device copy does.
``place`` (the simulated GPU's ``gpu._Cards``): called with the CUDA index a placement names
(None for plain ``"cuda"``), a context the placement runs in, so the simulated GPU counts it on
that card; ``place.host()``, one where what is made stays on the host (``x.cpu()``, ``x.to("cpu")``
of a tensor on a card: a host copy); ``place.index_of(tensor)``, the card a tensor is on. With it,
a tensor on a card answers as CUDA's would (``_on_card_answers``): ``device``, ``is_cuda``,
``is_cpu``, ``get_device()``, ``type()``, its repr and format (``device='cuda:0'``); ``.numpy()``
and ``np.asarray`` are refused with torch's ``TypeError``, ``pin_memory()`` with its
``RuntimeError``; ``copy.deepcopy`` makes a copy on the same card; ``x.new_tensor(data)`` lands
on ``x``'s card. The answers are Python's: C++ sees host tensors (``torch.save`` writes ``cpu``).

While dynamo traces (``torch.compiler.is_compiling()``) the mode passes each call through as
written: the simulated GPU compiles under it (``backends/simulated/compiled.py``) and the graph's
calls come back through the mode when the graph runs. Code that dynamo traces reads a tensor's
own device: ``x.device`` is ``cpu`` there, so ``torch.arange(n, device=x.device)`` in compiled
code counts on the card of the graph's inputs, as on CUDA, but ``if x.is_cuda:`` takes the CPU's
branch.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch

__all__ = ["cuda_index", "cuda_to_cpu", "cuda_to_cpu_mode_class", "is_cuda_device"]

_NOWHERE = -2  # a placement that names no CUDA device (``pin_memory``)
_HOST = -1  # a tensor on a simulated card sent to the host (``x.cpu()``); gpu.py's ``_HOST``


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
    tensor_cpu: Any
    tensor_new_tensor: Any
    tensor_repr: Any
    dtype: Any
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
        torch.Tensor.cpu,
        torch.Tensor.new_tensor,
        torch.Tensor.__repr__,
        torch.dtype,
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


def _is_cpu_device(device: object) -> bool:
    if isinstance(device, str):
        return device == "cpu" or device.startswith("cpu:")
    return getattr(device, "type", None) == "cpu"


def _to_destination(t: _Torch, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Where ``Tensor.to(...)`` sends the tensor: a device argument, a tensor, or None."""
    device = kwargs.get("device")
    if device is None and len(args) > 1 and not isinstance(args[1], t.dtype):
        device = args[1]
    return device


def _on_cpu(
    t: _Torch, index_of: Any, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[bool, int | None, Any, tuple[Any, ...], dict[str, Any]]:
    """The call as it runs on the CPU: (moved, where it goes, func, args, kwargs).

    ``moved``: the call places something on the GPU (counted, run in ``place``) or, with the
    simulated GPU's ``index_of``, sends a tensor on a card to the host (``_HOST``); where it goes:
    the CUDA index it named (None for plain ``"cuda"``), ``_HOST``, or ``_NOWHERE`` (pinning)."""
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
        dest = _to_destination(t, args, kwargs)
        if is_cuda_device(dest):
            target = cuda_index(dest)
            if "device" in kwargs:
                kwargs = {**kwargs, "device": t.cpu}
            else:
                args = (args[0], t.cpu, *args[2:])
            return True, target, func, args, kwargs
        if index_of is not None and dest is not None:
            on_card = index_of(dest) if isinstance(dest, t.Tensor) else None
            if on_card is not None:  # .to(other) where other is on a card
                return True, on_card, func, args, kwargs
            if (isinstance(dest, t.Tensor) or _is_cpu_device(dest)) and index_of(
                args[0]
            ) is not None:
                return True, _HOST, func, args, kwargs  # a tensor on a card sent to the host
        return False, target, func, args, kwargs
    elif func is t.tensor_cpu:
        if index_of is not None and index_of(args[0]) is not None:
            return True, _HOST, func, args, kwargs
        return False, target, func, args, kwargs
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


def _refuse_numpy(index: int) -> TypeError:
    return TypeError(
        f"can't convert cuda:{index} device type tensor to numpy. Use Tensor.cpu() to copy the "
        "tensor to host memory first."
    )


def _on_card_answers(t: _Torch) -> dict[Any, Callable[..., Any]]:
    """What a tensor on a simulated card answers, as CUDA's would (see ``_OnCard``)."""
    import torch

    devices: dict[int, Any] = {}

    def device(mode: Any, func: Any, index: int, args: Any, kwargs: Any) -> Any:
        d = devices.get(index)
        if d is None:
            d = devices[index] = torch.device("cuda", index)
        return d

    def numpy(mode: Any, func: Any, index: int, args: Any, kwargs: Any) -> Any:
        __tracebackhide__ = True  # IPython hides this frame: torch's error is the user's
        raise _refuse_numpy(index)

    def legacy_type(mode: Any, func: Any, index: int, args: Any, kwargs: Any) -> Any:
        name = func(*args, **kwargs)
        if len(args) == 1 and not kwargs.get("dtype") and isinstance(name, str):
            return name.replace("torch.", "torch.cuda.", 1)  # torch.cuda.FloatTensor
        return name

    def pin(mode: Any, func: Any, index: int, args: Any, kwargs: Any) -> Any:
        __tracebackhide__ = True  # IPython hides this frame: torch's error is the user's
        scalar = args[0].type()[len("torch.") : -len("Tensor")]
        raise RuntimeError(f"cannot pin 'CUDA{scalar}Type' only dense CPU tensors can be pinned")

    def text(mode: Any, func: Any, index: int, args: Any, kwargs: Any) -> Any:
        # torch's own formatting, with this mode answering `.device` (device='cuda:0')
        with mode:
            if func is t.tensor_repr:
                return torch._tensor_str._str(
                    args[0], tensor_contents=kwargs.get("tensor_contents")
                )
            if args[0].dim() == 0:
                return args[0].item().__format__(*args[1:])
            return object.__format__(args[0], *args[1:])

    def deepcopy(mode: Any, func: Any, index: int, args: Any, kwargs: Any) -> Any:
        out = func(*args, **kwargs)
        if isinstance(out, t.Tensor) and mode.place is not None:
            mode.place.track(out, index)  # a copy on the same card, as CUDA's deepcopy makes
        return out

    return {
        torch.Tensor.device.__get__: device,
        getattr(torch.Tensor, "is_cuda").__get__: lambda *a: True,  # noqa: B009 (a descriptor)
        getattr(torch.Tensor, "is_cpu").__get__: lambda *a: False,  # noqa: B009
        torch.Tensor.get_device: lambda mode, func, index, args, kwargs: index,
        torch.Tensor.numpy: numpy,
        torch.Tensor.__array__: numpy,
        torch.Tensor.type: legacy_type,
        torch.Tensor.pin_memory: pin,
        torch.Tensor.__repr__: text,
        torch.Tensor.__format__: text,
        torch.Tensor.__deepcopy__: deepcopy,
    }


def _card_of(index_of: Any, args: tuple[Any, ...], kwargs: dict[str, Any], tensor: type) -> Any:
    """The card of the first tensor a call reads that is on one, else None."""
    for a in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(a, tensor):
            index = index_of(a)
            if index is not None:
                return index
        elif isinstance(a, (list, tuple)):
            for x in a:
                if isinstance(x, tensor):
                    index = index_of(x)
                    if index is not None:
                        return index
    return None


def _metadata_reads(torch: Any) -> frozenset[Any]:
    """Calls that read a tensor and make none: no need to look for the card of their inputs."""
    T = torch.Tensor
    getters = (
        "shape",
        "dtype",
        "requires_grad",
        "grad",
        "grad_fn",
        "is_leaf",
        "ndim",
        "names",
        "layout",
        "is_sparse",
        "is_quantized",
        "is_meta",
        "data",
        "_version",
        "T",
        "mT",
    )
    methods = (
        "dim",
        "size",
        "numel",
        "stride",
        "item",
        "tolist",
        "data_ptr",
        "untyped_storage",
        "element_size",
        "is_contiguous",
        "is_floating_point",
        "is_complex",
        "__len__",
        "storage_offset",
        "nelement",
        "__hash__",
        "__bool__",
        "__index__",
        "__int__",
        "__float__",
        "requires_grad_",
        "retain_grad",
        "register_hook",
        "nbytes",
    )
    reads = [getattr(T, n).__get__ for n in getters if hasattr(T, n)]
    reads += [getattr(T, n) for n in methods if hasattr(T, n)]
    return frozenset(reads)


def _on_its_card(index_of: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``x.new_tensor(data)`` of a tensor on a card: on that card, as CUDA puts it."""
    index = index_of(args[0])
    if index is not None and kwargs.get("device") is None:
        return {**kwargs, "device": f"cuda:{index}"}
    return kwargs


def _to_host(place: Any, call: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``x.cpu()``, ``x.to("cpu")`` of a tensor on a card: a host copy, counted nowhere."""
    __tracebackhide__ = True  # IPython hides this frame: torch's error is the user's
    with place.host():
        out = call(*args, **kwargs)
        if place.index_of(out) is not None:
            out = out.clone()  # still the card's storage (the CPU's `.to` returned it): a copy
    return out


def _redirect(
    mode: Any, t: _Torch, metadata: frozenset[Any], func: Any, args: Any, kwargs: dict[str, Any]
) -> Any:
    """``mode``'s call once a tensor on a card has had its own answers: pinning, placements on a
    card or the host, and, on the simulated GPU, any other call reading a tensor on a card run
    with that card for what it makes from nothing (``gpu._Within``)."""
    __tracebackhide__ = True  # IPython hides this frame: torch's error is the user's
    if func is t.tensor_pin:
        mode.redirected[_name_of(func)] += 1
        return args[0]
    index_of = mode.index_of
    moved, target, call, args, kwargs = _on_cpu(t, index_of, func, args, kwargs)
    if not moved:
        if index_of is not None and func not in metadata:
            index = _card_of(index_of, args, kwargs, t.Tensor)
            if index is not None:
                with mode.place.within(index):
                    return call(*args, **kwargs)
        return call(*args, **kwargs)
    if target == _HOST:
        return _to_host(mode.place, call, args, kwargs)
    mode.redirected[_name_of(func)] += 1
    place = mode.place
    if place is None or target == _NOWHERE:
        return _placed(mode.holds, call, args, kwargs, t.Tensor)
    with place(target):
        return _placed(mode.holds, call, args, kwargs, t.Tensor)


def _placed(holds: Any, func: Any, args: Any, kwargs: dict[str, Any], tensor: Any) -> Any:
    __tracebackhide__ = True  # IPython hides this frame: torch's error is the user's
    out = func(*args, **kwargs)
    if holds is not None and isinstance(out, tensor) and not holds(out):
        out = out.clone()  # a placement on the GPU is a copy: never alias host memory
    return out


@functools.cache
def cuda_to_cpu_mode_class() -> type[Any]:
    """The ``CudaToCpuMode`` class (a ``TorchFunctionMode``), built on first use."""
    import torch
    from torch.overrides import TorchFunctionMode

    t = _torch_names()
    Tensor = torch.Tensor
    on_card = _on_card_answers(t)
    metadata = _metadata_reads(torch)
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (
        lambda: False
    )

    class CudaToCpuMode(TorchFunctionMode):
        """Redirect CUDA placements to the CPU; ``redirected`` counts them by function name."""

        def __init__(
            self,
            holds: Callable[[torch.Tensor], bool] | None = None,
            place: Any = None,
        ) -> None:
            super().__init__()
            self.holds = holds
            self.place = place
            self.index_of = getattr(place, "index_of", None)  # the simulated GPU's cards
            self.active = True  # False: pass everything through (a stopped simulation's mode)
            self.redirected: collections.Counter[str] = collections.Counter()

        def __torch_function__(
            self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
        ) -> Any:
            __tracebackhide__ = True  # IPython hides this frame: torch's error is the user's
            if kwargs is None:
                kwargs = {}
            if not self.active or is_compiling():
                # dynamo tracing through the mode (the simulated GPU compiles under it): the call
                # as written goes in the graph, which then runs through this mode op by op
                return func(*args, **kwargs)
            index_of = self.index_of
            if index_of is not None and args and isinstance(args[0], Tensor):
                answer = on_card.get(func)
                if answer is not None:
                    index = index_of(args[0])
                    if index is not None:
                        return answer(self, func, index, args, kwargs)
                if func is t.tensor_new_tensor:
                    kwargs = _on_its_card(index_of, args, kwargs)
            return _redirect(self, t, metadata, func, args, kwargs)

    return CudaToCpuMode


def cuda_to_cpu(*, holds: Callable[[torch.Tensor], bool] | None = None) -> Any:
    """A fresh ``CudaToCpuMode``: use it as ``with cuda_to_cpu() as mode: ...``."""
    return cuda_to_cpu_mode_class()(holds=holds)

"""The counting mode: a torch dispatch mode that counts every new storage on a simulated card.

An op's new storages count on the card its placement names or the card of the tensors it reads
(``SimulatedGPU._target``, which also refuses an op mixing devices, as CUDA does); an op on host
tensors alone counts nowhere.

Factories whose size is known beforehand (``empty``, ``zeros``, ``ones``, ``full``, ``rand*``,
``new_*``, ``*_like``) are checked before anything is allocated, so
``torch.empty(400 * 2**30, device="cuda")`` is an OOM and not 400 GiB of host memory; other
operations are checked once their output exists, which is then dropped. Autograd is counted too:
on the CPU the backward pass runs on the calling thread, under the same modes. ``torch.compile``d
code compiles under the mode, and its graphs run through it (``compiled.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from jupyter_gpumem.backends.simulated.compiled import prepare
from jupyter_gpumem.backends.simulated.devices import HOST_OUTPUTS

if TYPE_CHECKING:
    import torch

    from jupyter_gpumem.backends.simulated.card import SimulatedCard
    from jupyter_gpumem.backends.simulated.gpu import SimulatedGPU


def _flat(out: Iterable[Any], tensor: type, acc: list[Any]) -> list[Any]:
    for o in out:
        if isinstance(o, tensor):
            acc.append(o)
        elif isinstance(o, (tuple, list)):
            _flat(o, tensor, acc)
    return acc


def _shaped(shape: Iterable[int], dtype: Any) -> int:
    numel = 1
    for s in shape:
        numel *= int(s)
    return numel * dtype.itemsize


def _strided(shape: list[int], stride: list[int], dtype: Any) -> int:
    if any(int(s) == 0 for s in shape):
        return 0
    return (
        1 + sum((int(s) - 1) * int(st) for s, st in zip(shape, stride, strict=True))
    ) * dtype.itemsize


def _dtype_of(kwargs: dict[str, Any], default: Any) -> Any:
    return kwargs.get("dtype") or default


def _fill_dtype(torch: Any, value: object) -> Any:
    """The dtype ``torch.full`` gives its fill value when none is asked for."""
    if isinstance(value, bool):
        return torch.bool
    if isinstance(value, int):
        return torch.int64
    if isinstance(value, complex):
        return torch.complex128 if torch.get_default_dtype() == torch.float64 else torch.complex64
    return torch.get_default_dtype()


def _first_shape(args: tuple[Any, ...]) -> Any:
    return next(a for a in args if isinstance(a, (list, tuple)))


def _like(a: tuple[Any, ...], k: dict[str, Any]) -> int:
    return a[0].numel() * _dtype_of(k, a[0].dtype).itemsize if a[0].is_cpu else 0


Predictor = Callable[[tuple[Any, ...], dict[str, Any]], int]


def _checked(predict: Predictor, strided_layout: Any) -> Predictor:
    """``predict`` for plain memory on the card only: 0 for sparse layouts and other devices."""

    def size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        device = kwargs.get("device")
        if kwargs.get("layout", strided_layout) is not strided_layout or (
            device is not None and device.type != "cpu"
        ):
            return 0  # sparse, meta: not plain memory on the card
        return predict(args, kwargs)

    return size


def _size_predictors(torch: Any) -> dict[Any, Predictor]:
    """aten factory overload -> bytes its output will take, computed from its arguments."""
    aten, default_dtype = torch.ops.aten, torch.get_default_dtype
    shaped, strided, dtype_of = _shaped, _strided, _dtype_of
    predictors: dict[Any, Predictor] = {
        aten.empty: lambda a, k: shaped(a[0], dtype_of(k, default_dtype())),
        aten.zeros: lambda a, k: shaped(a[0], dtype_of(k, default_dtype())),
        aten.ones: lambda a, k: shaped(a[0], dtype_of(k, default_dtype())),
        aten.rand: lambda a, k: shaped(a[0], dtype_of(k, default_dtype())),
        aten.randn: lambda a, k: shaped(a[0], dtype_of(k, default_dtype())),
        aten.full: lambda a, k: shaped(a[0], dtype_of(k, _fill_dtype(torch, a[1]))),
        aten.randint: lambda a, k: shaped(_first_shape(a), dtype_of(k, torch.int64)),
        aten.empty_strided: lambda a, k: strided(a[0], a[1], dtype_of(k, default_dtype())),
        aten.new_empty: lambda a, k: shaped(a[1], dtype_of(k, a[0].dtype)),
        aten.new_zeros: lambda a, k: shaped(a[1], dtype_of(k, a[0].dtype)),
        aten.new_ones: lambda a, k: shaped(a[1], dtype_of(k, a[0].dtype)),
        aten.new_full: lambda a, k: shaped(a[1], dtype_of(k, a[0].dtype)),
        aten.new_empty_strided: lambda a, k: strided(a[1], a[2], dtype_of(k, a[0].dtype)),
        **{
            getattr(aten, name): _like
            for name in (
                "empty_like", "zeros_like", "ones_like", "full_like",
                "rand_like", "randn_like", "randint_like",
            )
        },
    }  # fmt: skip
    table = {}
    for packet, predict in predictors.items():
        for overload in packet.overloads():
            if not overload.endswith("out"):  # `out=` variants write into a tensor that exists
                table[getattr(packet, overload)] = _checked(predict, torch.strided)
    return table


# what an op's return is: new memory, a view, written in place, made on the host
_FRESH, _VIEW, _WRITTEN, _HOST_OUT = 0, 1, 2, 3


def _return_kinds(func: Any) -> tuple[int, ...]:
    """From the op's schema: which returns may be new storages (``Tensor(a)`` is a view of an
    input, ``Tensor(a!)`` an input written in place, which may have been resized), and which
    torch makes on the CPU whatever the inputs' device (``HOST_OUTPUTS``)."""
    if func.__name__.startswith("lift_fresh"):  # torch.tensor(...): made outside the dispatcher
        return (_FRESH,)
    host = HOST_OUTPUTS.get(func._schema.name, ())
    return tuple(
        _HOST_OUT
        if i in host
        else _FRESH
        if r.alias_info is None
        else _WRITTEN
        if r.alias_info.is_write
        else _VIEW
        for i, r in enumerate(func._schema.returns)
    )


def _predicted_oom(
    card: SimulatedCard, predict: Predictor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str | None:
    """The OOM message for a factory whose output would not fit, before it allocates anything."""
    try:
        nbytes = predict(args, kwargs)
    except Exception:  # symbolic sizes and the like: count after the fact
        nbytes = 0
    return card._precheck(nbytes) if nbytes > 0 else None


def _count_output(
    sim: SimulatedGPU,
    card: SimulatedCard,
    out: Any,
    kinds: tuple[int, ...],
    tensor: type[torch.Tensor],
) -> str | None:
    """Count an op's output on ``card``: its new storages, and those it wrote in place (which
    may have been resized); a view is no new memory. The OOM message when it does not fit."""
    if isinstance(out, tensor):
        kind = kinds[0] if kinds else _FRESH
        if kind in (_VIEW, _HOST_OUT):
            return None
        return sim._count(card, (out,), kind == _FRESH)
    if not isinstance(out, (tuple, list)):
        return None
    if len(kinds) == 1:  # one return, a list of tensors
        if kinds[0] == _VIEW:
            return None
        return sim._count(card, _flat(out, tensor, []), kinds[0] == _FRESH)
    message = None
    for kind in (_FRESH, _WRITTEN):
        part = [o for o, k in zip(out, kinds, strict=False) if k == kind]
        message = message or sim._count(card, _flat(part, tensor, []), kind == _FRESH)
    return message


@functools.cache
def _counting_mode_class() -> type[Any]:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    Tensor, OutOfMemoryError = torch.Tensor, torch.OutOfMemoryError
    no_torch_function = torch._C.DisableTorchFunction
    predictors = _size_predictors(torch)
    kinds_of: dict[Any, tuple[int, ...]] = {}

    class CountingMode(TorchDispatchMode):
        """Counts every new storage on ``sim``; raises its CUDA OOM past the budget."""

        def __init__(self, sim: SimulatedGPU) -> None:
            super().__init__()
            self.sim = sim

        @classmethod
        def ignore_compile_internals(cls) -> bool:
            """Asked by dynamo before each frame it would compile: True lets it compile under
            this mode (``compiled.py``: it traces with the mode off, and the graphs it makes run
            op by op through it); False, where this torch cannot, and it runs the frame eagerly."""
            return prepare()

        def __torch_dispatch__(
            self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
        ) -> Any:
            __tracebackhide__ = True  # IPython hides this frame: torch's error is the user's
            if kwargs is None:
                kwargs = {}
            sim = self.sim
            if not sim._active:
                return func(*args, **kwargs)
            with no_torch_function():  # what we read of a tensor is its own, not the mode's answer
                return self._counted(sim, func, args, kwargs)

        def _counted(
            self, sim: SimulatedGPU, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> Any:
            __tracebackhide__ = True  # IPython hides this frame: torch's error is the user's
            card = sim._target(func, args, kwargs)  # raises torch's error on mixed devices
            if card is None:  # a host op: nothing on a card
                return func(*args, **kwargs)
            predict = predictors.get(func)
            if predict is not None:
                message = _predicted_oom(card, predict, args, kwargs)
                if message is not None:
                    raise OutOfMemoryError(message)
            out = func(*args, **kwargs)
            kinds = kinds_of.get(func)
            if kinds is None:
                kinds = kinds_of[func] = _return_kinds(func)
            message = _count_output(sim, card, out, kinds, Tensor)
            if message is not None:
                del out  # the allocation failed: its output must not outlive the error
                raise OutOfMemoryError(message)
            return out

    return CountingMode

"""Who holds GPU memory, by name: variables, models (weights, gradients, buffers), optimizers
(state), containers of those one level deep, the failed frames' locals, and the output cache.

Each storage is counted once, for the first holder that reaches it, in this order: models,
optimizers, tensors, containers and other objects among the user's variables; then the output cache;
then the failed frames. So a tensor that is both a global and a local of the failed frame is the
global's (the failure does not pin it), and tied or shared weights are counted once.

Only the user namespace and the frames are walked, never every gc object, so the cost is bounded by
the namespace (containers and object attributes: at most ``MAX_ITEMS`` entries each).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import (
    BuiltinFunctionType,
    FrameType,
    FunctionType,
    MethodType,
    ModuleType,
    TracebackType,
)
from typing import Any

from .backends import _torch

MAX_ITEMS = 1000  # entries looked at per container / object: bounded even for a list of 1e6 items
_OUTPUT_CACHE = re.compile(r"^(_+|_\d+|Out)$")
_SKIP_TYPES = (
    str, bytes, int, float, bool, type(None), type,
    FunctionType, BuiltinFunctionType, MethodType, ModuleType,
)  # fmt: skip
_IPYTHON_NAMES = re.compile(r"^(_i+\d*|_[ido]h|In|_exit_code|_sh)$")


@dataclass
class Holder:
    name: str  # how the user reaches it: "model", "batch['x']", "Out[3]", "x in train_step()"
    kind: str  # "model" | "optimizer" | "tensor" | "container" | "object"
    where: str  # "variable" | "output cache" | "failed frame"
    device: str
    parameters_bytes: int = 0
    gradients_bytes: int = 0
    buffers_bytes: int = 0
    optimizer_state_bytes: int = 0
    tensor_bytes: int = 0  # plain tensors (not a model's parameters or an optimizer's state)
    detail: str = ""  # "BertModel, 335.1M parameters", "(64, 512, 1024) float32"
    used_by_cell: bool = False
    recreated_by_cell: bool = False  # the cell assigns it anew before reading it

    @property
    def total_bytes(self) -> int:
        return (
            self.parameters_bytes
            + self.gradients_bytes
            + self.buffers_bytes
            + self.optimizer_state_bytes
            + self.tensor_bytes
        )


@dataclass
class HolderSet:
    holders: list[Holder] = field(default_factory=list)  # largest first
    scanned_names: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(h.total_bytes for h in self.holders)

    def where_bytes(self, where: str) -> int:
        return sum(h.total_bytes for h in self.holders if h.where == where)

    def category_bytes(self) -> dict[str, int]:
        """Bytes per category, for the breakdown: weights, gradients, optimizer state, ..."""
        out = {
            "weights": 0,
            "gradients": 0,
            "optimizer state": 0,
            "variables": 0,
            "output cache": 0,
            "failed frames": 0,
        }
        for h in self.holders:
            if h.where == "failed frame":
                out["failed frames"] += h.total_bytes
                continue
            if h.where == "output cache":
                out["output cache"] += h.total_bytes
                continue
            out["weights"] += h.parameters_bytes + h.buffers_bytes
            out["gradients"] += h.gradients_bytes
            out["optimizer state"] += h.optimizer_state_bytes
            out["variables"] += h.tensor_bytes
        return out


class _Counter:
    """Counts each GPU storage once across every holder."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, int]] = set()

    def take(self, t: Any) -> tuple[int, str]:
        info = _torch.gpu_storage(t)
        if info is None:
            return 0, ""
        key, nbytes, device = info
        if key in self.seen:
            return 0, device
        self.seen.add(key)
        return nbytes, device


def _describe_tensor(t: Any) -> str:
    try:
        return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
    except Exception:
        return "tensor"


def _count_params(module: Any) -> int:
    try:
        return sum(p.numel() for p in module.parameters())
    except Exception:
        return 0


def _module_holder(name: str, where: str, module: Any, counter: _Counter) -> Holder:
    h = Holder(name=name, kind="model", where=where, device="")
    try:
        for p in module.parameters():
            n, dev = counter.take(p)
            h.parameters_bytes += n
            h.device = h.device or dev
            if p.grad is not None:
                g, dev = counter.take(p.grad)
                h.gradients_bytes += g
                h.device = h.device or dev
        for b in module.buffers():
            n, dev = counter.take(b)
            h.buffers_bytes += n
            h.device = h.device or dev
    except Exception:
        pass
    count = _count_params(module)
    h.detail = f"{type(module).__name__}, {count / 1e6:.1f}M parameters"
    return h


def _optimizer_holder(name: str, where: str, opt: Any, counter: _Counter) -> Holder:
    h = Holder(name=name, kind="optimizer", where=where, device="")
    try:
        for state in list(opt.state.values())[: MAX_ITEMS * 10]:
            for v in state.values() if isinstance(state, Mapping) else ():
                if _torch.is_tensor(v):
                    n, dev = counter.take(v)
                    h.optimizer_state_bytes += n
                    h.device = h.device or dev
    except Exception:
        pass
    h.detail = f"{type(opt).__name__}, state for {len(getattr(opt, 'state', ()))} parameters"
    return h


def _children(obj: Any) -> Iterator[Any]:
    """Values one level inside a container or a plain object, bounded."""
    if isinstance(obj, Mapping):
        it: Iterable[Any] = obj.values()
    elif isinstance(obj, (list, tuple, set, frozenset)):
        it = obj
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        try:
            it = vars(obj).values()
        except TypeError:
            return
    else:
        return
    for i, v in enumerate(it):
        if i >= MAX_ITEMS:
            return
        yield v


def _composite_holder(name: str, where: str, obj: Any, counter: _Counter) -> Holder | None:
    """A container or object holding tensors, models or optimizers one level deep."""
    h = Holder(
        name=name,
        kind="container" if isinstance(obj, (Mapping, list, tuple, set, frozenset)) else "object",
        where=where,
        device="",
    )
    n_tensors = 0
    for v in _children(obj):
        if _torch.is_tensor(v):
            n, dev = counter.take(v)
            if n:
                n_tensors += 1
                h.tensor_bytes += n
                h.device = h.device or dev
        elif _torch.is_module(v):
            sub = _module_holder(name, where, v, counter)
            h.parameters_bytes += sub.parameters_bytes
            h.gradients_bytes += sub.gradients_bytes
            h.buffers_bytes += sub.buffers_bytes
            h.device = h.device or sub.device
        elif _torch.is_optimizer(v):
            sub = _optimizer_holder(name, where, v, counter)
            h.optimizer_state_bytes += sub.optimizer_state_bytes
            h.device = h.device or sub.device
    if h.total_bytes == 0:
        return None
    parts = [type(obj).__name__]
    if n_tensors:
        parts.append(f"{n_tensors} tensor{'s' if n_tensors != 1 else ''}")
    if h.parameters_bytes:
        parts.append("a model's weights")
    if h.optimizer_state_bytes:
        parts.append("optimizer state")
    h.detail = ", ".join(parts)
    return h


def _holder_for(name: str, where: str, obj: Any, counter: _Counter) -> Holder | None:
    if _torch.is_tensor(obj):
        n, dev = counter.take(obj)
        if not n:
            return None
        return Holder(
            name, "tensor", where, dev, tensor_bytes=n, detail=_describe_tensor(obj)
        )  # fmt: skip
    if _torch.is_module(obj):
        h = _module_holder(name, where, obj, counter)
        return h if h.total_bytes else None
    if _torch.is_optimizer(obj):
        h = _optimizer_holder(name, where, obj, counter)
        return h if h.total_bytes else None
    if isinstance(obj, _SKIP_TYPES):
        return None
    return _composite_holder(name, where, obj, counter)


def _rank(obj: Any) -> int:
    """Models first, then optimizers, then everything else: weights belong to the model."""
    if _torch.is_module(obj):
        return 0
    if _torch.is_optimizer(obj):
        return 1
    return 2


def failed_frames(tb: TracebackType | None, user_ns: Mapping[str, Any]) -> list[FrameType]:
    """The frames a failed cell left behind, minus the cell's own module frame (its locals are
    the user namespace)."""
    frames = []
    seen = 0
    while tb is not None and seen < 500:
        f = tb.tb_frame
        if not (f.f_code.co_name == "<module>" and f.f_globals is user_ns):
            frames.append(f)
        tb = tb.tb_next
        seen += 1
    return frames


def _frame_label(frame: FrameType) -> str:
    fname = frame.f_code.co_filename.rsplit("/", 1)[-1]
    if fname.startswith("<ipython-input") or fname.startswith("ipykernel_"):
        return f"{frame.f_code.co_name}()"
    return f"{frame.f_code.co_name}() in {fname}"


def find_holders(
    user_ns: Mapping[str, Any],
    *,
    hidden: Iterable[str] = (),
    frames: Iterable[FrameType] = (),
    cell_names: Iterable[str] = (),
    recreated: Iterable[str] = (),
) -> HolderSet:
    """Walk the namespace, the output cache and the failed frames; largest holder first."""
    result = HolderSet()
    if _torch.torch_module() is None:
        return result
    counter = _Counter()
    hidden_set = set(hidden)
    used = set(cell_names)
    fresh = set(recreated)
    variables: list[tuple[int, str, Any]] = []
    cache: list[tuple[str, Any]] = []
    for name, obj in list(user_ns.items()):
        result.scanned_names += 1
        if _OUTPUT_CACHE.match(name):
            if name == "Out" and isinstance(obj, Mapping):
                cache.extend((f"Out[{k}]", v) for k, v in list(obj.items())[-MAX_ITEMS:])
            elif name != "Out":
                cache.append((name, obj))
            continue
        if name in hidden_set or name.startswith("__") or _IPYTHON_NAMES.match(name):
            continue
        variables.append((_rank(obj), name, obj))
    variables.sort(key=lambda t: t[0])  # stable: namespace order within a rank

    for _r, name, obj in variables:
        h = _holder_for(name, "variable", obj, counter)
        if h is not None:
            h.used_by_cell = name in used
            h.recreated_by_cell = name in fresh
            result.holders.append(h)
    for name, obj in cache:
        h = _holder_for(name, "output cache", obj, counter)
        if h is not None:
            result.holders.append(h)
    for frame in frames:
        label = _frame_label(frame)
        try:
            local_items = list(frame.f_locals.items())
        except Exception:
            continue
        for name, obj in local_items:
            h = _holder_for(f"{name} in {label}", "failed frame", obj, counter)
            if h is not None:
                result.holders.append(h)
    result.holders.sort(key=lambda h: -h.total_bytes)
    return result

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

import gc
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from types import (
    BuiltinFunctionType,
    FrameType,
    FunctionType,
    MethodType,
    ModuleType,
    TracebackType,
)
from typing import Any

from .backends import _torch, simulated

SMALL_TENSOR_BYTES = 1 << 20  # variables holding less are summed into one "small tensors" row
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
    cut_short: int = 0  # containers/objects not looked into: the time budget ran out

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


_SKIP, _TENSOR, _MODEL, _OPTIMIZER, _COMPOSITE = range(1, 6)  # all truthy: `get() or kind()`


class _Scan:
    """One walk: counts each GPU storage once, classifies each type once.

    A namespace of 100k objects holds a few dozen types, so ``isinstance`` against torch's
    classes runs per type, not per object. Descriptions (shapes, parameter counts) are made only
    for the holders that will be shown.
    """

    def __init__(self, torch: Any, budget_s: float) -> None:
        self.deadline = time.perf_counter() + budget_s
        self.cut_short = 0  # containers and objects not looked into, once the budget ran out
        self.sim = simulated.current()
        self.sim_device = f"cuda:{self.sim.device_index} (simulated)" if self.sim else ""
        self.seen: set[tuple[str, int]] = set()
        self.kinds: dict[type, int] = {}
        self.tensor_cls, self.module_cls = torch.Tensor, torch.nn.Module
        self.optimizer_cls = torch.optim.Optimizer

    def kind(self, obj: Any) -> int:
        tp = type(obj)
        k = self.kinds.get(tp)
        if k is None:
            if issubclass(tp, self.tensor_cls):
                k = _TENSOR
            elif issubclass(tp, self.module_cls):
                k = _MODEL
            elif issubclass(tp, self.optimizer_cls):
                k = _OPTIMIZER
            elif issubclass(tp, _SKIP_TYPES):
                k = _SKIP
            else:
                k = _COMPOSITE
            self.kinds[tp] = k
        return k

    def take(self, t: Any) -> tuple[int, str]:
        if self.sim is not None:  # the hot path with thousands of simulated tensors: no layers
            counted = self.sim.counted_storage(t)
            if counted is None:
                return 0, ""
            key = (self.sim_device, counted[0])
            if key in self.seen:
                return 0, self.sim_device
            self.seen.add(key)
            return counted[1], self.sim_device
        info = _torch.gpu_storage(t)
        if info is None:
            return 0, ""
        key, nbytes, device = info
        if key in self.seen:
            return 0, device
        self.seen.add(key)
        return nbytes, device

    def module(self, name: str, where: str, module: Any) -> Holder:
        h = Holder(name=name, kind="model", where=where, device="")
        try:
            for p in module.parameters():
                n, dev = self.take(p)
                h.parameters_bytes += n
                h.device = h.device or dev
                if p.grad is not None:
                    g, dev = self.take(p.grad)
                    h.gradients_bytes += g
            for b in module.buffers():
                n, dev = self.take(b)
                h.buffers_bytes += n
                h.device = h.device or dev
        except Exception:
            pass
        return h

    def optim(self, name: str, where: str, opt: Any) -> Holder:
        h = Holder(name=name, kind="optimizer", where=where, device="")
        try:
            for state in list(opt.state.values())[: MAX_ITEMS * 10]:
                for v in state.values() if isinstance(state, Mapping) else ():
                    if self.kind(v) == _TENSOR:
                        n, dev = self.take(v)
                        h.optimizer_state_bytes += n
                        h.device = h.device or dev
        except Exception:
            pass
        return h

    def composite(self, name: str, where: str, obj: Any) -> Holder | None:
        """A container or object holding tensors, models or optimizers one level deep."""
        if time.perf_counter() > self.deadline:
            self.cut_short += 1
            return None
        if isinstance(obj, Mapping):
            values: Iterable[Any] = obj.values()
        elif isinstance(obj, (list, tuple, set, frozenset)):
            values = obj
        else:
            try:
                values = vars(obj).values()
            except TypeError:
                return None
        kinds = self.kinds
        found = [
            v
            for v in islice(values, MAX_ITEMS)
            if (kinds.get(type(v)) or self.kind(v)) not in (_SKIP, _COMPOSITE)
        ]
        if not found:
            return None
        h = Holder(name=name, kind="", where=where, device="")
        for v in found:
            k = self.kind(v)
            if k == _TENSOR:
                n, dev = self.take(v)
                h.tensor_bytes += n
                h.device = h.device or dev
            elif k == _MODEL:
                sub = self.module(name, where, v)
                h.parameters_bytes += sub.parameters_bytes
                h.gradients_bytes += sub.gradients_bytes
                h.buffers_bytes += sub.buffers_bytes
                h.device = h.device or sub.device
            else:
                sub = self.optim(name, where, v)
                h.optimizer_state_bytes += sub.optimizer_state_bytes
                h.device = h.device or sub.device
        if h.total_bytes == 0:
            return None
        h.kind = (
            "container" if isinstance(obj, (Mapping, list, tuple, set, frozenset)) else "object"
        )
        return h

    def holder(self, name: str, where: str, obj: Any) -> Holder | None:
        k = self.kind(obj)
        if k == _SKIP:
            return None
        if k == _TENSOR:
            n, dev = self.take(obj)
            return Holder(name, "tensor", where, dev, tensor_bytes=n) if n else None
        if k == _MODEL:
            h = self.module(name, where, obj)
        elif k == _OPTIMIZER:
            h = self.optim(name, where, obj)
        else:
            return self.composite(name, where, obj)
        return h if h.total_bytes else None


def _describe(scan: _Scan, h: Holder, obj: Any) -> str:
    k = scan.kind(obj)
    try:
        if k == _TENSOR:
            return f"{tuple(obj.shape)} {str(obj.dtype).replace('torch.', '')}"
        if k == _MODEL:
            count = sum(p.numel() for p in obj.parameters())
            return f"{type(obj).__name__}, {count / 1e6:.1f}M parameters"
        if k == _OPTIMIZER:
            return f"{type(obj).__name__}, state for {len(obj.state)} parameters"
    except Exception:
        return type(obj).__name__
    parts = [type(obj).__name__]
    if h.tensor_bytes:
        parts.append("tensors")
    if h.parameters_bytes:
        parts.append("a model's weights")
    if h.optimizer_state_bytes:
        parts.append("optimizer state")
    return ", ".join(parts)


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
    describe: int = 50,
    budget_s: float = 0.05,
) -> HolderSet:
    """Walk the namespace, the output cache and the failed frames; largest holder first.

    ``describe``: how many of the largest holders get a description (shape, parameter count).
    ``budget_s``: past this time, containers and objects are no longer looked into (tensors,
    models and optimizers still are); ``HolderSet.cut_short`` says how many were skipped.
    """
    result = HolderSet()
    torch = _torch.torch_module()
    if torch is None:
        return result
    # the scan allocates a tuple per variable: with gc on, that triggers collections that walk
    # every object torch created (most of the scan's time at 100k variables)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with _torch.no_torch_function():
            return _find(torch, user_ns, hidden, frames, cell_names, recreated, describe, budget_s)
    finally:
        if was_enabled:
            gc.enable()


def _find(
    torch: Any,
    user_ns: Mapping[str, Any],
    hidden: Iterable[str],
    frames: Iterable[FrameType],
    cell_names: Iterable[str],
    recreated: Iterable[str],
    describe: int,
    budget_s: float,
) -> HolderSet:
    result = HolderSet()
    scan = _Scan(torch, budget_s)
    hidden_set = set(hidden)
    used = set(cell_names)
    fresh = set(recreated)
    # models first, then optimizers, then the rest: weights belong to the model
    models: list[tuple[str, Any]] = []
    optimizers: list[tuple[str, Any]] = []
    rest: list[tuple[str, Any]] = []
    cache: list[tuple[str, Any]] = []
    kinds = scan.kinds
    for name, obj in list(user_ns.items()):
        if name[:1] == "_" or name == "Out" or name == "In":
            if _OUTPUT_CACHE.match(name):
                if name == "Out" and isinstance(obj, Mapping):
                    cache.extend((f"Out[{k}]", v) for k, v in list(obj.items())[-MAX_ITEMS:])
                elif name != "Out":
                    cache.append((name, obj))
                continue
            if name.startswith("__") or _IPYTHON_NAMES.match(name):
                continue
        if name in hidden_set:
            continue
        k = kinds.get(type(obj)) or scan.kind(obj)
        if k == _SKIP:
            continue
        (models if k == _MODEL else optimizers if k == _OPTIMIZER else rest).append((name, obj))
    result.scanned_names = len(user_ns)
    found: list[tuple[Holder, Any]] = []

    small = Holder("small tensors", "tensors", "variable", "")
    small_names: list[str] = []
    for name, obj in (*models, *optimizers, *rest):
        if kinds.get(type(obj)) == _TENSOR:
            n, dev = scan.take(obj)
            if not n:
                continue
            if n < SMALL_TENSOR_BYTES and name not in used and name not in fresh:
                # thousands of tiny tensors are one line, not thousands of rows to build and sort
                small.tensor_bytes += n
                small.device = small.device or dev
                small_names.append(name)
                continue
            h: Holder | None = Holder(name, "tensor", "variable", dev, tensor_bytes=n)
        elif kinds.get(type(obj)) == _COMPOSITE and time.perf_counter() > scan.deadline:
            scan.cut_short += 1  # out of time: count it without the call
            continue
        else:
            h = scan.holder(name, "variable", obj)
        if h is None:
            continue
        h.used_by_cell = name in used
        h.recreated_by_cell = name in fresh
        found.append((h, obj))
    if len(small_names) == 1:
        small.name, small.kind = small_names[0], "tensor"
    if small_names:
        small.detail = (
            f"{len(small_names)} tensors under {SMALL_TENSOR_BYTES >> 20} MiB each: "
            + ", ".join(small_names[:5])
            + (", ..." if len(small_names) > 5 else "")
        )
        found.append((small, None))
    for name, obj in cache:
        h = scan.holder(name, "output cache", obj)
        if h is not None:
            found.append((h, obj))
    for frame in frames:
        label = _frame_label(frame)
        try:
            local_items = list(frame.f_locals.items())
        except Exception:
            continue
        for name, obj in local_items:
            h = scan.holder(f"{name} in {label}", "failed frame", obj)
            if h is not None:
                found.append((h, obj))
    found.sort(key=lambda ho: -ho[0].total_bytes)
    for h, obj in found[:describe]:
        if obj is not None:
            h.detail = _describe(scan, h, obj)
    result.holders = [h for h, _ in found]
    result.cut_short = scan.cut_short
    return result

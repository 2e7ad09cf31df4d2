"""Who holds GPU memory, by name: variables, models (weights, gradients, buffers), optimizers
(state), containers of those one level deep, the failed frames' locals, and the output cache.

Each storage is counted once, for the first holder that reaches it, in this order: models,
optimizers, tensors, containers and other objects among the user's variables; then the output cache;
then the failed frames. So a tensor that is both a global and a local of the failed frame is the
global's (the failure does not pin it), and tied or shared weights are counted once.

Only the user namespace and the frames are walked, never every gc object, so the cost is bounded by
the namespace (containers and object attributes: at most ``MAX_ITEMS`` entries each). No object's
own code runs: ``holders_scan`` reads them through C. One that cannot be read is skipped and
counted in ``HolderSet.skipped``; the scan goes on.
"""

from __future__ import annotations

import gc
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, cast

from jupyter_gpumem.backends import MemoryBackend, torch_objects
from jupyter_gpumem.readings.holder_frames import failed_frames, frame_locals
from jupyter_gpumem.readings.holder_scan import (
    _ALIEN,
    _MODEL,
    _OBJECT,
    _OPTIMIZER,
    _SKIP,
    _TENSOR,
    MAX_ITEMS,
    Scan,
    type_name,
)

__all__ = [
    "CLOCK_EVERY_NAME",
    "SMALL_TENSOR_BYTES",
    "Holder",
    "HolderSet",
    "failed_frames",
    "find_holders",
]

SMALL_TENSOR_BYTES = 1 << 20  # variables holding less are summed into one "small tensors" row
CLOCK_EVERY_NAME = 1024  # variables between two reads of the clock
_OUTPUT_CACHE = re.compile(r"^(_+|_\d+|Out)$")
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
    # objects that could not be read without running their own code, or that failed to read:
    # left out of the holders, never a reason to lose the diagnosis
    skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)  # a few "name: why"
    # the class names of the optimizers met, those without state yet too (an AdamW before its
    # first step holds nothing, but its moments are coming)
    optimizer_types: list[str] = field(default_factory=list)

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


def _holder(scan: Scan, name: str, where: str, obj: Any) -> Holder | None:
    """The holder ``obj`` is, or None when it holds no GPU memory (or was skipped)."""
    k = scan.kind(obj)
    if k == _SKIP:
        return None
    if k == _TENSOR:
        n, dev = scan.take(obj)
        return Holder(name, "tensor", where, dev, tensor_bytes=n) if n else None
    if k == _ALIEN:
        scan.skip(name, f"a {type_name(type(obj))} tensor, which redefines how it is read")
        return None
    if k == _MODEL:
        h = Holder(name=name, kind="model", where=where, device="")
        _add_module(scan, h, name, obj)
    elif k == _OPTIMIZER:
        h = Holder(name=name, kind="optimizer", where=where, device="")
        scan.optimizer_types.append(type_name(type(obj)))
        h.optimizer_state_bytes, h.device = scan.optimizer(obj)
    else:
        found = scan.contents(obj)
        if not found:
            return None
        h = Holder(name, "object" if k == _OBJECT else "container", where, "")
        for v in found:
            vk = scan.kind(v)
            if vk == _TENSOR:
                n, dev = scan.take(v)
                h.tensor_bytes += n
                h.device = h.device or dev
            elif vk == _MODEL:
                _add_module(scan, h, name, v)
            elif vk == _OPTIMIZER:
                n, dev = scan.optimizer(v)
                h.optimizer_state_bytes += n
                h.device = h.device or dev
            else:
                scan.skip(name, f"a {type_name(type(v))} tensor, which redefines how it is read")
    return h if h.total_bytes else None


def _add_module(scan: Scan, h: Holder, name: str, module: Any) -> None:
    got = scan.module(name, module)
    h.parameters_bytes += got["parameter"]
    h.gradients_bytes += got["gradient"]
    h.buffers_bytes += got["buffer"]
    h.device = h.device or got["device"]


def _describe(scan: Scan, h: Holder, obj: Any) -> str:
    tp = type(obj)
    k = scan.kind(obj)
    try:
        if k == _TENSOR:
            return scan.describe_tensor(obj)
        if k == _MODEL:
            count = scan.parameter_count(obj)
            return f"{type_name(tp)}, {count / 1e6:.1f}M parameters"
        if k == _OPTIMIZER:
            return f"{type_name(tp)}, state for {scan.optimizer_entries(obj)} parameters"
    except Exception:
        return type_name(tp)
    parts = [type_name(tp)]
    if h.tensor_bytes:
        parts.append("tensors")
    if h.parameters_bytes:
        parts.append("a model's weights")
    if h.optimizer_state_bytes:
        parts.append("optimizer state")
    return ", ".join(parts)


def find_holders(
    user_ns: Mapping[str, Any],
    *,
    hidden: Iterable[str] = (),
    frames: Iterable[FrameType] = (),
    cell_names: Iterable[str] = (),
    recreated: Iterable[str] = (),
    describe: int = 50,
    budget_s: float = 0.05,
    hard_s: float = 0.5,
    backend: MemoryBackend | None = None,
) -> HolderSet:
    """Walk the namespace, the output cache and the failed frames; largest holder first.

    No object's own code runs (see ``holders_scan``). ``describe``: how many of the largest
    holders get a description (shape, parameter count). ``budget_s``: past this time,
    containers and objects are no longer looked into, nor further into (the clock is read every
    few hundred items); tensors, models and optimizers still are, until ``hard_s``, past which
    nothing more is read (a guard against a million variables or a model of a million
    parameters, not a target). ``HolderSet.cut_short`` counts what was left out for time,
    ``HolderSet.skipped`` what could not be read.
    """
    result = HolderSet()
    torch = torch_objects.torch_module()
    if torch is None:
        return result
    # the scan allocates a tuple per variable: with gc on, that triggers collections that walk
    # every object torch created (most of the scan's time at 100k variables)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with torch_objects.no_torch_function():
            scan = Scan(torch, budget_s, hard_s, backend)
            return _find(scan, user_ns, hidden, frames, cell_names, recreated, describe)
    finally:
        if was_enabled:
            gc.enable()


def _namespace(
    scan: Scan, user_ns: Mapping[str, Any], hidden: set[str]
) -> tuple[list[tuple[str, Any, int]], list[tuple[str, Any]]]:
    """((name, value, kind) of the variables: models, then optimizers, then the rest; the
    output cache)."""
    models: list[tuple[str, Any, int]] = []
    optimizers: list[tuple[str, Any, int]] = []
    rest: list[tuple[str, Any, int]] = []
    cache: list[tuple[str, Any]] = []
    kinds, classify = scan.kinds, scan._classify
    items = (
        list(dict.items(cast("dict[str, Any]", user_ns)))
        if issubclass(type(user_ns), dict)
        else list(user_ns.items())
    )
    special = set(hidden) | {"Out", "In"}
    for name, obj in items:
        k = kinds.get(id(type(obj))) or classify(type(obj))
        if k == _SKIP or type(name) is not str:  # globals()[1] = ...: no variable to name
            continue
        if name[:1] == "_" or name in special:
            if _OUTPUT_CACHE.match(name):
                if name == "Out" and issubclass(type(obj), dict):
                    out = list(dict.items(obj))[-MAX_ITEMS:]
                    cache.extend((f"Out[{key}]", v) for key, v in out if type(key) is int)
                elif name != "Out":
                    cache.append((name, obj))
                continue
            if name in hidden or name.startswith("__") or _IPYTHON_NAMES.match(name):
                continue
        (models if k == _MODEL else optimizers if k == _OPTIMIZER else rest).append((name, obj, k))
    return [*models, *optimizers, *rest], cache


def _find(
    scan: Scan,
    user_ns: Mapping[str, Any],
    hidden: Iterable[str],
    frames: Iterable[FrameType],
    cell_names: Iterable[str],
    recreated: Iterable[str],
    describe: int,
) -> HolderSet:
    result = HolderSet()
    # models first, then optimizers, then the rest: weights belong to the model
    variables, cache = _namespace(scan, user_ns, set(hidden))
    result.scanned_names = len(user_ns)
    found = _variable_holders(scan, variables, set(cell_names), set(recreated))
    for name, obj in cache:
        h = _guarded(scan, name, "output cache", obj)
        if h is not None:
            found.append((h, obj))
    for name, obj in frame_locals(scan, frames):
        h = _guarded(scan, name, "failed frame", obj)
        if h is not None:
            found.append((h, obj))
    found.sort(key=lambda ho: -ho[0].total_bytes)
    for h, obj in found[:describe]:
        if obj is not None:
            h.detail = _describe(scan, h, obj)
    result.holders = [h for h, _ in found]
    result.cut_short = scan.cut_short
    result.skipped = scan.skipped
    result.skipped_reasons = scan.reasons
    result.optimizer_types = sorted(set(scan.optimizer_types))
    return result


def _variable_holders(
    scan: Scan, variables: list[tuple[str, Any, int]], used: set[str], fresh: set[str]
) -> list[tuple[Holder, Any]]:
    """The namespace's variables, with the clock read once per block of names: past the hard
    deadline the rest are counted without reading; once late, containers and other objects are.
    Tensors under ``SMALL_TENSOR_BYTES`` the cell neither uses nor rebuilds become one holder."""
    found: list[tuple[Holder, Any]] = []
    h: Holder | None
    small = Holder("small tensors", "tensors", "variable", "")
    small_names: list[str] = []
    for start in range(0, len(variables), CLOCK_EVERY_NAME):
        if time.perf_counter() > scan.hard_deadline:
            scan.cut_short += len(variables) - start  # out of time: count them without reading
            break
        for name, obj, k in variables[start : start + CLOCK_EVERY_NAME]:
            if k < _TENSOR and scan.late:
                scan.cut_short += 1  # out of time: count it without looking into it
                continue
            if k != _TENSOR:
                h = _guarded(scan, name, "variable", obj)
            else:
                try:
                    n, dev = scan.take(obj)
                except Exception as exc:
                    scan.skip(name, f"reading it raised {type_name(type(exc))}")
                    continue
                if not n:
                    continue
                if n < SMALL_TENSOR_BYTES and name not in used and name not in fresh:
                    # thousands of tiny tensors are one line, not thousands of rows to sort
                    small.tensor_bytes += n
                    small.device = small.device or dev
                    small_names.append(name)
                    continue
                h = Holder(name, "tensor", "variable", dev, tensor_bytes=n)
            if h is None:
                continue
            h.used_by_cell = name in used
            h.recreated_by_cell = name in fresh
            found.append((h, obj))
    if small_names:
        found.append((_small_tensors(small, small_names), None))
    return found


def _small_tensors(small: Holder, names: list[str]) -> Holder:
    """The small tensors' one holder, named after its tensor when there is only one."""
    if len(names) == 1:
        small.name, small.kind = names[0], "tensor"
    small.detail = (
        f"{len(names)} tensors under {SMALL_TENSOR_BYTES >> 20} MiB each: "
        + ", ".join(names[:5])
        + (", ..." if len(names) > 5 else "")
    )
    return small


def _guarded(scan: Scan, name: str, where: str, obj: Any) -> Holder | None:
    """One object that fails to read is skipped and counted; the scan goes on."""
    try:
        return _holder(scan, name, where, obj)
    except Exception as exc:
        scan.skip(name, f"reading it raised {type_name(type(exc))}")
        return None

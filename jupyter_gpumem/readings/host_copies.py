"""The failed frames' GPU locals moved to host memory, in place, so ``%debug`` still shows them.

Each local of a finished frame that holds GPU memory is rebound: a tensor to a detached host copy
(same shape, dtype and values: ``torch_state.copy_tensor``), a plain list, tuple or dict (two levels)
to a new one around such copies, anything else that holds GPU memory (a model built in the function,
a ``ModelOutput``) to a :class:`MovedOut` describing it. Copies are made smallest first while the
host memory available (less :data:`HOST_MARGIN_BYTES` or a tenth of it) lasts; a tensor past that
is described too. Objects are read as the holders scan reads them (``holder_scan.Scan``): no
object's own code runs.

Then the frames' originals are let go and a young-generation gc runs: an original still alive is
held by something else (a global passed in, the model as ``self``, a parameter), so moving it freed
nothing, and it is put back. What a copy does not keep: ``requires_grad``, the autograd graph
(dropping it is what frees the activations), the device (``cpu``).
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass
from types import FrameType
from typing import Any

from jupyter_gpumem.backends import MemoryBackend
from jupyter_gpumem.backends.torch_objects import torch_module
from jupyter_gpumem.backends.torch_state import copy_tensor, tensor_bytes
from jupyter_gpumem.readings.holder_frames import _LOCALS_TYPES, _frame_label, write_locals
from jupyter_gpumem.readings.holder_scan import (
    _ALIEN,
    _MODEL,
    _OPTIMIZER,
    _SKIP,
    _TENSOR,
    MAX_ITEMS,
    Scan,
    type_name,
)
from jupyter_gpumem.units import format_bytes

__all__ = ["HOST_MARGIN_BYTES", "MovedLocal", "MovedOut", "host_budget_bytes", "move_to_host"]

# host memory left to the rest of the machine beyond the copies: the larger of this and a tenth
# of what is available
HOST_MARGIN_BYTES = 1 << 30
_PLAIN = (list, tuple, dict)  # containers rebuilt with host copies (exactly these types)
_NOT_COPIED = "not a tensor or a plain list, tuple or dict of tensors"


@dataclass(frozen=True)
class MovedLocal:
    """One failed frame's local that held GPU memory, and what the frame holds now."""

    name: str  # "x in f()"
    what: str  # "cuda:0 float32 [4096, 4096]", "list of 3 tensors", "Net"
    gpu_bytes: int  # the GPU storage it held
    host_bytes: int  # host memory its copy takes (0 where not kept)
    kept: bool  # a host copy is in the frame; else a MovedOut describing it
    why: str = ""  # why it was not kept


class MovedOut:
    """What a failed frame's local held, in its place where no host copy could be kept."""

    __slots__ = ("nbytes", "what", "why")

    def __init__(self, what: str, nbytes: int, why: str) -> None:
        self.what, self.nbytes, self.why = what, nbytes, why

    def __repr__(self) -> str:
        return f"<moved out: {self.what}, {format_bytes(self.nbytes)}, not kept: {self.why}>"

    __str__ = __repr__


def host_available_bytes() -> int | None:
    """Host memory the machine can give without swapping (psutil's ``available``, else Linux's
    MemAvailable); None where neither can be read."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_budget_bytes() -> int | None:
    """What the copies may take: available host memory less the margin; None: unknown."""
    available = host_available_bytes()
    if available is None:
        return None
    return max(available - max(HOST_MARGIN_BYTES, available // 10), 0)


class _Leaf:
    """A tensor or object a local reaches, held weakly: its replacement is held instead."""

    __slots__ = ("gpu_bytes", "host_bytes", "kept", "ref", "replacement", "tensor", "what", "why")

    def __init__(self, obj: Any, what: str, gpu_bytes: int, host_bytes: int | None) -> None:
        self.ref = weakref.ref(obj)
        self.tensor = host_bytes is not None  # else an object, described, never copied
        self.what, self.gpu_bytes, self.host_bytes = what, gpu_bytes, host_bytes or 0
        self.kept, self.why = False, _NOT_COPIED
        self.replacement: Any = MovedOut(what, gpu_bytes, _NOT_COPIED)

    def describe(self, why: str) -> None:
        self.kept, self.why = False, why
        self.replacement = MovedOut(self.what, self.gpu_bytes, why)

    def value(self, settled: bool, rebindable: frozenset[int] = frozenset()) -> Any:
        """The replacement; once ``settled`` (the frames let go, gc ran), the original where
        something else keeps it alive: moving it freed nothing. Except a tensor a notebook
        variable holds (``rebindable``, by id) whose host copy was made: the frame keeps the copy,
        so the GPU tensor goes when the variable is bound again (a cell run twice: ``x =
        torch.randn(...)`` again frees the old ``x``, which the first failure's frames pinned)."""
        original = self.ref() if settled else None
        if original is None or (self.kept and self.tensor and id(original) in rebindable):
            return self.replacement
        return original


class _Container:
    """A plain list, tuple or dict whose items include leaves: rebuilt around their values."""

    __slots__ = ("items", "kind")

    def __init__(self, kind: type, items: list[tuple[Any, Any]]) -> None:
        self.kind, self.items = kind, items  # (key, value | _Leaf | _Container)

    def leaves(self, name: str) -> list[tuple[str, _Leaf]]:
        """(how the user reaches it, leaf): ``batch['x']``, ``pair[0]``."""
        out: list[tuple[str, _Leaf]] = []
        for k, v in self.items:
            if isinstance(v, _Leaf):
                out.append((f"{name}[{k!r}]", v))
            elif isinstance(v, _Container):
                out += v.leaves(f"{name}[{k!r}]")
        return out

    def value(self, settled: bool, rebindable: frozenset[int] = frozenset()) -> Any:
        values = [
            (k, v.value(settled, rebindable) if isinstance(v, (_Leaf, _Container)) else v)
            for k, v in self.items
        ]
        if self.kind is dict:
            return dict(values)
        return self.kind(v for _, v in values)


class _Planner:
    """What each local holds on the GPU, read without running the objects' code (``Scan``)."""

    def __init__(self, scan: Scan) -> None:
        self.scan = scan
        self.leaves: dict[int, _Leaf] = {}  # id(original): the same object, one leaf

    def plan(self, value: Any, depth: int = 0) -> _Leaf | _Container | None:
        leaf = self.leaves.get(id(value))
        if leaf is not None and leaf.ref() is value:
            return leaf
        kind = self.scan.kind(value)
        if kind == _TENSOR:
            return self._tensor(value)
        if type(value) in _PLAIN and depth < 2:
            return self._container(value, depth)
        if kind in (_SKIP, _TENSOR):
            return None
        gpu = self._held(value, kind)
        if not gpu:
            return None
        try:
            leaf = _Leaf(value, _object_what(value, kind), gpu, None)
        except TypeError:  # not weakly referenceable: left as it is
            return None
        self.leaves[id(value)] = leaf
        return leaf

    def _tensor(self, t: Any) -> _Leaf | None:
        info = self.scan.storage_of(t)
        if info is None:
            return None
        shape = ", ".join(str(n) for n in t.shape)  # a plain tensor (kind): C descriptors
        dtype = str(t.dtype).replace("torch.", "")
        what = f"{info[2].split(' ')[0]} {dtype} [{shape}]"
        leaf = _Leaf(t, what, info[1], tensor_bytes(t))
        self.leaves[id(t)] = leaf
        return leaf

    def _container(self, value: Any, depth: int) -> _Container | None:
        pairs = dict.items(value) if type(value) is dict else enumerate(value)
        items: list[tuple[Any, Any]] = []
        found = False
        for i, (key, v) in enumerate(pairs):
            node = self.plan(v, depth + 1) if i < MAX_ITEMS else None
            found = found or node is not None
            items.append((key, v if node is None else node))
        return _Container(type(value), items) if found else None

    def _held(self, value: Any, kind: int) -> int:
        """GPU bytes an object other than a tensor holds: a model's or optimizer's tensors, or
        what a container or object refers to one level down."""
        scan = self.scan
        if kind == _MODEL:
            return sum(v for k, v in scan.module("", value).items() if k != "device")
        if kind == _OPTIMIZER:
            return scan.optimizer(value)[0]
        if kind == _ALIEN:
            return 0  # a tensor subclass that redefines its reads: not read
        total = 0
        for v in scan.contents(value) or ():
            k = scan.kind(v)
            total += (scan.storage_of(v) or ((), 0, ""))[1] if k == _TENSOR else self._held(v, k)
        return total


def _object_what(value: Any, kind: int) -> str:
    noun = {_MODEL: "model", _OPTIMIZER: "optimizer"}.get(kind, "object")
    return f"a {type_name(type(value))} {noun}"


def _frame_plans(
    planner: _Planner, frames: list[FrameType]
) -> list[tuple[FrameType, dict[str, _Leaf | _Container]]]:
    out = []
    for frame in frames:
        try:
            f_locals = frame.f_locals
            if type(f_locals) not in _LOCALS_TYPES:
                continue
            items = list(dict.items(f_locals) if type(f_locals) is dict else f_locals.items())
        except Exception:
            continue
        plans = {}
        for name, value in items:
            node = planner.plan(value)
            if node is not None:
                plans[name] = node
        del items
        if plans:
            out.append((frame, plans))
    return out


def _copy_within(leaves: list[_Leaf], budget: int | None) -> None:
    """Host copies for the tensors, smallest first, while the budget lasts; the rest described."""
    left = budget
    for leaf in sorted(leaves, key=lambda x: x.host_bytes):
        original = leaf.ref()
        if original is None or not leaf.tensor:
            continue  # an object keeps its description
        if left is None:
            leaf.describe("the host memory available could not be read")
        elif leaf.host_bytes > left:
            leaf.describe("host memory too small")
        else:
            try:
                leaf.replacement = copy_tensor(original).data
            except Exception as exc:
                leaf.describe(f"copying it failed ({type(exc).__name__})")
                continue
            leaf.kept, leaf.why = True, ""
            left -= leaf.host_bytes
        del original


def move_to_host(
    frames: list[FrameType],
    backend: MemoryBackend,
    budget: int | None = None,
    rebindable: frozenset[int] = frozenset(),
) -> tuple[list[MovedLocal], list[FrameType]]:
    """Rebind every GPU-holding local of ``frames`` to its host copy or description; returns
    what was moved (held elsewhere: put back, not listed; a tensor a notebook variable holds,
    by id in ``rebindable``, keeps its host copy in the frame, not listed either) and the frames
    whose locals this Python could not write."""
    torch = torch_module()
    if torch is None or not frames:
        return [], []
    planner = _Planner(Scan(torch, 2.0, 5.0, backend))
    plans = _frame_plans(planner, frames)
    if not plans:
        return [], []
    leaves = list(planner.leaves.values())
    _copy_within(leaves, host_budget_bytes() if budget is None else budget)
    unwritten = [f for f, p in plans if not _write(f, p, settled=False)]
    gc.collect(1)  # the originals that only the frames held are gone now
    shared = {id(leaf) for leaf in leaves if leaf.ref() is not None}
    for frame, p in plans:
        if frame not in unwritten and any(id(x) in shared for _, x in _leaves_of(p)):
            _write(frame, p, settled=True, rebindable=rebindable)  # held elsewhere: back
    moved = []
    counted: set[int] = set()  # a tensor several frames hold (args, x, self's input) is one copy
    for frame, p in plans:
        label = _frame_label(frame)
        for name, node in p.items():
            for path, x in _leaves_of({name: node}):
                if id(x) in shared:
                    continue
                first = id(x) not in counted
                counted.add(id(x))
                moved.append(
                    MovedLocal(f"{path} in {label}", x.what, x.gpu_bytes if first else 0,
                               x.host_bytes if x.kept and first else 0, x.kept, x.why)
                )  # fmt: skip
    return moved, unwritten


def _leaves_of(plans: dict[str, _Leaf | _Container]) -> list[tuple[str, _Leaf]]:
    out: list[tuple[str, _Leaf]] = []
    for name, node in plans.items():
        out += [(name, node)] if isinstance(node, _Leaf) else node.leaves(name)
    return out


def _write(
    frame: FrameType,
    plans: dict[str, _Leaf | _Container],
    *,
    settled: bool,
    rebindable: frozenset[int] = frozenset(),
) -> bool:
    try:
        values = {name: node.value(settled, rebindable) for name, node in plans.items()}
        return write_locals(frame, values)
    except Exception:
        return False

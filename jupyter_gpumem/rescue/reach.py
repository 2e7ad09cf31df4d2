"""What a fix's snapshot must cover: every object a cell's names reach, what copying them costs, and
what cannot be copied at all.

A re-run can change only what the cell (or the notebook code it calls) reaches through the names
it uses, so the snapshot walks from those names, at any depth and length (``d["a"]["b"][2]``,
item 2500 of a list), through containers, objects' ``__dict__`` and ``__slots__``, closure cells,
default arguments and attributes of notebook functions, ``functools.partial``s, bound methods, the
class attributes of notebook classes, and the globals that notebook functions and methods read.
The attributes of modules the notebook imported from its own folder, and the logging handlers'
streams, are reached too. Models, optimizers and tensors end the walk: their state is copied
whole (``backends.torch_state``). Nothing of the user's runs: objects are read by their type
(``safe``), under a time budget; an object that cannot be read is skipped and counted.

What the walk finds that no copy can put back is named (``Reach.not_covered``): generators,
iterators without a state to set, sockets, databases, threads, a NumPy array too large to copy.
The host memory the copy takes is counted here, before anything is copied, so that
``transaction.take`` can refuse a snapshot that would not fit instead of running the machine out
of memory.
"""

from __future__ import annotations

import collections
import functools
import gc
import sys
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from jupyter_gpumem.backends import torch_objects, torch_state
from jupyter_gpumem.rescue import safe
from jupyter_gpumem.rescue.kinds import (
    BUILTIN_METHOD,
    BYTEARRAY,
    CLASS,
    CONTAINERS,
    DICT,
    EXTERNAL,
    EXTERNAL_TYPES,
    FILE,
    FILE_TYPES,
    FUNCTION,
    GENERATOR,
    ITERATOR,
    METHOD,
    MODEL,
    NDARRAY,
    OBJECT,
    OPAQUE,
    OPTIMIZER,
    PARTIAL,
    PLAIN,
    RNG,
    SKIP,
    TENSOR,
    TORCH_STATE,
    WALK,
    classify,
    code_names,
    container_bytes,
    container_kind,
    iterate,
    local_modules,
    logging_handlers,
)
from jupyter_gpumem.units import format_bytes

# A CPU tensor or NumPy array larger than this is not copied: a tensor's version counter tells
# whether a rehearsal wrote to it (then the rollback says so); an array is named as not covered.
# GPU tensors are always copied: they fit in host memory.
BIG_HOST_TENSOR_BYTES = 256 << 20
WALK_SECONDS = 5.0  # the walk's budget: past it, what it did not reach is named
MAX_OBJECTS = 2_000_000
_OPAQUE_REFERENTS = 64  # what an object without a __dict__ refers to (a csv.writer's file)

_FUNC = {k: types.FunctionType.__dict__[k] for k in ("__closure__", "__defaults__", "__kwdefaults__", "__globals__", "__code__")}  # fmt: skip
_METHOD = {k: types.MethodType.__dict__[k] for k in ("__self__", "__func__")}
_BUILTIN_SELF = types.BuiltinMethodType.__dict__["__self__"]
_WRAPPED = ("__wrapped__", "_torchdynamo_orig_callable")
_PARTIAL = {k: functools.partial.__dict__[k] for k in ("func", "args", "keywords")}


@dataclass
class Reached:
    where: str  # the name it was reached from
    obj: Any
    kind: int


@dataclass
class Reach:
    """What the snapshot will copy (``items``), the host memory that takes, and what it cannot."""

    items: list[Reached] = field(default_factory=list)
    nbytes: int = 0
    not_covered: list[str] = field(default_factory=list)
    skipped: int = 0  # objects that could not be read (a raising __class__, a dead proxy, ...)
    modules: list[types.ModuleType] = field(default_factory=list)  # the notebook's own modules


def survey(ns: dict[str, Any], names: Iterable[str], *, seconds: float = WALK_SECONDS) -> Reach:
    """What a re-run of a cell using ``names`` can change, walked from them; nothing is copied.
    ``Reach.not_covered`` says, before a fix runs, what no rollback could put back."""
    walker = _Walker(ns, seconds)
    roots = [(n, ns[n]) for n in sorted(names) if n in ns and not n.startswith("_")]
    modules = walker.local
    for module in modules:
        d = safe.instance_dict(module) or {}
        roots += [(module.__name__ + "." + k, v) for k, v in d.items() if not k.startswith("__")]
    roots += [("a logging handler", h) for h in logging_handlers()]
    walker.walk(roots)
    reach = walker.reach
    reach.modules = modules
    if walker.budget.skipped:
        reach.skipped = walker.budget.skipped
        reach.not_covered += walker.budget.reasons
        more = walker.budget.skipped - len(walker.budget.reasons)
        if more > 0:
            reach.not_covered.append(f"{more} more object{'s' if more > 1 else ''} not readable")
    return reach


def plan_snapshot(ns: dict[str, Any], names: Iterable[str]) -> tuple[list[tuple[str, Any]], int]:
    """(name, object) of what the snapshot copies, and the host memory that takes."""
    reach = survey(ns, names)
    return [(r.where, r.obj) for r in reach.items], reach.nbytes


class _Walker:
    """One walk: each object once, each type classified once."""

    def __init__(self, ns: dict[str, Any], seconds: float) -> None:
        self.ns = ns
        self.reach = Reach()
        self.budget = safe.Budget(seconds)
        self.seen: set[int] = set()
        self.kinds: dict[int, int] = {}
        self._types: list[type] = []  # keeps the ids above meaning the same types
        self.local = local_modules(ns)
        self.local_names = {"__main__"} | {m.__name__ for m in self.local}
        self.notebook_globals: list[dict[str, Any] | None] = [ns]
        self.notebook_globals += [safe.instance_dict(m) for m in self.local]
        self.torch = torch_objects.torch_module()
        self.np = sys.modules.get("numpy")

    def walk(self, roots: list[tuple[str, Any]]) -> None:
        todo: collections.deque[tuple[str, Any]] = collections.deque(reversed(roots))
        count = 0
        while todo:
            where, obj = todo.pop()
            if id(obj) in self.seen:
                continue
            count += 1
            if count > MAX_OBJECTS or (count % 256 == 0 and self.budget.expired()):
                left = sorted({w for w, _ in todo} | {where})
                self.reach.not_covered.append(
                    f"what {_names(left)} reach beyond the first {count - 1:,} objects "
                    "(the snapshot's walk ran out of time)"
                )
                return
            self.seen.add(id(obj))
            try:
                children = self.visit(where, obj)
            except Exception as exc:  # a hostile object: skipped and counted
                self.budget.skip(where, exc)
                continue
            todo.extend((where, c) for c in children if type(c) not in PLAIN)

    def kind(self, obj: Any) -> int:
        tp = type(obj)
        k = self.kinds.get(id(tp))
        if k is None:
            k = self.kinds[id(tp)] = classify(tp)
            self._types.append(tp)
        return k

    def visit(self, where: str, obj: Any) -> Iterable[Any]:
        """Count what copying ``obj`` takes; returns what it refers to, to walk next."""
        k = self.kind(obj)
        if k == SKIP:
            return ()
        handler = _VISITORS.get(k)
        if handler is not None:
            return handler(self, where, obj, k)
        return ()

    def keep(self, where: str, obj: Any, kind: int, nbytes: int) -> None:
        self.reach.items.append(Reached(where, obj, kind))
        self.reach.nbytes += nbytes

    def uncovered(self, where: str, what: str) -> None:
        self.reach.not_covered.append(f"`{where}` ({what})" if where else what)

    def is_notebook(self, namespace: Any) -> bool:
        return any(namespace is g for g in self.notebook_globals if g is not None)


# ---- one visitor per kind ---------------------------------------------------------------------


def _visit_container(w: _Walker, where: str, obj: Any, k: int) -> Iterable[Any]:
    w.keep(where, obj, k, container_bytes(obj, k))
    if k == DICT:
        return [x for kv in dict.items(obj) for x in kv]
    if k == BYTEARRAY:
        return ()
    return iterate(obj)


def _visit_walk(w: _Walker, where: str, obj: Any, k: int) -> Iterable[Any]:
    return iterate(obj)


def _visit_object(w: _Walker, where: str, obj: Any, k: int) -> Iterable[Any]:
    d = safe.instance_dict(obj)
    slots = safe.slot_descriptors(type(obj))
    if d is None and not slots:
        return _visit_opaque(w, where, obj, k)
    values = safe.slot_values(obj, slots)
    w.keep(where, obj, OBJECT, (dict.__sizeof__(d) if d is not None else 0) + 8 * len(values))
    children = list(dict.values(d)) if d is not None else []
    children += values.values()
    children.append(type(obj))  # its class: the class attributes of a notebook class
    return children


def _visit_class(w: _Walker, where: str, obj: Any, k: int) -> Iterable[Any]:
    if safe.type_module(obj) not in w.local_names:
        return ()
    ns = safe.class_dict(obj)
    w.keep(where, obj, CLASS, 64 * len(ns))
    children = [v for key, v in ns.items() if not key.startswith("__")]
    for v in list(children):
        if type(v) in (staticmethod, classmethod):
            children.append(v.__func__)
    return children


def _visit_function(w: _Walker, where: str, obj: Any, k: int) -> Iterable[Any]:
    g = _FUNC["__globals__"].__get__(obj)
    if not w.is_notebook(g):
        # a library's function: its state is the library's, but a decorator's or
        # torch.compile's wrapper leads to the notebook function it wraps
        d = safe.instance_dict(obj) or {}
        return [v for k, v in d.items() if k in _WRAPPED]
    cells = _FUNC["__closure__"].__get__(obj) or ()
    d = safe.instance_dict(obj) or {}
    w.keep(where, obj, FUNCTION, 8 * len(cells) + dict.__sizeof__(d))
    children: list[Any] = []
    for cell in cells:
        try:
            children.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    children += [_FUNC["__defaults__"].__get__(obj), _FUNC["__kwdefaults__"].__get__(obj)]
    children += dict.values(d)
    # the globals it reads: a global list a method appends to
    for name in code_names(_FUNC["__code__"].__get__(obj)):
        if name in g and not name.startswith("__"):
            children.append(dict.__getitem__(g, name))
    return [c for c in children if c is not None]


def _visit_method(w: _Walker, where: str, obj: Any, k: int) -> Iterable[Any]:
    return [_METHOD["__self__"].__get__(obj), _METHOD["__func__"].__get__(obj)]


def _visit_builtin_method(w: _Walker, where: str, obj: Any, k: int) -> Iterable[Any]:
    # `add = history.append`: the list behind it (a builtin function's is its module: skipped)
    return [_BUILTIN_SELF.__get__(obj)]


def _visit_partial(w: _Walker, where: str, obj: Any, k: int) -> Iterable[Any]:
    fn, args, keywords = (_PARTIAL[a].__get__(obj) for a in ("func", "args", "keywords"))
    return [fn, *args, keywords]


def _visit_torch(w: _Walker, where: str, obj: Any, k: int) -> Iterable[Any]:
    if k == MODEL:
        w.keep(where, obj, k, torch_state.module_bytes(obj))
    elif k == OPTIMIZER:
        w.keep(where, obj, k, torch_state.optimizer_bytes(obj))
    elif k == TENSOR:
        size = torch_state.tensor_bytes(obj)
        small = torch_state.on_gpu(obj) or size <= BIG_HOST_TENSOR_BYTES
        w.keep(where, obj, k, size if small else 0)
    else:
        w.keep(where, obj, k, 4096)
    return ()


def _visit_ndarray(w: _Walker, where: str, obj: Any, k: int) -> Iterable[Any]:
    np = w.np
    assert np is not None
    nbytes = int(np.ndarray.nbytes.__get__(obj))
    if not np.ndarray.flags.__get__(obj).writeable:
        return ()
    if nbytes > BIG_HOST_TENSOR_BYTES:
        w.uncovered(where, f"a NumPy array of {format_bytes(nbytes)}, too large to copy")
        return ()
    w.keep(where, obj, k, nbytes)
    return ()


def _visit_keep(w: _Walker, where: str, obj: Any, k: int) -> Iterable[Any]:
    w.keep(where, obj, k, 4096)  # a random generator's state, a file's size and position
    return ()


def _visit_file(w: _Walker, where: str, obj: Any, k: int) -> Iterable[Any]:
    if type(obj) in FILE_TYPES:
        w.keep(where, obj, k, 4096)
    else:
        w.uncovered(where, f"a {safe.type_name(type(obj))}: what is written to it stays")
    return ()


def _visit_generator(w: _Walker, where: str, obj: Any, k: int) -> Iterable[Any]:
    w.keep(where, obj, k, 0)
    w.uncovered(where, "a generator: where it stands cannot be put back")
    return ()


def _visit_iterator(w: _Walker, where: str, obj: Any, k: int) -> Iterable[Any]:
    w.keep(where, obj, k, 64)
    return gc.get_referents(obj)[:_OPAQUE_REFERENTS]


def _visit_external(w: _Walker, where: str, obj: Any, k: int) -> Iterable[Any]:
    tp = type(obj)
    what = next(
        (
            text
            for (module, name), text in EXTERNAL_TYPES.items()
            if any(
                safe.type_module(c) == module and safe.type_name(c) == name for c in safe.mro(tp)
            )
        ),
        "an iterator: where it stands cannot be put back",
    )
    w.uncovered(where, f"{what}: what a re-run does through it stays done")
    return ()


def _visit_opaque(w: _Walker, where: str, obj: Any, k: int) -> Iterable[Any]:
    # what a C object refers to (a csv.writer's bound write method, and through it its file)
    return gc.get_referents(obj)[:_OPAQUE_REFERENTS]


_VISITORS = {
    **dict.fromkeys(CONTAINERS, _visit_container),
    WALK: _visit_walk,
    OBJECT: _visit_object,
    CLASS: _visit_class,
    FUNCTION: _visit_function,
    METHOD: _visit_method,
    BUILTIN_METHOD: _visit_builtin_method,
    PARTIAL: _visit_partial,
    **dict.fromkeys((TENSOR, MODEL, OPTIMIZER, TORCH_STATE), _visit_torch),
    NDARRAY: _visit_ndarray,
    RNG: _visit_keep,
    FILE: _visit_file,
    GENERATOR: _visit_generator,
    ITERATOR: _visit_iterator,
    EXTERNAL: _visit_external,
    OPAQUE: _visit_opaque,
}


def _names(names: list[str]) -> str:
    shown = [f"`{n}`" for n in names[:3]]
    if len(names) > 3:
        shown.append(f"{len(names) - 3} more")
    return ", ".join(shown)


def holds_gpu(obj: Any) -> bool:
    """A model, optimizer or container with tensors on the GPU (looked at shallowly, by type)."""
    torch = torch_objects.torch_module()
    if torch is None:
        return False
    tp = type(obj)
    if safe.is_a(tp, torch.nn.Module):
        return torch_state.module_on_gpu(obj)
    if safe.is_a(tp, torch.optim.Optimizer):
        return torch_state.optimizer_has_state(obj)
    k = container_kind(tp)
    if k == DICT:
        items: Iterable[Any] = list(dict.values(obj))[:2000]
    elif k:
        items = list(iterate(obj))[:2000]
    else:
        return False
    return any(safe.is_a(type(v), torch.Tensor) and torch_state.on_gpu(v) for v in items)

"""What a fix's snapshot must cover: the objects a cell's names reach, and what copying them costs.

A re-run can change only what the cell (or the notebook functions it calls) reaches through the
names it reads, so the snapshot walks from those names, and only two levels down
(``trainer.model``, ``models["a"]``, ``cfg.opt``) and 2000 elements into a container, so that
taking it stays quick on a large namespace. Models, optimizers and tensors end the walk: their
state is copied whole (``backends._state``). The host memory that copy takes is counted here,
before anything is copied, so that ``transaction.take`` can refuse a snapshot that would not fit
instead of running the machine out of memory.

Which values hold GPU memory is decided here too: the snapshot must not keep those alive (a
re-run that rebinds ``model = Net().cuda()`` frees the old model, as a real run does), and the
failed run's own leftovers that hold it leave the namespace before the re-run.
"""

from __future__ import annotations

import collections
import types
from collections.abc import Iterable, Iterator
from typing import Any

from jupyter_gpumem.backends import torch_objects, torch_state

# A CPU tensor larger than this is not copied: its version counter tells whether a rehearsal
# wrote to it (then the rollback says so). GPU tensors are always copied: they fit in host memory.
BIG_HOST_TENSOR_BYTES = 256 << 20
_MAX_ITEMS = 2000  # elements of one container looked into
_DEPTH = 2  # levels below a name: `trainer.model`, `models["a"]`, `cfg.opt`


def _reachable(ns: dict[str, Any], names: Iterable[str]) -> Iterator[tuple[str, Any, int]]:
    """(name, object, depth) for what the names reach, each object once."""
    seen: set[int] = set()
    todo = [(n, ns[n], 0) for n in sorted(names) if n in ns and not n.startswith("_")]
    while todo:
        name, obj, depth = todo.pop()
        if id(obj) in seen or isinstance(obj, (types.ModuleType, type, types.FunctionType)):
            continue
        seen.add(id(obj))
        yield name, obj, depth
        if depth >= _DEPTH or torch_objects.is_tensor(obj) or torch_objects.is_module(obj):
            continue
        if torch_objects.is_optimizer(obj):
            continue
        children: Iterable[Any] = ()
        if isinstance(obj, dict):
            children = list(obj.values())[:_MAX_ITEMS]
        elif isinstance(obj, (list, tuple, collections.deque, set, frozenset)):
            children = list(obj)[:_MAX_ITEMS]
        elif hasattr(obj, "__dict__") and not callable(obj):
            try:
                children = [v for k, v in vars(obj).items() if not k.startswith("__")][:_MAX_ITEMS]
            except TypeError:
                children = ()
        for child in children:
            if isinstance(child, (str, bytes, int, float, bool, type(None))):
                continue
            todo.append((name, child, depth + 1))


def plan_snapshot(ns: dict[str, Any], names: Iterable[str]) -> tuple[list[tuple[str, Any]], int]:
    """What :func:`transaction.take` would copy, and how many bytes of host memory it needs."""
    chosen: list[tuple[str, Any]] = []
    nbytes = 0
    torch_in_use = torch_objects.torch_module() is not None
    for name, obj, _depth in _reachable(ns, names):
        if torch_in_use and torch_objects.is_module(obj):
            nbytes += sum(torch_state.tensor_bytes(p) for p in obj.parameters())
            nbytes += sum(
                torch_state.tensor_bytes(p.grad) for p in obj.parameters() if p.grad is not None
            )
            nbytes += sum(torch_state.tensor_bytes(b) for b in obj.buffers())
        elif torch_in_use and torch_objects.is_optimizer(obj):
            for s in obj.state.values():
                nbytes += sum(
                    torch_state.tensor_bytes(v) for v in s.values() if torch_objects.is_tensor(v)
                )
        elif torch_in_use and torch_objects.is_tensor(obj):
            size = torch_state.tensor_bytes(obj)
            if torch_state.on_gpu(obj) or size <= BIG_HOST_TENSOR_BYTES:
                nbytes += size
        chosen.append((name, obj))
    return chosen, nbytes


def holds_gpu(obj: Any) -> bool:
    """A model, optimizer or container with tensors on the GPU (looked at shallowly)."""
    if torch_objects.torch_module() is None:
        return False
    if torch_objects.is_module(obj):
        return any(torch_state.on_gpu(p) for p in obj.parameters())
    if torch_objects.is_optimizer(obj):
        return bool(obj.state)
    items: Iterable[Any] = ()
    if isinstance(obj, dict):
        items = list(obj.values())[:_MAX_ITEMS]
    elif isinstance(obj, (list, tuple, set, collections.deque)):
        items = list(obj)[:_MAX_ITEMS]
    return any(torch_objects.is_tensor(v) and torch_state.on_gpu(v) for v in items)

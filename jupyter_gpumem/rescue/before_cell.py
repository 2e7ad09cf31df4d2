"""What a cell's models held before it ran, so a fix's run starts where one clean run would.

A training cell that runs out of memory has often changed its model before it did: the forward
passes that got through moved the BatchNorm running statistics and ``num_batches_tracked``, a
backward that ran part way left gradients in ``.grad``. A fix's re-run would start from them; one
clean run on a card that fit would not. So before each cell the hook records, for the models the
cell names directly (``cells.source.names_used``, nothing run: names bound to a
``torch.nn.Module``), what those passes change:

- the BatchNorm-like statistics (``running_mean``, ``running_var``, ``num_batches_tracked`` of any
  submodule that keeps them), copied to host memory, at most ``STATS_COPY_BYTES`` in all
  (ResNet-50's 53 layers keep 0.2 MiB);
- which parameters had no ``.grad`` (and the identity and version of the ones that had), plus a
  host copy of those gradients only while they are at most ``GRAD_COPY_BYTES`` in all: a copy of
  a large model's gradients before every cell would cost a transfer and their size in memory.

Nothing is copied on the GPU, and a cell that names no model pays a scan of its words only. The
hook drops the record after every cell; a failed cell's travels with its ``FailedCell``, sealed
when it failed (``seal``: the statistics as the failed run left them, the gradients' identity and
version). A fix's transaction asks ``plan`` which of the failed run's changes are still there
untouched since and can be put back, and puts them back before its first run and after every
rehearsal (``PutBack.apply``); what cannot be (statistics over the bound, gradients that were
there before the cell and too large to copy, anything a later cell changed) is named instead.
Reading the models runs none of their code: types by their MRO, modules by their own
dictionaries (``safe``).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from jupyter_gpumem.backends import active, torch_objects
from jupyter_gpumem.cells import source as cellsource
from jupyter_gpumem.rescue import safe

# host copies of gradients that were already there before the cell, at most this much per cell
GRAD_COPY_BYTES = 1 << 20
# host copies of BatchNorm-like statistics per cell, at most this much (ResNet-50: 0.2 MiB)
STATS_COPY_BYTES = 16 << 20
STATS = ("running_mean", "running_var", "num_batches_tracked")
_WORD = re.compile(r"[^\W\d]\w*")


@dataclass
class _Grad:
    had: Any  # weakref to the .grad the cell found
    version: int  # its version then
    copy: Any = None  # host copy of it (flat), where the bound allowed


@dataclass
class _Model:
    """One model as the cell found it; its tensors by id (alive while the model is)."""

    ref: Any  # weakref to the model
    name: str
    stats: dict[int, Any] = field(default_factory=dict)  # id of a buffer -> host copy (flat)
    no_grad: set[int] = field(default_factory=set)  # ids of the parameters with no .grad
    grads: dict[int, _Grad] = field(default_factory=dict)  # id of a parameter -> its .grad
    stats_whole: bool = True  # every statistic was copied (within the bound)
    # as the failed run left them (``seal``): statistics by id, (.grad, its version) by id
    failed_stats: dict[int, Any] = field(default_factory=dict)
    failed_grads: dict[int, tuple[Any, int]] = field(default_factory=dict)


@dataclass
class Before:
    """The record of one cell: its models' statistics and gradients as the cell found them."""

    models: dict[int, _Model]

    def seal(self) -> None:
        """The cell failed: read what its run left, to tell later changes from the failed run's."""
        torch = torch_objects.torch_module()
        for rec in self.models.values():
            m = rec.ref()
            if m is None:
                continue
            params, stats = _read(torch, m)
            stats = [b for b in stats if id(b) in rec.stats]
            rec.failed_stats = dict(zip(map(id, stats), _host_copies(stats), strict=True))
            rec.failed_grads = {
                id(p): (None if g is None else weakref.ref(g), _version(g))
                for p in params
                for g in (p.grad,)
            }

    def plan(self, model: Any) -> PutBack | None:
        """What of the failed run's changes to ``model`` can be put back; None when this record
        has not seen ``model`` (reached only through an object, or made since)."""
        rec = self.models.get(id(model))
        if rec is None or rec.ref() is not model:
            return None
        torch = torch_objects.torch_module()
        params, stats = _read(torch, model)
        out = PutBack(rec.name)
        _plan_stats(torch, rec, stats, out)
        _plan_grads(torch, rec, params, out)
        return out


@dataclass
class PutBack:
    """One model's values to write back before each run of a fix, and what stays."""

    name: str
    stats: list[tuple[Any, Any]] = field(default_factory=list)  # (buffer, host copy)
    grads: list[tuple[Any, Any]] = field(default_factory=list)  # (parameter, host copy or None)
    stats_left: bool = False  # statistics the failed run changed that stay as it left them
    grads_left: bool = False  # gradients the same

    @property
    def changed(self) -> bool:
        return bool(self.stats or self.grads)

    def apply(self) -> None:
        torch = torch_objects.torch_module()
        with torch.no_grad():
            for t, copy in self.stats:
                t.copy_(copy.view(t.shape))
            for p, copy in self.grads:
                if copy is None:
                    p.grad = None
                elif p.grad is not None and p.grad.shape == p.shape:
                    p.grad.copy_(copy.view(p.shape))
                else:
                    p.grad = copy.view(p.shape).to(p.device, copy=True)


def _plan_stats(torch: Any, rec: _Model, stats: list[Any], out: PutBack) -> None:
    out.stats_left = not rec.stats_whole
    live = [b for b in stats if id(b) in rec.stats and id(b) in rec.failed_stats]
    for b, cur in zip(live, _host_copies(live), strict=True):
        before = rec.stats[id(b)]
        if _equal(torch, cur, before):
            continue  # as the cell found it: nothing to put back
        if _equal(torch, cur, rec.failed_stats[id(b)]):
            out.stats.append((b, before))
        else:
            out.stats_left = True  # changed since the failure (a later cell): not ours to undo


def _plan_grads(torch: Any, rec: _Model, params: list[Any], out: PutBack) -> None:
    for p in params:
        key = id(p)
        grad = p.grad
        had = rec.grads.get(key)
        if key not in rec.no_grad and had is None:
            continue  # not the model's when the cell started
        if had is None and grad is None:
            continue
        if had is not None and grad is had.had() and _version(grad) == had.version:
            continue  # the one the cell found, unwritten
        copy = None if had is None else had.copy
        if copy is not None and grad is not None and _equal(torch, _host_copies([grad])[0], copy):
            continue
        sealed = rec.failed_grads.get(key)
        as_left = (
            sealed is not None
            and (grad is None if sealed[0] is None else grad is sealed[0]())
            and _version(grad) == sealed[1]
        )
        if as_left and (had is None or copy is not None):
            out.grads.append((p, copy))
        else:
            out.grads_left = True


def _equal(torch: Any, a: Any, b: Any) -> bool:
    return a is not None and b is not None and a.shape == b.shape and bool(torch.equal(a, b))


def _version(t: Any) -> int:
    return -1 if t is None else int(t._version)


def take(source: str, ns: dict[str, Any]) -> Before | None:
    """The record of a cell about to run; None when torch is not imported or the cell names no
    model. A cell naming none costs a scan of its words."""
    torch = torch_objects.torch_module()
    if torch is None or not source:
        return None
    module_cls = torch.nn.Module
    words = set(_WORD.findall(source)) & ns.keys()
    if not any(safe.is_a(type(ns[w]), module_cls) for w in words):
        return None
    models: dict[int, tuple[str, Any]] = {}
    for name in sorted(cellsource.names_used(source) & words):
        value = ns[name]
        if safe.is_a(type(value), module_cls):
            models.setdefault(id(value), (name, value))
    if not models:
        return None
    return _record(torch, list(models.values()))


def sealed(before: Before | None) -> Before | None:
    """A failed cell's record with what its run left read in (``Before.seal``); None where there
    is none or reading fails (the record is a help, never a reason for a traceback)."""
    if before is None:
        return None
    try:
        before.seal()
    except Exception:
        return None
    return before


def _record(torch: Any, models: list[tuple[str, Any]]) -> Before:
    out: dict[int, _Model] = {}
    stats_to_copy: list[tuple[_Model, Any]] = []
    stat_bytes = 0
    grads_to_copy: list[tuple[_Grad, Any]] = []
    grad_bytes = 0
    for name, m in models:
        rec = _Model(weakref.ref(m), name)
        out[id(m)] = rec
        params, stats = _read(torch, m)
        for t in stats:
            stat_bytes += _nbytes(t)
            if stat_bytes > STATS_COPY_BYTES:
                rec.stats_whole = False
                break
            stats_to_copy.append((rec, t))
        for p in params:
            grad = p.grad
            if grad is None:
                rec.no_grad.add(id(p))
                continue
            g = rec.grads[id(p)] = _Grad(weakref.ref(grad), _version(grad))
            grad_bytes += _nbytes(grad)
            grads_to_copy.append((g, grad))
    copies = _host_copies([t for _, t in stats_to_copy])
    for (rec, t), copy in zip(stats_to_copy, copies, strict=True):
        rec.stats[id(t)] = copy
    if grads_to_copy and grad_bytes <= GRAD_COPY_BYTES:
        copies = _host_copies([t for _, t in grads_to_copy])
        for (g, _), copy in zip(grads_to_copy, copies, strict=True):
            g.copy = copy
    return Before(out)


def _read(torch: Any, m: Any) -> tuple[list[Any], list[Any]]:
    """(parameters, BatchNorm-like statistics) of ``m`` and its submodules, each once, by the
    modules' own dictionaries (read through ``torch.nn.Module``'s descriptor: no code of theirs)."""
    module_cls = torch.nn.Module
    tensor_cls = torch.Tensor
    param_cls = torch.nn.Parameter
    getter = safe.class_dict(module_cls).get("__dict__")
    params: dict[int, Any] = {}
    stats: dict[int, Any] = {}
    seen: set[int] = set()
    is_module: dict[type, bool] = {}
    todo = [m]
    while todo:
        sub = todo.pop()
        tp = type(sub)
        if tp not in is_module:
            is_module[tp] = safe.is_a(tp, module_cls)
        if id(sub) in seen or not is_module[tp]:
            continue
        seen.add(id(sub))
        d = _own_dict(getter, sub)
        own_params = d.get("_parameters")
        if type(own_params) is dict:
            for p in own_params.values():
                if p is not None and (type(p) is param_cls or safe.is_a(type(p), tensor_cls)):
                    params.setdefault(id(p), p)
        buffers = d.get("_buffers")
        if type(buffers) is dict:
            for key in STATS:
                b = buffers.get(key)
                if b is not None and (type(b) is tensor_cls or safe.is_a(type(b), tensor_cls)):
                    stats.setdefault(id(b), b)
        children = d.get("_modules")
        if type(children) is dict:
            todo.extend(c for c in reversed(list(children.values())) if c is not None)
    return list(params.values()), list(stats.values())


def _own_dict(getter: Any, obj: Any) -> dict[str, Any]:
    try:
        d = getter.__get__(obj, type(obj))
    except Exception:
        return {}
    return d if type(d) is dict else {}


def _nbytes(t: Any) -> int:
    try:
        return int(t.numel() * t.element_size())
    except Exception:
        return 0


def _host_copies(tensors: Iterable[Any]) -> list[Any]:
    """Detached flat host copies, nothing allocated on the GPU: the tensors of one device and
    dtype are copied into one host buffer, each into its slice (joining them on the card first
    would allocate there, on a card that may be full)."""
    tensors = list(tensors)
    out: list[Any] = [None] * len(tensors)
    torch = torch_objects.torch_module()
    if not tensors:
        return out
    groups: dict[tuple[str, Any], list[int]] = {}
    with active().host_only(), torch.no_grad():
        for i, t in enumerate(tensors):
            groups.setdefault((str(t.device), t.dtype), []).append(i)
        for idx in groups.values():
            parts = [tensors[i] for i in idx]
            sizes = [p.numel() for p in parts]
            flat = torch.empty(sum(sizes), dtype=parts[0].dtype, device="cpu")
            for i, part, piece in zip(idx, parts, flat.split(sizes), strict=True):
                piece.view(part.shape).copy_(part)  # device to host, into the buffer
                out[i] = piece
    return out

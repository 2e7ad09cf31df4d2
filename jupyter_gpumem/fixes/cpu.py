"""Move to CPU: re-run with CUDA placements sent to the CPU (a torch function mode) after moving
to the CPU everything on the GPU that the cell reaches.

What it reaches is what the fix's transaction snapshots (``rescue.reach``): the names the cell
reads, the globals the notebook functions it calls read, and what those hold (``trainer.model``,
``cache["emb"]``, a dataclass's or a namespace's fields, closure cells). Models and optimizers
move in place (parameters, gradients, buffers, optimizer state, and parameters only an optimizer
holds); a tensor held by a container or an object is replaced there by its CPU copy (one copy
per tensor, wherever it is held); torch state objects (a ``GradScaler``'s scale, a scheduler's
tensors) have their tensors replaced the same way. Anything left on the GPU would make the re-run
fail with "Expected all tensors to be on the same device".

What the mode cannot redirect is said, not hidden: ``torch.cuda.*`` calls, ``torch.load`` with a
CUDA ``map_location``, the legacy ``torch.cuda.FloatTensor`` types.

Before it moves anything it predicts the GPU memory the move frees: the storages of what the cell
reaches, each once, counted by the same walk without moving. After the move, as the re-run starts,
the allocator's reading gives the measured figure (allocated before the move less allocated then),
and the outcome sets the two side by side. They differ where something the cell does not reach
still holds a moved tensor's GPU copy (the output cache, another variable, an autograd graph).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import re
import types
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from jupyter_gpumem.backends import MemoryBackend, active, on_device, torch_objects
from jupyter_gpumem.cells.failure import names_used
from jupyter_gpumem.fixes.base import Check, Fix, FixContext, FixOutcome, predicted_vs_measured
from jupyter_gpumem.rescue.reach import plan_snapshot
from jupyter_gpumem.rescue.rerun import Plan
from jupyter_gpumem.units import format_bytes

_UNREDIRECTABLE = (
    (re.compile(r"\btorch\.cuda\.(?!is_available|memory_allocated|max_memory_allocated|empty_cache|synchronize)\w+"), "torch.cuda.* calls"),
    (re.compile(r"map_location\s*=\s*['\"]cuda"), "torch.load(map_location='cuda')"),
    (re.compile(r"\bcuda\.\w+Tensor\b"), "torch.cuda.*Tensor types"),
)  # fmt: skip


def _gpu_names(ctx: FixContext) -> list[str]:
    """The variables holding GPU memory (the diagnosis's holders) that the cell uses."""
    read = names_used(ctx.failed.source, ctx.user_ns)
    d = ctx.failed.diagnosis
    if d is None:
        return []
    return [h.name for h in d.holders.holders if h.where == "variable" and h.name in read]


_DEPTH = 4  # tuples and dicts inside a torch state object's fields, looked into


class _Mover:
    """Moves what a cell reaches to the CPU, each tensor once, and counts what moved where."""

    def __init__(self, backend: MemoryBackend) -> None:
        self.backend = backend
        self.hosted: dict[int, Any] = {}  # id of a GPU tensor -> its CPU copy
        self.keep: list[Any] = []  # the GPU tensors of ``hosted``, so that their ids stay theirs
        self.moved: collections.Counter[str] = collections.Counter()  # root name -> bytes
        self.compiled: set[str] = set()  # root names through which a compiled model is reached

    def tensor(self, t: Any, where: str) -> Any:
        """``t``'s CPU copy (the same one wherever ``t`` is held); ``t`` if it is not on the GPU."""
        copy = self.hosted.get(id(t))
        if copy is not None:
            return copy
        new, n = self.backend.move_to_cpu(t)
        if not n:
            return t
        self.hosted[id(t)] = new
        self.keep.append(t)
        self.moved[where] += n
        return new

    def value(self, v: Any, where: str, depth: int = 1) -> Any:
        """``v`` with its GPU tensors replaced: a tensor, or a tuple holding some (rebuilt)."""
        if torch_objects.is_tensor(v):
            return self.tensor(v, where)
        if type(v) is tuple and depth > 0:
            items = tuple(self.value(x, where, depth - 1) for x in v)
            return v if all(a is b for a, b in zip(items, v, strict=True)) else items
        return v

    def in_place(self, obj: Any, where: str) -> None:
        """A model or optimizer moved as it is (the same object)."""
        _new, n = self.backend.move_to_cpu(obj)
        self.moved[where] += n

    def contents(self, obj: Any, where: str, depth: int = 1) -> None:
        """The GPU tensors held by a container or an object's fields replaced where they are."""
        if isinstance(obj, dict):
            for k, v in list(obj.items()):
                self._set(obj.__setitem__, k, v, where, depth)
        elif isinstance(obj, (list, collections.deque)):
            for i, v in enumerate(list(obj)):
                self._set(obj.__setitem__, i, v, where, depth)
        elif isinstance(obj, types.FunctionType):
            self._function(obj, where)
        elif isinstance(obj, type):
            for k, v in list(vars(obj).items()):  # a notebook class's attributes
                if not k.startswith("__"):
                    self._set(functools.partial(type.__setattr__, obj), k, v, where, depth)
        else:
            fields = _fields(obj)
            if fields is not None:
                for k, v in list(fields.items()):
                    self._set(fields.__setitem__, k, v, where, depth)
            for k in _slots(type(obj)):
                with contextlib.suppress(AttributeError):  # an unset slot
                    v = object.__getattribute__(obj, k)
                    self._set(functools.partial(object.__setattr__, obj), k, v, where, depth)

    def _function(self, fn: types.FunctionType, where: str) -> None:
        """A notebook function's closure cells and defaults (written only where they change)."""
        for cell in fn.__closure__ or ():
            with contextlib.suppress(ValueError):  # an empty cell
                old = cell.cell_contents
                new = self.value(old, where)
                if new is not old:
                    cell.cell_contents = new
        if fn.__defaults__:
            new = self.value(fn.__defaults__, where)
            if new is not fn.__defaults__:
                fn.__defaults__ = new

    def _set(self, put: Callable[[Any, Any], None], k: Any, v: Any, where: str, depth: int) -> None:
        new = self.value(v, where)
        if new is not v:
            put(k, new)
        elif depth < _DEPTH and isinstance(v, (dict, list)):
            self.contents(v, where, depth + 1)  # inside a torch state object: not walked by reach


class _Counter(_Mover):
    """The same walk as :class:`_Mover`, moving nothing: the GPU storages it would move, each
    once (a view, a tied weight, a tensor held twice count once), for the prediction."""

    def __init__(self, backend: MemoryBackend, device_index: int | None = None) -> None:
        super().__init__(backend)
        self.storages: set[Any] = set()
        self.device_index = device_index  # the card measured (None: every card)

    def _count(self, t: Any, where: str) -> None:
        if t is None or not torch_objects.is_tensor(t):
            return
        info = self.backend.storage_of(t)
        if info is not None and not on_device(info[2], self.device_index):
            return  # on another card: what the measurement reads does not include it
        if info is not None and info[0] not in self.storages:
            self.storages.add(info[0])
            self.moved[where] += info[1]

    def tensor(self, t: Any, where: str) -> Any:
        self._count(t, where)
        return t

    def in_place(self, obj: Any, where: str) -> None:
        if torch_objects.is_module(obj):
            for p in obj.parameters():
                self._count(p, where)
                self._count(p.grad, where)
            for mod in obj.modules():
                for b in list(mod._buffers.values()):
                    self._count(b, where)
        elif torch_objects.is_optimizer(obj):
            for group in obj.param_groups:
                for p in group["params"]:
                    self._count(p, where)
                    self._count(p.grad, where)
            for state in obj.state.values():
                for v in list(state.values()):
                    self._count(v, where)


def _fields(obj: Any) -> dict[str, Any] | None:
    """An object's ``__dict__`` read without running its code (no ``__getattr__``)."""
    try:
        d = object.__getattribute__(obj, "__dict__")
    except Exception:
        return None
    return d if type(d) is dict else None


def _slots(tp: type) -> list[str]:
    """The ``__slots__`` names along the class's MRO (a dataclass with ``slots=True``)."""
    names: list[str] = []
    for c in tp.__mro__:
        slots = vars(c).get("__slots__", ())
        names += [slots] if isinstance(slots, str) else [n for n in slots if isinstance(n, str)]
    return [n for n in names if n not in ("__dict__", "__weakref__")]


def move_reached(
    ns: dict[str, Any], names: set[str], backend: MemoryBackend, mover: _Mover | None = None
) -> _Mover:
    """Everything on the GPU that ``names`` reach, moved to the CPU (see the module's docstring);
    the namespace's own tensors are left to the caller (they go in as the run's updates). With a
    :class:`_Counter`, nothing moves: it counts."""
    mover = mover or _Mover(backend)
    reached, _nbytes = plan_snapshot(ns, names)
    for where, obj in reached:
        if torch_objects.is_module(obj) or torch_objects.is_optimizer(obj):
            mover.in_place(obj, where)
            if torch_objects.compiled_original(obj) is not None:
                mover.compiled.add(where)
        elif not torch_objects.is_tensor(obj) and not isinstance(obj, types.ModuleType):
            mover.contents(obj, where)
    return mover


def _namespace_tensors(mover: _Mover, ns: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """The namespace's own values among ``names`` as ``mover`` gives them (its CPU copies)."""
    updates: dict[str, Any] = {}
    for name in sorted(names):
        value = ns.get(name)
        if name.startswith("_") or value is None:
            continue
        new = mover.value(value, name)
        if new is not value:
            updates[name] = new
    return updates


def reached_gpu_bytes(
    ns: dict[str, Any], names: set[str], backend: MemoryBackend, device_index: int | None = None
) -> int:
    """The GPU memory the move would free on card ``device_index`` (None: on every card): what
    ``names`` reach there, each storage once."""
    counter = _Counter(backend, device_index)
    move_reached(ns, names, backend, counter)
    _namespace_tensors(counter, ns, names)
    return sum(counter.moved.values())


def _allocated(backend: MemoryBackend, index: int | None) -> int | None:
    stats = backend.allocator_stats(index)
    return None if stats is None else stats.get("allocated_bytes.all.current", 0)


def _prediction_notes(predicted: int, freed: int | None) -> list[str]:
    """What the move was predicted to free on the GPU beside what the allocator read after it."""
    if not predicted and not freed:
        return []
    notes = [
        predicted_vs_measured(
            predicted,
            freed,
            "GPU memory freed by the move",
            "what the cell reaches on the GPU, counted before moving",
        )
    ]
    if freed is not None and freed < predicted:
        notes.append(
            "What the move did not free is still held on the GPU by something the cell does not "
            "reach (the output cache, another variable, an autograd graph)."
        )
    return notes


def _listed(names: list[str]) -> str:
    quoted = [f"`{n}`" for n in names]
    return ", ".join(quoted[:-1]) + (" and " if len(quoted) > 1 else "") + quoted[-1]


def _moved_text(names: list[str], ns: dict[str, Any]) -> str:
    """`model`, `cache` and what `train` uses: a function moves nothing itself, what it reads does."""
    held = [f"`{n}`" for n in names if not callable(ns.get(n)) or torch_objects.is_module(ns[n])]
    used = [f"`{n}`" for n in names if f"`{n}`" not in held]
    if used:
        held.append(f"what {', '.join(used)} use{'s' if len(used) == 1 else ''}")
    return ", ".join(held[:-1]) + (" and " if len(held) > 1 else "") + held[-1]


class MoveToCpu(Fix):
    key = "cpu"
    label = "Move to CPU"

    def check(self, ctx: FixContext) -> Check:
        if torch_objects.torch_module() is None:
            return Check(False, "", "torch is not imported in this kernel")
        if ctx.failed.report.backend == "CPU":
            return Check(False, "", "it is the CPU's memory (RAM) that ran out")
        names = _gpu_names(ctx)
        d = ctx.failed.diagnosis
        moved = 0
        if d is not None:
            moved = sum(h.total_bytes for h in d.holders.holders if h.name in names)
        saving = moved + ((d.working_set_bytes or 0) if d else 0)
        what = ", ".join(f"`{n}`" for n in names[:4]) or "no GPU variables"
        action = (
            f"Move {what} to the CPU and re-run the cell with every CUDA placement sent to the "
            "CPU. Much slower than the GPU."
        )
        return Check(True, action, "", saving or None)

    def apply(self, ctx: FixContext) -> FixOutcome:
        check = self.check(ctx)
        ns = ctx.user_ns
        backend = active()
        names = names_used(ctx.failed.source, ns)
        names |= torch_objects.read_by_compiled(ns, names)
        device = ctx.failed.report.device_index
        predicted = reached_gpu_bytes(ns, names, backend, device)
        before = _allocated(backend, device)
        mover = move_reached(ns, names, backend)
        updates = _namespace_tensors(mover, ns, names)
        if ctx.txn is not None:
            for name in updates:
                ctx.txn.evict(name)  # the GPU copy must not stay alive in the snapshot
        moved_names = [n for n, size in sorted(mover.moved.items()) if size]
        moved_bytes = sum(mover.moved.values())
        mover.keep.clear()
        mode_holder: list[Any] = []

        def redirect() -> AbstractContextManager[Any]:
            mode = backend.placements_to_cpu()
            mode_holder.append(mode)
            return mode

        freed: list[int] = []

        def read_freed() -> AbstractContextManager[Any]:
            """As the run starts, the move done (the namespace holds the CPU copies)."""
            after = _allocated(backend, device)
            if not freed and before is not None and after is not None:
                freed.append(max(before - after, 0))
            return contextlib.nullcontext()

        # CPU tensors must not count against the GPU (they would on the simulated one)
        contexts = [read_freed, backend.host_only, redirect]
        compiled = sorted(set(torch_objects.compiled_names(ns, names)) | mover.compiled)
        if compiled:
            contexts.append(torch_objects.eager_compiled)
        outcome = self._single_run(
            ctx,
            Plan(ctx.failed.source, contexts=contexts, namespace_updates=updates, note="on CPU"),
            check,
        )
        if moved_names:
            outcome.notes.append(
                f"Moved to the CPU: {_moved_text(moved_names, ns)} ({format_bytes(moved_bytes)}); "
                "they stay there."
            )
        outcome.notes += _prediction_notes(predicted, freed[0] if freed else None)
        if compiled:
            outcome.notes.append(
                f"{_listed(compiled)} {'is' if len(compiled) == 1 else 'are'} compiled "
                "(torch.compile): run eagerly on the CPU, not compiled again for it."
            )
        redirected = getattr(mode_holder[0], "redirected", None) if mode_holder else None
        if redirected:
            outcome.notes.append(
                "Redirected to the CPU: " + ", ".join(f"{k} ×{v}" for k, v in redirected.items())
            )
        missed = [label for rx, label in _UNREDIRECTABLE if rx.search(ctx.failed.source)]
        if missed:
            outcome.notes.append("Not redirected (still CUDA): " + ", ".join(missed))
        outcome.notes.append("Runs on the CPU: expect it to be much slower than on the GPU.")
        # (after rehearsals, the runner names them among what the rehearsals could not undo)
        kept = ctx.txn.failed_run_note() if ctx.txn is not None and outcome.ok else None
        if kept and not outcome.rehearsals:
            outcome.notes.append(kept)
        if outcome.ok:
            outcome.message = f"The cell ran on the CPU ({outcome.runs} run)."
            outcome.change = "Use device = 'cpu' in the cell (or keep running it this way)."
        elif outcome.failure is not None and outcome.failure.report.backend == "CPU":
            req = outcome.failure.report.requested_bytes
            outcome.message = (
                f"The CPU ran out of memory too (tried to allocate {format_bytes(req)}): "
                "this cell needs less memory, not another device."
            )
        else:
            outcome.message = "Still out of memory when moved to the CPU."
        return outcome

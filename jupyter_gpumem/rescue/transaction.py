"""A fix as a transaction on the notebook: what it may change, put back if it does not work out.

Before a fix re-runs a cell, :class:`Transaction` takes a snapshot of what the cell can reach
(``reach.survey``: the names it uses and every object below them, the notebook's own modules,
the logging handlers' files):

- the user namespace, shallow (every name and the object it is bound to), so a re-run that
  rebinds or creates globals (the batch variable included) can be undone;
- containers at any depth, objects' ``__dict__`` and ``__slots__``, closure cells, class
  attributes of notebook classes, attributes of the notebook's own modules (``copies``);
- random generators: the global ones and every ``random.Random``, NumPy ``Generator`` and
  ``torch.Generator`` reached; NumPy arrays (in place); open files (size and position);
- the torch objects reached: models (parameters, buffers, ``.grad``, train/eval), optimizers,
  LR schedulers, grad scalers, tensors; copied to host memory by ``backends.torch_state``.

Rehearsals (probes of a fix) are rolled back after each run; the final run is kept when it fits
and rolled back when it does not, or when anything interrupts it (Ctrl-C included, deferred while
the rollback runs). What no copy can put back (a generator, a socket, a database) is named before
anything runs (``Transaction.not_covered``) and again after (``undo_message``). What the failed
run itself changed in the models before it ran out (BatchNorm running statistics, gradients in
``.grad``) is put back from the hook's record of that cell (``before_cell``) before the first run
and after each rehearsal, so the kept run is one clean run; what the record does not cover (a
model reached only through an object, gradients there before the cell and too large to copy) is
named the same way, and a kept run says it started from it (``failed_run_note``). Reading and writing the user's objects runs none of their
code (``safe``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from jupyter_gpumem import backends
from jupyter_gpumem.backends import torch_objects, torch_state
from jupyter_gpumem.rescue import before_cell, copies, kinds, safe, sandbox
from jupyter_gpumem.rescue.reach import BIG_HOST_TENSOR_BYTES, Reached, holds_gpu, survey
from jupyter_gpumem.units import format_bytes

# Refuse when the snapshot would take more than this share of the available host memory.
HOST_SHARE = 0.8


class SnapshotTooLarge(Exception):
    """The snapshot would not fit in host memory."""


@dataclass
class Snapshot:
    namespace: dict[str, Any]
    saved: list[copies.Saved] = field(default_factory=list)  # containers, objects, files, ...
    modules: list[Any] = field(default_factory=list)
    optimizers: list[Any] = field(default_factory=list)
    state_dicts: list[Any] = field(default_factory=list)
    tensors: list[Any] = field(default_factory=list)
    watched: list[tuple[str, Any, int]] = field(default_factory=list)  # (name, tensor, version)
    rng: torch_state.RngState | None = None
    bytes: int = 0
    graphs: int | None = None  # dynamo's graph count when taken: a run that compiled moves it
    # names whose GPU-holding values the snapshot must not keep alive (a re-run that rebinds
    # `x = torch.randn(...)` or `model = Net().cuda()` frees the old one, as a real run does):
    # a tensor by its host copy, anything else by a weak reference
    weak: dict[str, Any] = field(default_factory=dict)
    # what no rollback puts back, found before anything ran: "`gen` (a generator: ...)"
    not_covered: list[str] = field(default_factory=list)
    where: dict[int, str] = field(
        default_factory=dict
    )  # id of a model -> the name it was reached by

    def count(self, kind: type[copies.Saved]) -> int:
        return sum(type(s) is kind for s in self.saved)


def host_available_bytes() -> int | None:
    """MemAvailable (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_host(nbytes: int) -> None:
    """Raise SnapshotTooLarge when copying ``nbytes`` would take most of the host's memory."""
    avail = host_available_bytes()
    if nbytes and avail is not None and nbytes > HOST_SHARE * avail:
        raise SnapshotTooLarge(
            f"undoing a re-run needs a copy of {format_bytes(nbytes)} of model and optimizer "
            f"state in host memory, and only {format_bytes(avail)} is available"
        )


def take(
    ns: dict[str, Any],
    names: Iterable[str],
    *,
    check_host: bool = True,
    extra_bytes: int = 0,
    exclude: Iterable[str] = (),
) -> Snapshot:
    """Copy what a re-run of a cell using ``names`` can change. ``extra_bytes``: host memory
    the caller copies besides (the failed run's leftovers), counted in the check; ``exclude``:
    names the caller takes out of the namespace itself. Raises SnapshotTooLarge before anything
    is copied."""
    excluded = set(exclude)
    names = set(names) - excluded
    found = survey(ns, names)
    nbytes = found.nbytes + extra_bytes
    if check_host:
        _check(nbytes)
    snap = Snapshot(
        namespace={k: v for k, v in ns.items() if k not in excluded},
        bytes=nbytes,
        not_covered=list(found.not_covered),
        graphs=torch_objects.compiled_graphs(),
    )
    copied: dict[int, Any] = {}
    for item in found.items:
        try:
            _copy(snap, item, copied)
        except Exception as exc:  # a hostile object: named, never a traceback
            snap.not_covered.append(f"`{item.where}` could not be copied ({type(exc).__name__})")
    snap.saved += [copies.copy_module_attrs(m) for m in found.modules]
    _hold_weakly(snap, ns, names, copied)
    snap.rng = torch_state.read_rng()
    return snap


def _check(nbytes: int) -> None:
    check_host(nbytes)  # looked up at call time: tests replace host_available_bytes


def _copy(snap: Snapshot, item: Reached, copied: dict[int, Any]) -> None:
    """One reached object into the snapshot, by its kind."""
    k, obj = item.kind, item.obj
    if k in (kinds.MODEL, kinds.OPTIMIZER, kinds.TENSOR, kinds.TORCH_STATE):
        _copy_torch(snap, item, copied)
        return
    make = _COPIERS.get(k)
    saved = make(obj, k, item.where) if make is not None else None
    if saved is not None:
        saved.where = item.where
        snap.saved.append(saved)


_COPIERS: dict[int, Callable[[Any, int, str], copies.Saved | None]] = {
    **dict.fromkeys(kinds.CONTAINERS, lambda o, k, w: copies.copy_container(o, k)),
    kinds.OBJECT: lambda o, k, w: copies.copy_object(o, k),
    kinds.FUNCTION: lambda o, k, w: copies.copy_object(o, k),
    kinds.CLASS: lambda o, k, w: copies.Class(o, dict(safe.class_dict(o))),
    kinds.RNG: lambda o, k, w: copies.copy_rng(o),
    kinds.NDARRAY: lambda o, k, w: copies.copy_array(o),
    kinds.FILE: lambda o, k, w: copies.copy_file(o, w),
    kinds.ITERATOR: lambda o, k, w: copies.copy_iterator(o),
    kinds.GENERATOR: lambda o, k, w: copies.Generator(o, copies.generator_mark(o)),
}


def _copy_torch(snap: Snapshot, item: Reached, copied: dict[int, Any]) -> None:
    obj = item.obj
    if item.kind == kinds.MODEL:
        snap.modules.append(torch_state.copy_module(obj))
        snap.where[id(obj)] = item.where
    elif item.kind == kinds.OPTIMIZER:
        snap.optimizers.append(torch_state.copy_optimizer(obj))
    elif item.kind == kinds.TENSOR:
        if torch_state.on_gpu(obj) or torch_state.tensor_bytes(obj) <= BIG_HOST_TENSOR_BYTES:
            copied[id(obj)] = torch_state.copy_tensor(obj)
            snap.tensors.append(copied[id(obj)])
        else:
            snap.watched.append((item.where, obj, torch_state.tensor_version(obj)))
    else:
        c = torch_state.copy_state_dict(obj)
        if c is not None:
            snap.state_dicts.append(c)


def _hold_weakly(
    snap: Snapshot, ns: dict[str, Any], names: set[str], copied: dict[int, Any]
) -> None:
    """The names whose values hold GPU memory leave the snapshot's namespace: a tensor is kept
    by its host copy, anything else by a weak reference."""
    if torch_objects.torch_module() is None:
        return
    tensor_cls = torch_objects.torch_module().Tensor
    for name in names & set(ns):
        value = ns[name]
        is_tensor = safe.is_a(type(value), tensor_cls)
        if is_tensor and id(value) in copied:
            snap.weak[name] = copied[id(value)]
        elif not is_tensor and holds_gpu(value):
            try:
                snap.weak[name] = weakref.ref(value)
            except TypeError:
                continue  # not weakly referable (a list of tensors): kept alive
        else:
            continue
        snap.namespace.pop(name, None)


_deferring = threading.local()


@contextlib.contextmanager
def _no_interrupt() -> Iterator[None]:
    """Ctrl-C (any number of times) waits until the state is whole again, then is raised once;
    not at all when the rollback is itself the answer to a Ctrl-C (pressing it again while the
    notebook is put back asks for nothing more). Nested uses defer to the outermost."""
    if threading.current_thread() is not threading.main_thread() or getattr(
        _deferring, "on", False
    ):
        yield
        return
    pending: list[Any] = []
    try:
        old = signal.signal(signal.SIGINT, lambda *a: pending.append(a))
    except (ValueError, TypeError):
        yield
        return
    _deferring.on = True
    answering = isinstance(sys.exc_info()[1], KeyboardInterrupt)
    try:
        yield
    finally:
        _deferring.on = False
        signal.signal(signal.SIGINT, old)
        if pending and not answering:
            raise KeyboardInterrupt


def restore(snap: Snapshot, ns: dict[str, Any]) -> list[str]:
    """Put everything back; returns what could not be (a tensor too large to copy that was
    written to, a generator the re-run advanced, a value with no room left on the GPU)."""
    problems: list[str] = []
    with _no_interrupt():
        _restore_namespace(snap, ns, problems)
        for saved in snap.saved:
            try:
                problem = saved.restore()
            except Exception as exc:
                problem = f"`{saved.where}` could not be put back ({type(exc).__name__}: {exc})"
            if problem:
                problems.append(problem)
        _restore_torch(snap, problems)
        if torch_objects.compiled_graphs() != snap.graphs:  # the run compiled: dynamo's code
            # reads globals the rollback removed, its compiled optimizer holds the run's state
            torch_objects.forget_compiled(v for v in ns.values() if torch_objects.is_optimizer(v))
        if snap.rng is not None:
            torch_state.restore_rng(snap.rng)
        gc.collect()
        backends.active().empty_cache()
    return problems


# what dynamo installs in the globals of the code it compiles (``__resume_at_12_3``,
# ``__compiled_fn_5_...``, ``__builtins_dict___8``, ``_140234_c3``): its own, removed by its own
# cleanup hooks when the compiled code goes; deleting them first makes those hooks raise
_DYNAMO_GLOBAL = re.compile(r"^(?:__(?!\w*__$)\w+|_\d+_c\d+)$")


def _dynamo_global(name: str) -> bool:
    return "torch._dynamo" in sys.modules and _DYNAMO_GLOBAL.match(name) is not None


def _restore_namespace(snap: Snapshot, ns: dict[str, Any], problems: list[str]) -> None:
    saved = snap.namespace
    for k in [k for k in ns if k not in saved and not _dynamo_global(k)]:
        del ns[k]  # the weakly held names too: what the re-run bound there must go first
    for k, v in saved.items():
        if ns.get(k, _MISSING) is not v:
            ns[k] = v
    gc.collect()  # the re-run's values are gone before anything is rebuilt in their place
    for k, held in snap.weak.items():
        if isinstance(held, weakref.ref):
            obj = held()
            if obj is None:
                problems.append(
                    f"`{k}` was replaced by the re-run and its GPU memory given back: "
                    "run the cell that made it to get it back"
                )
            else:
                ns[k] = obj
            continue
        try:
            ns[k] = torch_state.restore_tensor(held)  # the same tensor, or rebuilt where it was
        except RuntimeError as exc:  # no room on the GPU for it any more
            ns[k] = held.data
            problems.append(f"`{k}` is back in host memory ({type(exc).__name__})")


def _restore_torch(snap: Snapshot, problems: list[str]) -> None:
    # what the run made is let go before anything is rebuilt in its place: the optimizers' state
    # a rehearsal created (Adam's first step) and the gradients it left, then the models; on a
    # full card a rebuild beside them ran out of memory through %gpumem retry
    for o in snap.optimizers:
        _put_back(snap, o.opt, torch_state.restore_optimizer, o, problems)
    for m in snap.modules:
        torch_state.drop_replaced_grads(m)
    for m in snap.modules:
        _put_back(snap, m.module, torch_state.restore_module, m, problems)
    for s in snap.state_dicts:
        with contextlib.suppress(Exception):
            torch_state.restore_state_dict(s)
    for t in snap.tensors:
        torch_state.restore_tensor_if_alive(t)  # a freed one comes back only through a name
    for name, t, version in snap.watched:
        if torch_state.tensor_version(t) != version:
            problems.append(
                f"`{name}` ({format_bytes(torch_state.tensor_bytes(t))} in host memory, too large "
                "to copy) was written to and keeps the re-run's values"
            )


def _put_back(snap: Snapshot, obj: Any, restore_one: Any, saved: Any, problems: list[str]) -> None:
    """``restore_one(saved)``, or one line in ``problems`` where it fails (no room left on the
    GPU for a rebuilt tensor): a rollback never raises through the fix."""
    try:
        restore_one(saved)
    except Exception as exc:
        first = str(exc).split("\n", 1)[0].split(". ", 1)[0]
        problems.append(
            f"`{_name_of(snap, obj)}` could not be put back whole ({type(exc).__name__}: {first})"
        )


_MISSING = object()


class Transaction:
    """One fix on one notebook: a snapshot taken once, put back after each rehearsal and after a
    final run that does not fit, is interrupted or raises.

    ``not_covered`` (before anything runs) names what no rollback puts back; ``problems`` (after
    a rollback) what this one could not; ``whole`` is True when nothing is in either."""

    def __init__(
        self,
        ns: dict[str, Any],
        names: Iterable[str],
        *,
        leftovers: Iterable[str] = (),
        check_host: bool = True,
        before: before_cell.Before | None = None,
    ):
        self.ns = ns
        self.released: list[str] = []  # names deleted for good (as the fix said): not put back
        self.evicted: dict[str, Any] = {}  # name -> the tensor kept aside, put back on rollback
        self.problems: list[str] = []
        # The failed run's own leftovers: what holds GPU memory leaves the namespace before the
        # re-run (a tensor kept aside in host memory, put back on a rollback); the rest stays.
        evict, release = _sort_leftovers(ns, leftovers)
        leftover_bytes = sum(torch_state.tensor_bytes(ns[n]) for n in evict)
        self.snapshot = take(
            ns, names, check_host=check_host, extra_bytes=leftover_bytes, exclude=evict + release
        )
        sandbox.take_journal()  # what runs before the fix wrote is theirs, not the fix's
        with _no_interrupt():
            for name in evict:
                self.evicted[name] = torch_state.evict_tensor(ns.pop(name))
            for name in release:
                self.released.append(name)
                del ns[name]
        if evict or release:
            gc.collect()
            torch_state.release_cached()  # their blocks go back to the card, as the hook's release does
        self.not_covered = self.snapshot.not_covered
        # what the failed run itself changed in the models before it ran out: put back where the
        # hook recorded it before that cell (every run of the fix then starts as one clean run
        # would), named where it could not be
        self.before = before
        self.put_back, plans = _put_back_plans(self.snapshot, before)
        with _no_interrupt():
            for plan in self.put_back:
                plan.apply()
        self.failed_run = _failed_run_traces(self.snapshot, plans)
        self._failed_run_said = False
        self.not_covered += self.failed_run

    def release(self, name: str) -> None:
        """The fix deletes ``name`` on purpose: the snapshot must not keep it alive."""
        if self.snapshot.namespace.pop(name, _MISSING) is not _MISSING:
            self.released.append(name)

    def evict(self, name: str) -> None:
        """The fix replaces the tensor ``name`` (Move to CPU): keep its values in host memory
        only, and rebuild it where it was on a rollback."""
        value = self.snapshot.namespace.get(name, _MISSING)
        if value is _MISSING or not _is_tensor(value):
            return
        self.evicted[name] = torch_state.copy_tensor(value)
        del self.snapshot.namespace[name]

    def rollback(self, *, everything: bool = False) -> None:
        """Put back the snapshot: after a rehearsal, or a final run that did not fit (the failed
        run's leftovers stay out: they only held memory). ``everything``: the leftovers too, for
        an interrupt or an error, so the notebook is exactly as before the fix. Ctrl-C waits
        until all of it is done."""
        with _no_interrupt():
            self.problems = restore(self.snapshot, self.ns)
            if not everything:
                for plan in self.put_back:  # as before the failed cell again, not as it left them
                    plan.apply()
            elif self.put_back and self.before is not None:
                self.before.seal()  # as the failed run left them again: a next fix puts them back
            journal = sandbox.take_journal()  # a real run that failed: its files put back
            if journal is not None:
                self.problems += journal.undo()
            if everything:
                for name, kept in self.evicted.items():
                    try:
                        self.ns[name] = torch_state.restore_evicted(kept)
                    except RuntimeError as exc:  # no room on the GPU for it (a full card)
                        self.ns[name] = kept.data
                        self.problems.append(
                            f"`{name}` is back in host memory ({type(exc).__name__})"
                        )
                        continue
                    if getattr(kept, "detached", False):
                        self.problems.append(
                            f"`{name}` is back without its autograd graph (the graph held the "
                            "failed run's activations, freed for the re-run)"
                        )

    @property
    def whole(self) -> bool:
        """Everything the fix could have changed was put back (nothing named, nothing released)."""
        return self.nothing_kept and not self.released

    @property
    def nothing_kept(self) -> bool:
        """No effect of the fix's runs can have stayed: what "Nothing was kept" may claim."""
        return not self.problems and not self.not_covered

    def not_undone(self) -> list[str]:
        """What the last rollback could not put back, then what no rollback covers (each once)."""
        said = " ".join(self.problems)
        return self.problems + [n for n in self.not_covered if n.split(" ", 1)[0] not in said]

    def failed_run_note(self) -> str | None:
        """For a run the fix keeps: what of the failed run's own work was put back before it ran,
        and what it started from that one clean run from before that cell would not have; None
        when there is neither, or once said (a fix and its runner may both ask)."""
        if self._failed_run_said or not (self.failed_run or self.put_back):
            return None
        self._failed_run_said = True
        notes = []
        if self.put_back:
            notes.append(
                "Put back before the re-run, as they were before the failed cell: "
                + _listed(_put_back_items(self.put_back))
                + " (the failed run changed them before it ran out)."
            )
        if self.failed_run:
            notes.append(
                "Kept from the failed run: the re-run started from what it changed before it "
                "ran out, which nothing copied before that cell: " + _listed(self.failed_run) + "; "
                "one clean run would start from their values before that cell."
            )
        return " ".join(notes)

    def undo_message(self, *, everything: bool = False) -> str:
        """One line: what a rollback put back, and what it could not."""
        text = f"restored {self._restored()}, as they were before the fix"
        if self.evicted and not everything:
            names = list(self.evicted)
            text += f"; the failed run's {_listed([f'`{n}`' for n in names])}"
            text += f" stay{'s' if len(names) == 1 else ''} deleted "
            text += f"({'it' if len(names) == 1 else 'they'} held GPU memory; the cell makes "
            text += f"{'it' if len(names) == 1 else 'them'} again)"
        if self.put_back and not everything:
            text += "; " + _listed(_put_back_items(self.put_back))
            text += " as they were before the failed cell"
        if self.released:
            text += "; not restored (they held GPU memory; the cell makes them again): "
            text += _listed([f"`{n}`" for n in self.released])
        if self.problems:
            text += "; " + "; ".join(self.problems)
        left = self.not_undone()[len(self.problems) :]
        if left:
            text += "; not put back: " + _listed(left)
        return text + "."

    def _restored(self) -> str:
        snap = self.snapshot
        parts = ["the notebook's variables"]
        if snap.modules:
            parts.append(f"{len(snap.modules)} model{'s' if len(snap.modules) > 1 else ''}")
        if snap.optimizers:
            parts.append("optimizer state")
        if snap.state_dicts:
            parts.append("schedulers and scalers")
        files = snap.count(copies.File) + snap.count(copies.Memory)
        if files:
            parts.append(f"{files} open file{'s' if files > 1 else ''} (size and position)")
        local = [f"`{s.module.__name__}`" for s in snap.saved if isinstance(s, copies.Module)]
        if local:
            parts.append(f"the attributes of {_listed(local)}")
        parts.append("the random generators")
        # "schedulers and scalers" is one item: a comma before the last "and" keeps it one
        return _listed(parts, serial=bool(snap.state_dicts) or len(local) > 1)


def _sort_leftovers(ns: dict[str, Any], leftovers: Iterable[str]) -> tuple[list[str], list[str]]:
    """The failed run's leftovers that hold GPU memory: (tensors to keep aside, others to drop)."""
    evict, release = [], []
    for name in leftovers:
        if name not in ns:
            continue
        value = ns[name]
        if _is_tensor(value) and torch_state.on_gpu(value):
            evict.append(name)
        elif holds_gpu(value):
            release.append(name)
    return evict, release


def _is_tensor(value: Any) -> bool:
    """By its type (``isinstance`` would ask the object's own ``__class__``)."""
    torch = torch_objects.torch_module()
    return torch is not None and safe.is_a(type(value), torch.Tensor)


def _put_back_plans(
    snap: Snapshot, before: before_cell.Before | None
) -> tuple[list[before_cell.PutBack], dict[int, before_cell.PutBack]]:
    """(the put-backs that change something, every model's plan by id): what of the failed run's
    changes to the snapshot's models the record from before that cell can undo."""
    plans: dict[int, before_cell.PutBack] = {}
    if before is None:
        return [], plans
    for m in snap.modules:
        try:
            plan = before.plan(m.module)
        except Exception:  # a model that cannot be read: named, as without a record
            continue
        if plan is not None:
            plan.name = snap.where.get(id(m.module), plan.name)
            plans[id(m.module)] = plan
    return [p for p in plans.values() if p.changed], plans


def _put_back_items(plans: list[before_cell.PutBack]) -> list[str]:
    items = []
    for p in plans:
        if p.stats:
            items.append(f"`{p.name}`'s BatchNorm running statistics")
        if p.grads:
            items.append(f"the gradients in `{p.name}`'s `.grad`")
    return items


def _failed_run_traces(snap: Snapshot, plans: dict[int, before_cell.PutBack]) -> list[str]:
    """What the failed run may have left in the models the cell uses before it ran out, which
    no record from before that cell puts back."""
    found = []
    for m in snap.modules:
        name = _name_of(snap, m.module)
        bn, grads = torch_state.bn_and_grads(m.module)
        plan = plans.get(id(m.module))
        if plan is not None:
            bn, grads = bn and plan.stats_left, grads and plan.grads_left
        if bn:
            found.append(
                f"`{name}`'s BatchNorm running statistics (as the failed run's forward passes "
                "in training mode left them)"
            )
        if grads:
            found.append(
                f"the gradients in `{name}`'s `.grad` (as the failed run left them, if it got "
                "to backward)"
            )
    return found


def _name_of(snap: Snapshot, obj: Any) -> str:
    return snap.where.get(id(obj), "model")


def _listed(items: list[str], *, serial: bool = False) -> str:
    """``a``, ``a and b``, ``a, b and c`` (``a, b, and c`` with ``serial``, for items that hold an
    "and" of their own)."""
    if len(items) < 3:
        return " and ".join(items)
    return ", ".join(items[:-1]) + ("," if serial else "") + " and " + items[-1]

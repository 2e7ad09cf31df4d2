"""A fix as a transaction on the notebook: what it may change, put back if it does not work out.

Before a fix re-runs a cell, :func:`begin` takes a snapshot of what the cell can reach:

- the user namespace, shallow (every name and the object it is bound to), so a re-run that
  rebinds or creates globals (the batch variable included) can be undone;
- the contents of the plain containers the cell reads (lists, dicts, sets, deques; argparse and
  simple namespaces, dataclasses and objects of classes defined in the notebook), so that
  ``history.append(...)`` in a rehearsal leaves no trace;
- the torch objects the cell reads, directly or one or two levels down (``trainer.model``):
  models (parameters, buffers, ``.grad``, train/eval), optimizers, LR schedulers, grad scalers,
  tensors; copied to host memory by ``backends._state``;
- the random number generators.

Rehearsals (probes of a fix) are rolled back after each run; the final run is kept when it fits
and rolled back when it does not, or when anything interrupts it (Ctrl-C included). Only what
the notebook reaches through the names the cell (or the notebook functions it calls) reads is
covered: files, sockets, databases, iterators and objects of unknown libraries are not, and the
side-effect guard asks about those before anything runs. What the names reach, and what copying
it costs, is ``transaction_reach``'s.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import gc
import os
import signal
import threading
import types
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from jupyter_gpumem.backends import torch_objects, torch_state
from jupyter_gpumem.rescue.reach import BIG_HOST_TENSOR_BYTES, holds_gpu, plan_snapshot
from jupyter_gpumem.units import format_bytes

# Refuse when the snapshot would take more than this share of the available host memory.
HOST_SHARE = 0.8

_PLAIN_NS = (argparse.Namespace, types.SimpleNamespace)
_MUTABLE = (list, dict, set, collections.deque, bytearray)


class SnapshotTooLarge(Exception):
    """The snapshot would not fit in host memory."""


@dataclass
class Snapshot:
    namespace: dict[str, Any]
    containers: list[tuple[Any, Any]] = field(default_factory=list)
    objects: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)  # __dict__ copies
    modules: list[Any] = field(default_factory=list)
    optimizers: list[Any] = field(default_factory=list)
    state_dicts: list[Any] = field(default_factory=list)
    tensors: list[Any] = field(default_factory=list)
    watched: list[tuple[str, Any, int]] = field(default_factory=list)  # (name, tensor, version)
    rng: torch_state.RngState | None = None
    bytes: int = 0
    # names whose GPU-holding values the snapshot must not keep alive (a re-run that rebinds
    # `x = torch.randn(...)` or `model = Net().cuda()` frees the old one, as a real run does):
    # a tensor by its host copy, anything else by a weak reference
    weak: dict[str, Any] = field(default_factory=dict)


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


def _is_notebook_object(obj: Any) -> bool:
    cls = type(obj)
    if cls.__module__ == "__main__":
        return True
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def take(ns: dict[str, Any], names: Iterable[str], *, check_host: bool = True) -> Snapshot:  # noqa: C901 (issue 17: to be split)
    """Copy what a re-run of a cell reading ``names`` can change. Raises SnapshotTooLarge."""
    chosen, nbytes = plan_snapshot(ns, names)
    if check_host and nbytes:
        avail = host_available_bytes()
        if avail is not None and nbytes > HOST_SHARE * avail:
            raise SnapshotTooLarge(
                f"undoing a re-run needs a copy of {format_bytes(nbytes)} of model and optimizer "
                f"state in host memory, and only {format_bytes(avail)} is available"
            )
    snap = Snapshot(namespace=dict(ns), bytes=nbytes)
    torch_in_use = torch_objects.torch_module() is not None
    copies: dict[int, Any] = {}
    for name, obj in chosen:
        if torch_in_use and torch_objects.is_module(obj):
            snap.modules.append(torch_state.copy_module(obj))
        elif torch_in_use and torch_objects.is_optimizer(obj):
            snap.optimizers.append(torch_state.copy_optimizer(obj))
        elif torch_in_use and torch_objects.is_tensor(obj):
            if torch_state.on_gpu(obj) or torch_state.tensor_bytes(obj) <= BIG_HOST_TENSOR_BYTES:
                copies[id(obj)] = torch_state.copy_tensor(obj)
                snap.tensors.append(copies[id(obj)])
            else:
                snap.watched.append((name, obj, torch_state.tensor_version(obj)))
        elif torch_in_use and torch_state.has_plain_state(obj):
            c = torch_state.copy_state_dict(obj)
            if c is not None:
                snap.state_dicts.append(c)
        elif isinstance(obj, _MUTABLE):
            snap.containers.append((obj, _shallow(obj)))
        elif isinstance(obj, _PLAIN_NS) or _is_notebook_object(obj):
            with contextlib.suppress(TypeError):
                snap.objects.append((obj, dict(vars(obj))))
    if torch_in_use:
        for name in set(names) & set(ns):
            value = ns[name]
            if torch_objects.is_tensor(value) and id(value) in copies:
                snap.weak[name] = copies[id(value)]
            elif holds_gpu(value) and not torch_objects.is_tensor(value):
                try:
                    snap.weak[name] = weakref.ref(value)
                except TypeError:
                    continue  # not weakly referable (a list of tensors): kept alive
            else:
                continue
            del snap.namespace[name]
    snap.rng = torch_state.read_rng()
    return snap


def _shallow(obj: Any) -> Any:
    if isinstance(obj, dict):
        return list(obj.items())
    return list(obj)


def _put_container(obj: Any, saved: Any) -> None:
    if isinstance(obj, dict):
        cur = list(obj.items())
        if len(cur) == len(saved) and all(
            k is k2 and v is v2 for (k, v), (k2, v2) in zip(cur, saved, strict=True)
        ):
            return  # untouched (values compared by identity: tensors have no plain ==)
        obj.clear()
        obj.update(saved)
    elif isinstance(obj, list):
        obj[:] = saved
    elif isinstance(obj, set):
        obj.clear()
        obj.update(saved)
    elif isinstance(obj, collections.deque):
        obj.clear()
        obj.extend(saved)
    elif isinstance(obj, bytearray):
        obj[:] = bytes(saved)


@contextlib.contextmanager
def _no_interrupt() -> Iterator[None]:
    """Ctrl-C waits until the state is whole again, then is raised."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[Any] = []
    try:
        old = signal.signal(signal.SIGINT, lambda *a: pending.append(a))
    except (ValueError, TypeError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if pending:
            raise KeyboardInterrupt


def restore(snap: Snapshot, ns: dict[str, Any]) -> list[str]:  # noqa: C901 (issue 17: to be split)
    """Put everything back; returns what could not be (tensors too large to copy, written to)."""
    problems: list[str] = []
    with _no_interrupt():
        saved = snap.namespace
        for k in [k for k in ns if k not in saved]:
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
        for obj, content in snap.containers:
            _put_container(obj, content)
        for obj, attrs in snap.objects:
            d = vars(obj)
            for k in [k for k in d if k not in attrs]:
                delattr(obj, k)
            for k, v in attrs.items():
                if d.get(k, _MISSING) is not v:
                    object.__setattr__(obj, k, v)
        if snap.modules or snap.optimizers or snap.tensors or snap.state_dicts:
            for m in snap.modules:
                torch_state.restore_module(m)
            for o in snap.optimizers:
                torch_state.restore_optimizer(o)
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
        if snap.rng is not None:
            torch_state.restore_rng(snap.rng)
        gc.collect()
        torch_objects.empty_cache()
    return problems


_MISSING = object()


class Transaction:
    """One fix on one notebook: a snapshot taken once, put back after each rehearsal and after a
    final run that does not fit, is interrupted or raises."""

    def __init__(
        self,
        ns: dict[str, Any],
        names: Iterable[str],
        *,
        leftovers: Iterable[str] = (),
        check_host: bool = True,
    ):
        self.ns = ns
        self.released: list[str] = []  # names deleted for good (as the fix said): not put back
        self.evicted: dict[str, Any] = {}  # name -> host copy of a tensor, rebuilt on rollback
        self.problems: list[str] = []
        self.rollbacks = 0
        # The failed run's own leftovers: what holds GPU memory leaves the namespace before the
        # re-run (a tensor as a host copy, put back on a rollback); the rest stays where it is.
        value = None
        for name in leftovers:
            value = ns[name]
            if torch_objects.is_tensor(value) and torch_state.on_gpu(value):
                self.evicted[name] = torch_state.copy_tensor(value)
                del ns[name]
            elif holds_gpu(value):
                self.released.append(name)
                del ns[name]
        del value
        try:
            self.snapshot = take(ns, names, check_host=check_host)
        except BaseException:
            # refused (no host memory) or interrupted before anything ran: put the leftovers back
            for name, copied in self.evicted.items():
                ns[name] = torch_state.restore_tensor(copied)
            raise

    def release(self, name: str) -> None:
        """The fix deletes ``name`` on purpose: the snapshot must not keep it alive."""
        if self.snapshot.namespace.pop(name, _MISSING) is not _MISSING:
            self.released.append(name)

    def evict(self, name: str) -> None:
        """The fix replaces the tensor ``name`` (Move to CPU): keep its values in host memory
        only, and rebuild it where it was on a rollback."""
        value = self.snapshot.namespace.get(name, _MISSING)
        if value is _MISSING or not torch_objects.is_tensor(value):
            return
        self.evicted[name] = torch_state.copy_tensor(value)
        del self.snapshot.namespace[name]

    def rollback(self, *, everything: bool = False) -> None:
        """Put back the snapshot: after a rehearsal, or a final run that did not fit (the failed
        run's leftovers stay out: they only held memory). ``everything``: the leftovers too, for
        an interrupt or an error, so the notebook is exactly as before the fix."""
        self.problems = restore(self.snapshot, self.ns)
        if everything:
            for name, copied in self.evicted.items():
                self.ns[name] = torch_state.restore_tensor(copied)
        self.rollbacks += 1

    def undo_message(self, *, everything: bool = False) -> str:
        """One line: what a rollback put back, and what it could not."""
        snap = self.snapshot
        parts = ["the notebook's variables"]
        if snap.modules:
            parts.append(f"{len(snap.modules)} model{'s' if len(snap.modules) > 1 else ''}")
        if snap.optimizers:
            parts.append("optimizer state")
        if snap.state_dicts:
            parts.append("schedulers and scalers")
        parts.append("the random generators")
        # "schedulers and scalers" is one item: a comma before the last "and" keeps it one
        text = (
            f"restored {_listed(parts, serial=bool(snap.state_dicts))}, as they were before the fix"
        )
        if self.evicted and not everything:
            names = list(self.evicted)
            text += f"; the failed run's {_listed([f'`{n}`' for n in names])}"
            text += f" stay{'s' if len(names) == 1 else ''} deleted "
            text += f"({'it' if len(names) == 1 else 'they'} held GPU memory; the cell makes "
            text += f"{'it' if len(names) == 1 else 'them'} again)"
        if self.released:
            text += "; not restored (they held GPU memory; the cell makes them again): "
            text += _listed([f"`{n}`" for n in self.released])
        if self.problems:
            text += "; " + "; ".join(self.problems)
        return text + "."


def _listed(items: list[str], *, serial: bool = False) -> str:
    """``a``, ``a and b``, ``a, b and c`` (``a, b, and c`` with ``serial``, for items that hold an
    "and" of their own)."""
    if len(items) < 3:
        return " and ".join(items)
    return ", ".join(items[:-1]) + ("," if serial else "") + " and " + items[-1]

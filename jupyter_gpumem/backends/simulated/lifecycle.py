"""Starting and stopping the simulated GPU: its modes on every thread, ``torch.cuda``, forks.

torch's modes are per thread. ``start`` pushes them on its own thread, and on every thread started
while it runs (through ``threading.setprofile``, once per thread at its first call, then the
thread's previous profile function takes over), so work on a ``threading.Thread`` counts as on a
real card. Threads that were already running join with ``on_this_thread()`` (a widget's callback
on the kernel's comm thread, say). ``stop`` takes the modes off its own thread, makes those on
other threads inert (they pass everything through until the thread ends or the next ``start``
there), restores ``torch.cuda`` and the threading profile, and deselects the backend.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from jupyter_gpumem.backends import base
from jupyter_gpumem.backends.alloc_conf import AllocConf, parse_alloc_conf, read_alloc_conf
from jupyter_gpumem.backends.cuda_to_cpu import cuda_to_cpu_mode_class
from jupyter_gpumem.backends.simulated import compiled, cuda_api
from jupyter_gpumem.backends.simulated.counting import _counting_mode_class
from jupyter_gpumem.backends.simulated.gpu import SimulatedGPU
from jupyter_gpumem.backends.simulated.profiles import PROFILES, CardProfile, find_profile

__all__ = ["current", "on_this_thread", "paused", "record_history", "set_limit", "start", "stop"]

_state_lock = threading.RLock()
_sim: SimulatedGPU | None = None
_modes: tuple[Any, ...] = ()  # (function mode, dispatch mode) pushed by start
_thread: int | None = None
_borrowed: list[Any] = []  # function modes pushed by on_this_thread, on other threads
_adopted: weakref.WeakSet[Any] = weakref.WeakSet()  # function modes of threads started meanwhile
_recorder: Any = None  # the allocation-history recorder every card gets while tracing
_no_profile = object()
_previous_profile: Any = _no_profile  # threading's profile function before start


def record_history(recorder: Any) -> None:
    """Give each storage counted from now on (this card's and later ones') to ``recorder``
    (``alloc(new)``, ``free(key, nbytes)``, ``oom(size, free)``: backends/_trace.py); None ends it."""
    global _recorder
    with _state_lock:
        _recorder = recorder
        if _sim is not None:
            _sim._set_history(recorder)


def current() -> SimulatedGPU | None:
    """The running simulation, if any (from any thread)."""
    return _sim


def _new_modes(sim: SimulatedGPU, holds: Any) -> tuple[Any, Any]:
    function_mode = cuda_to_cpu_mode_class()(holds=holds, place=sim.placement)
    return function_mode, _counting_mode_class()(sim)


def start(
    total_bytes: int | str | None = None,
    *,
    profile: str | CardProfile | None = None,
    context_bytes: int | None = None,
    alloc_conf: AllocConf | str | None = None,
    other_processes: Iterable[tuple[int, int]] = (),
    allowed_bytes: int | None = None,
    devices: int = 1,
) -> SimulatedGPU:
    """Simulate a GPU of ``devices`` cards until :func:`stop`; replaces any running one.

    Each card is ``total_bytes`` with no CUDA context (``context_bytes`` to give it one), or a
    ``profile`` (``"T4"``, ``"A100-40GB"``, ``"H100-80GB"``, ... see ``profiles.PROFILES``; also
    taken as ``total_bytes``): its name, memory, compute capability and CUDA context.
    ``alloc_conf``: the caching allocator's settings (an ``AllocConf`` or the text of
    ``PYTORCH_CUDA_ALLOC_CONF``); by default read from the environment, as torch reads them. A
    setting torch refuses raises its ``AllocConfError`` (a ``ValueError``), and so does
    ``backend:cudaMallocAsync``, which the simulation does not model."""
    global _sim, _modes, _thread, _previous_profile
    import torch

    card_profile, size = _card(total_bytes, profile)
    conf = _alloc_conf(alloc_conf)
    context = (
        card_profile.context_bytes if context_bytes is None and card_profile else context_bytes
    )
    with _state_lock:
        stop()
        sim = SimulatedGPU(
            size,
            other_processes=other_processes,
            allowed_bytes=allowed_bytes,
            devices=devices,
            history=_recorder,
            simulation=_SIMULATION,
        )
        for card in sim.devices:
            card.configure(context_bytes=context or 0, conf=conf, profile=card_profile)
        function_mode, dispatch_mode = _new_modes(sim, sim._held_at_target)
        _remove_inert_modes()
        function_mode.__enter__()
        try:
            dispatch_mode.__enter__()
        except BaseException:
            _leave(function_mode, dispatch=False)
            raise
        _sim, _modes, _thread = sim, (function_mode, dispatch_mode), threading.get_ident()
        cuda_api.patch(torch, sim)
        _previous_profile = threading.getprofile()
        threading.setprofile(_adopt)
        base.select(sim)
        return sim


def _card(total_bytes: int | str | None, profile: str | CardProfile | None) -> tuple[Any, int]:
    """(the profile or None, the card's size) from ``start``'s arguments."""
    if isinstance(total_bytes, str):
        if profile is not None:
            raise ValueError("give a profile or a size, not both")
        total_bytes, profile = None, total_bytes
    if isinstance(profile, str):
        found = find_profile(profile)
        if found is None:
            names = ", ".join(PROFILES)
            raise ValueError(f"no simulated card is called {profile!r} (the profiles: {names})")
        profile = found
    if profile is not None:
        if total_bytes:  # None or 0: no size given
            raise ValueError("give a profile or a size, not both")
        return profile, profile.total_bytes
    if total_bytes is None:
        raise ValueError("a simulated GPU needs a size or a profile")
    return None, int(total_bytes)


def _alloc_conf(alloc_conf: AllocConf | str | None) -> AllocConf:
    conf = (
        read_alloc_conf()
        if alloc_conf is None
        else parse_alloc_conf(alloc_conf)
        if isinstance(alloc_conf, str)
        else alloc_conf
    )
    if not conf.native:
        where = f"{conf.source}={conf.text!r}" if conf.source else "backend:cudaMallocAsync"
        raise ValueError(
            f"{where}: the simulated GPU models PyTorch's native caching allocator, not "
            "cudaMallocAsync; unset the backend (or set backend:native) to simulate."
        )
    return conf


def stop() -> None:
    """End the simulation: leave the modes and restore ``torch.cuda``. Safe to call again."""
    global _sim, _modes, _thread, _previous_profile
    with _state_lock:
        sim, modes, thread = _sim, _modes, _thread
        _sim, _modes, _thread = None, (), None
        cuda_api.unpatch()
        if _previous_profile is not _no_profile:
            if threading.getprofile() is _adopt:
                threading.setprofile(_previous_profile)
            _previous_profile = _no_profile
        compiled.restore()
        if sim is None:
            return
        base.deselect(sim)
        sim._active = False
        for mode in (modes[0], *_borrowed, *_adopted):
            mode.active = False  # a borrowed one leaves its thread's stack when its block ends
        if thread == threading.get_ident():
            _leave(modes[1], dispatch=True)
            _leave(modes[0], dispatch=False)


def _adopt(frame: Any, event: str, arg: Any) -> Any:
    """A thread started during the simulation, at its first call: push the modes, then hand the
    thread to the profile function that was there before (if any)."""
    previous = None if _previous_profile is _no_profile else _previous_profile
    sys.setprofile(previous)
    with _state_lock:
        sim, modes = _sim, _modes
        if sim is not None:
            function_mode, dispatch_mode = _new_modes(sim, modes[0].holds)
            function_mode.active = modes[0].active
            try:
                function_mode.__enter__()
                dispatch_mode.__enter__()
            except Exception:  # the thread runs uncounted rather than not at all
                pass
            else:
                _adopted.add(function_mode)
    if previous is not None:
        return previous(frame, event, arg)
    return None


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Nothing allocated inside counts (CUDA placements still go to the CPU): for CPU work."""
    with _state_lock:
        sim, modes = _sim, _modes
    if sim is None:
        yield
        return
    was_active, holds = sim._active, modes[0].holds
    sim._active = False
    _set_holds(modes[0], None)
    try:
        yield
    finally:
        if _sim is sim:  # not stopped or replaced meanwhile
            sim._active = was_active
            _set_holds(modes[0], holds)


def _set_holds(primary: Any, holds: Any) -> None:
    with _state_lock:
        for mode in (primary, *_borrowed, *_adopted):
            mode.holds = holds


@contextlib.contextmanager
def on_this_thread() -> Iterator[SimulatedGPU | None]:
    """Run the block under the running simulation on this thread too; yields it (or None).

    For threads that were running before ``start`` (threads started after it have the modes
    already): pushes equivalent modes for the block and takes exactly those off at its end,
    whatever was pushed meanwhile. Nothing to do (cheap) with no simulation or where its modes
    are already active, so nested blocks and calls on the starting thread are free.
    """
    sim = _sim
    if sim is None or _counting_here(sim):
        yield sim
        return
    with _state_lock:
        sim = _sim  # stopped or replaced meanwhile: the one running now, if any
        if sim is not None:
            function_mode, dispatch_mode = _new_modes(sim, _modes[0].holds)
            function_mode.active = _modes[0].active
            _borrowed.append(function_mode)
    if sim is None:
        yield None
        return
    try:
        function_mode.__enter__()
        try:
            dispatch_mode.__enter__()
            try:
                yield sim
            finally:
                _leave(dispatch_mode, dispatch=True)
        finally:
            _leave(function_mode, dispatch=False)
    finally:
        with _state_lock:
            _borrowed.remove(function_mode)


def _counting_here(sim: SimulatedGPU) -> bool:
    """Whether ``sim``'s counting mode is on this thread's dispatch stack."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    counting = _counting_mode_class()
    return any(isinstance(m, counting) and m.sim is sim for m in _get_current_dispatch_mode_stack())


def set_limit(allowed_bytes: int | None) -> None:
    """Cap what this process may use on each running simulated card (None lifts the cap)."""
    sim = _sim
    if sim is None:
        raise RuntimeError("no simulated GPU is running: start one with `%gpumem simulate SIZE`")
    sim.set_limit(allowed_bytes)


def _stack_ops(dispatch: bool) -> tuple[Callable[[], list[Any]], Any, Any]:
    if dispatch:
        from torch.utils import _python_dispatch as d

        return d._get_current_dispatch_mode_stack, d._pop_mode, d._push_mode
    from torch import overrides as o

    return o._get_current_function_mode_stack, o._pop_mode, o._push_mode


def _leave(mode: Any, *, dispatch: bool) -> None:
    """Take ``mode`` off this thread's stack, leaving any mode pushed above it in place."""
    stack, pop, push = _stack_ops(dispatch)
    current_stack = stack()
    if not any(m is mode for m in current_stack):
        return
    if current_stack[-1] is mode:
        mode.__exit__(None, None, None)
        return
    above = []
    while (m := pop()) is not mode:
        above.append(m)
    for m in reversed(above):
        push(m)


def _remove_inert_modes() -> None:
    """Modes a stop on another thread could not reach, if this is their thread."""
    kinds = (cuda_to_cpu_mode_class(), _counting_mode_class())
    for dispatch in (False, True):
        for mode in _stack_ops(dispatch)[0]():
            inert = isinstance(mode, kinds[1]) and not mode.sim._active
            if inert or (isinstance(mode, kinds[0]) and not getattr(mode, "active", True)):
                _leave(mode, dispatch=dispatch)


class _Simulation:
    """This module as each simulated GPU is handed it (``gpu.Simulation``)."""

    current = staticmethod(current)
    stop = staticmethod(stop)
    paused = staticmethod(paused)
    on_this_thread = staticmethod(on_this_thread)


_SIMULATION = _Simulation()


def _after_fork_in_child() -> None:
    # DataLoader workers inherit this thread's modes: their copy of the card would run out on
    # its own, so they count nothing (CUDA placements still go to the CPU: there is no GPU there)
    if _sim is not None:
        _sim._active = False
        _modes[0].holds = None


os.register_at_fork(after_in_child=_after_fork_in_child)

"""What a smaller batch does to a learning-rate schedule sized in steps.

A schedule built for ``len(train_loader) * epochs`` steps (``OneCycleLR(total_steps=...)``,
Hugging Face's ``get_scheduler(..., num_training_steps=...)``, a ``LambdaLR`` whose lambda holds
the number of steps as ``num_training_steps``, ``total_steps``, ``max_steps`` or ``t_total``: a
``partial``'s keyword, a closure's cell, as in transformers' schedules before v4.27 and a
hand-written ``def lr_lambda(step)`` inside a helper, or a global the function reads) was sized
at the old batch: at a smaller one an epoch has more steps, so the schedule ends before the
training does (OneCycleLR then raises; a linear decay trains the rest at a learning rate of 0).
Reduce batch does not rebuild it (the code that built it may do more than that); it says which
schedule, for how many steps it was built, and for how many to build it. Read without running
the schedule's code: a ``partial``'s keywords, a closure's cells (``__closure__`` against
``__code__.co_freevars``) and a function's globals are data, looked at, never called.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
from collections.abc import Iterable, Mapping

__all__ = ["schedule_notes"]


# what a schedule's lambda calls the number of steps it decays over (transformers, timm, the
# PyTorch forums' hand-written lambdas)
_STEP_NAMES = ("num_training_steps", "total_steps", "max_steps", "t_total")


def _steps_of(obj: object) -> tuple[int, str, bool] | None:
    """(steps the schedule was built for, the setting's name, whether the lambda reads it as a
    global at each step) of a step-sized schedule."""
    kind = type(obj).__name__
    try:
        if kind == "OneCycleLR":
            total = inspect.getattr_static(obj, "total_steps", None)
            return (total, "total_steps", False) if type(total) is int else None
        lambdas = inspect.getattr_static(obj, "lr_lambdas", None)
    except Exception:
        return None
    if kind != "LambdaLR" or not isinstance(lambdas, list):
        return None
    for fn in lambdas:
        found = _lambda_steps(fn)
        if found is not None:
            return found
    return None


def _lambda_steps(fn: object) -> tuple[int, str, bool] | None:
    """The steps a LambdaLR's lambda was sized for: a ``partial``'s keyword, a closure's cell or
    a global the function reads (a method: its function's)."""
    if isinstance(fn, functools.partial):
        for name in _STEP_NAMES:
            total = fn.keywords.get(name)
            if type(total) is int:
                return total, name, False
        return None
    if type(fn) is types.MethodType:
        fn = fn.__func__
    if type(fn) is not types.FunctionType:
        return None  # a callable object: its attributes may be properties (user code)
    code = fn.__code__
    cells = dict(zip(code.co_freevars, fn.__closure__ or (), strict=False))
    for name in _STEP_NAMES:
        if name in cells:
            try:
                total = cells[name].cell_contents
            except ValueError:  # an empty cell: assigned after the closure was made
                continue
            if type(total) is int:
                return total, name, False
        elif name in code.co_names and type(fn.__globals__.get(name)) is int:
            return fn.__globals__[name], name, True
    return None


def _epoch_steps(loader: object, batch: int) -> int | None:
    """Steps in one epoch of ``loader`` at ``batch``."""
    try:
        dataset = inspect.getattr_static(loader, "dataset")
        n = len(dataset)
        drop = inspect.getattr_static(loader, "drop_last", False) is True
    except Exception:
        return None
    return n // batch if drop else math.ceil(n / batch)


def schedule_notes(
    namespace: Mapping[str, object],
    names: Iterable[str],
    loaders: Mapping[str, object],
    old: int,
    new: int,
) -> list[str]:
    """One note per schedule the cell reaches whose steps are a whole number of epochs of a
    loader Reduce batch changed."""
    notes = []
    for name in sorted(set(names)):
        obj = namespace.get(name)
        found = _steps_of(obj) if obj is not None else None
        if found is None:
            continue
        total, setting, read_each_step = found
        for loader_name, loader in loaders.items():
            before, after = _epoch_steps(loader, old), _epoch_steps(loader, new)
            if not before or not after or total % before:
                continue
            epochs = total // before
            notes.append(
                f"`{name}` ({type(obj).__name__}) was built for {total} steps ({setting}: "
                f"{epochs} epoch{'s' if epochs != 1 else ''} of {before} steps of "
                f"`{loader_name}` at batch {old}); at batch {new} an epoch is {after} steps, "
                f"so the schedule ends after {total / after:.2f} of the {epochs} epochs. "
                + _remedy(setting, epochs * after, loader_name, epochs, read_each_step)
            )
            break
    return notes


def _remedy(setting: str, steps: int, loader_name: str, epochs: int, read_each_step: bool) -> str:
    how = f"{steps} (len({loader_name}) * {epochs})"
    if read_each_step:
        # the lambda reads the global when it is called: setting it is enough, nothing to build
        return f"Set {setting} = {how}: the schedule's function reads it at each step."
    return f"Build it again with {setting}={how}."

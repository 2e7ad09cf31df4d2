"""What a smaller batch does to a learning-rate schedule sized in steps.

A schedule built for ``len(train_loader) * epochs`` steps (``OneCycleLR(total_steps=...)``,
Hugging Face's ``get_scheduler(..., num_training_steps=...)``, a ``LambdaLR`` over a ``partial``
that carries ``num_training_steps``) was sized at the old batch: at a smaller one an epoch has more
steps, so the schedule ends before the training does (OneCycleLR then raises; a linear decay
trains the rest at a learning rate of 0). Reduce batch does not rebuild it (the code that built
it may do more than that); it says which schedule, for how many steps it was built, and for how
many to build it. Read without running the schedule's code.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Iterable, Mapping

__all__ = ["schedule_notes"]


def _steps_of(obj: object) -> tuple[int, str] | None:
    """(steps the schedule was built for, the setting's name) of a step-sized schedule."""
    kind = type(obj).__name__
    try:
        if kind == "OneCycleLR":
            total = inspect.getattr_static(obj, "total_steps", None)
            return (total, "total_steps") if type(total) is int else None
        lambdas = inspect.getattr_static(obj, "lr_lambdas", None)
    except Exception:
        return None
    if kind != "LambdaLR" or not isinstance(lambdas, list):
        return None
    for fn in lambdas:
        if isinstance(fn, functools.partial):
            total = fn.keywords.get("num_training_steps")
            if type(total) is int:
                return total, "num_training_steps"
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
        total, setting = found
        for loader_name, loader in loaders.items():
            before, after = _epoch_steps(loader, old), _epoch_steps(loader, new)
            if not before or not after or total % before:
                continue
            epochs = total // before
            notes.append(
                f"`{name}` ({type(obj).__name__}) was built for {total} steps ({setting}: "
                f"{epochs} epoch{'s' if epochs != 1 else ''} of {before} steps of "
                f"`{loader_name}` at batch {old}); at batch {new} an epoch is {after} steps, "
                f"so the schedule ends after {total / after:.2f} of the {epochs} epochs. Build it "
                f"again with {setting}={epochs * after} (len({loader_name}) * {epochs})."
            )
            break
    return notes

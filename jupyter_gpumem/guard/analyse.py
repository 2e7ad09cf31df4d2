"""Before a failed cell is re-run: which of its lines already changed something a re-run changes
again, and what its rehearsals would do that nothing stops or undoes.

Static, from the cell's text, the names that existed before it ran and, given the namespace, the
objects they hold (read by type; nothing is executed). A line counts when it ran before the failing
line, or anywhere in a loop around it whose earlier passes ran the whole body. Which passes ran is
judged by what ran, not by what the body could do: the loop counters' values at the failure
(``for i in range(...)``, ``enumerate``, a counter set before the loop and added to once per pass,
``branch.passes_before``), else the failure record's ``earlier_passes``. The failing statement's
own effect did not happen (``step += f()`` where ``f`` raised), except ``X.step()`` and
``.backward()``, which may have run part way: a backward that ran out of memory is named for the
gradients it left in ``.grad``; a ``opt.step(closure)`` that ran out of memory inside its closure
(the failure's frames go through the function it was given) before a ``torch.optim`` optimizer
changed any weight (its closure is evaluated first; an LBFGS with ``n_iter`` 0) did not step. A name the cell binds from scratch (``acc = 0`` before ``acc +=
1``) is recreated by the re-run, and so is an optimizer built in the cell over a model built in the
cell. ``x = x.to(device)``, ``.cuda()``, ``.eval()`` are not rebinds, and ``obj.attr = v`` with a
``v`` not made from ``obj`` sets the same again: doing them twice is doing them once.

Given the user namespace, the notebook functions and methods the cell calls are read too
(``calls``), up to five calls deep, and so are functions defined in the code walked, where they are
called (``def get(): return next(it)``): a parameter stands for the object the caller passed, a
``global`` name for the global, a closure's variables (made before the cell) for what its cells
hold; a call before the failing line ran all of its body, the failing call ran up to its own
failing line when ``failed_frames`` names it, else all of it may have. Which branch of an ``if``
ran is read from the values its names held at the failure where that is certain (``branch``), for
each pass that ran under a counted loop; elsewhere both branches count.

The namespace also tells what no name says: an iterator a ``for`` loop takes from (a generator, not
a list or a loader), a bound method kept in a name (``add = L.append``, in this cell or before it),
a logger whose handlers write to a file, a thread class or an executor.

A rehearsal runs the cell from the top through two passes of the loop around the failing line (all
of it, without one), notebook functions whole. What it would do there that the audit hooks do not
stop (they end it at the first file opened for writing, process, new connection) and the
transaction does not undo (it restores the names' objects and open files) is asked about before
it runs, marked ``rehearsal``: an iterator advanced, a thread started, code that cannot be read
(``exec``, ``%run -i``), a queue, SQL on an open connection, a service's client (``wandb.log``).

Limits, by design: ``obj.add(x)`` or ``t.sort()`` count as mutations even where the receiver's type
makes them pure; aliasing is followed through plain names, attributes, items, views, bound methods
and the container displays the cell makes (``[train_log, val_log]``), not through containers built
by calls; a pre-existing name passed to a call (``crit(out, y)``) is taken to carry state into the
result, so a ``.backward()`` with no ``zero_grad()`` is counted unless everything it reads was made
in the cell. Code that is not the notebook's (a library, a module on disk) is judged by its name
only, and notebook code is read only where the call names it plainly (``f(x)``, ``obj.method()``,
``Cls(...)``), not through ``model(x)`` reaching a ``forward``, a callback, or a function kept in a
container; a notebook function whose source cannot be read is a call not looked into; a function's
assignments to globals do not carry back to the cell. ``next(it)`` counts on a pre-existing name
whatever it holds; a ``for`` loop only over what the namespace shows is an iterator. ``exec``/
``eval`` of a string (not a call-free constant) and ``globals()`` used other than as
``globals()["name"]`` are effects we cannot read, so they count; SQL counts unless its text starts
with a read (``SELECT``, ``PRAGMA``, a ``WITH`` that writes nothing). ``del name`` of a name the cell
did not make counts even if the names before the cell missed it: the failed run could not have
deleted it otherwise. Loop counters are read only in the cell (a notebook function's locals are not
in the failure record), and an ``if``'s values per pass only under the innermost counted loop.

Here the entry point; the work is in ``walk`` (the statements, in execution order), ``effects``
(what each call does), ``branch`` (which branch ran, how many passes), ``calls`` (notebook code and
objects, read without running them), ``words`` (the vocabulary, IPython syntax as effects) and
``verdict`` (what is said about it).
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from typing import Any

from jupyter_gpumem.cells import source as cellsource
from jupyter_gpumem.guard import calls
from jupyter_gpumem.guard.state import Reach
from jupyter_gpumem.guard.verdict import GuardVerdict, SideEffect, unknown
from jupyter_gpumem.guard.walk import Walker
from jupyter_gpumem.guard.words import read_cell

__all__ = ["GuardVerdict", "SideEffect", "analyse_rerun"]


def analyse_rerun(
    source: str,
    *,
    failed_lineno: int | None,
    preexisting: Collection[str],
    earlier_passes: bool | None = None,
    namespace: Mapping[str, Any] | None = None,
    failed_frames: Sequence[tuple[str, int]] | None = None,
    values_at_failure: Mapping[str, Any] | None = None,
    frame_values: Sequence[Mapping[str, Any]] | None = None,
) -> GuardVerdict:
    """The side effects a re-run of ``source`` would repeat, given where it failed, then those
    its rehearsals would have that nothing stops or undoes (``SideEffect.rehearsal``).

    ``earlier_passes``: whether loops around the failing line had run passes before the failing
    one; False means it failed in the first pass of each, None that it is unknown (as True); a
    loop whose counter's value at the failure tells is judged by that instead.
    ``namespace``: the user namespace; given, the functions and methods defined in the notebook
    that the cell calls are read too, and the objects names hold by their type.
    ``failed_frames``: (qualname, line in its cell) of each notebook function the failure went
    through, outermost first, for where each one stopped. ``values_at_failure``: the plain values
    of the cell's names when it failed (``FailedCell.plain_values``), from which ``if`` tests and
    loop counters are read (a later cell may have rebound them in ``namespace``).
    ``frame_values``: the plain values of each failing notebook frame's locals, in the order of
    ``failed_frames``, from which the loops and tests inside those functions are read the same way.
    """
    lines = cellsource.lines(source)
    limit = (
        failed_lineno if failed_lineno is not None and 1 <= failed_lineno <= len(lines) else None
    )
    try:
        tree = read_cell(source)
        if isinstance(tree, SideEffect):
            return GuardVerdict((tree,), limit)
        if tree is None:
            return unknown(limit, "could not read the cell; re-running may repeat its effects")
        body = calls.GlobalsAsNames().visit(tree).body
        frames = tuple((str(q), int(n)) for q, n in failed_frames or ())
        reach = None
        if namespace is not None:
            reach = Reach(namespace, at_failure=values_at_failure)
            reach.frame_values = dict(zip(frames, frame_values or (), strict=False))
        walker = _walker(source, lines, preexisting, limit, earlier_passes is not False, reach)
        walker.frames = frames
        walker.root = body
        walker.block(body)
        ahead = _rehearsal(source, lines, preexisting, limit, reach, body)
    except Exception as exc:  # fail closed: a cell we cannot read is one we ask about
        why = f"could not read the cell ({type(exc).__name__}); re-running may repeat its effects"
        return unknown(limit, why)
    found = {(e.lineno, e.kind, e.name): e for e in walker.effects}
    ran = sorted(found.values(), key=lambda e: e.lineno)
    coming = {
        (e.lineno, e.kind, e.name): e for e in ahead if (e.lineno, e.kind, e.name) not in found
    }
    rehearsed = [
        replace(e, rehearsal=True) for e in sorted(coming.values(), key=lambda e: e.lineno)
    ]
    return GuardVerdict(tuple(ran + rehearsed), limit, walker.in_loop)


def _walker(
    source: str,
    lines: list[str],
    preexisting: Collection[str],
    limit: int | None,
    earlier: bool,
    reach: Reach | None,
) -> Walker:
    walker = Walker(lines, preexisting, limit, earlier)
    walker.reach = reach
    walker.ipython = cellsource.read(source).changed
    return walker


def _rehearsal(
    source: str,
    lines: list[str],
    preexisting: Collection[str],
    limit: int | None,
    reach: Reach | None,
    body: list[ast.stmt],
) -> list[SideEffect]:
    """What a rehearsal runs (the cell from the top through the loop around the failing line, or
    all of it), every line and every notebook function in full, that no rollback undoes and no
    audit hook stops: an iterator or generator advanced, a thread started, code that cannot be
    read, a queue, a database on an open connection, a service's client."""
    end = _rehearsal_end(body, limit)
    walker = _walker(source, lines, preexisting, None, True, reach)
    walker.root = body
    walker.block(body)
    return [e for e in walker.effects if e.lineno <= end and kept_by_rehearsal(e)]


def _rehearsal_end(body: list[ast.stmt], limit: int | None) -> int:
    """The last line a rehearsal may run: the end of the innermost loop around the failing line
    (it stops after two passes of it), else the end of the cell."""
    last = max((s.end_lineno or s.lineno for s in body), default=0)
    if limit is None:
        return last
    around = [
        n.end_lineno or n.lineno
        for s in body
        for n in ast.walk(s)
        if isinstance(n, (ast.For, ast.AsyncFor, ast.While))
        and n.body[0].lineno <= limit <= (n.end_lineno or n.lineno)
    ]
    return min(around, default=last)


def kept_by_rehearsal(e: SideEffect) -> bool:
    """An effect of a rehearsal that is neither stopped (the audit hooks end it at the first file
    opened for writing, process, socket connection) nor undone (the transaction's snapshot)."""
    if e.kind in ("iterator", "thread", "exec", "queue", "database"):
        return True
    return e.kind == "io_call" and not e.name.startswith(STOPPED_CALLS)


# started by the calls the audit hooks stop: a new process
STOPPED_CALLS = ("shell command", "subprocess.", "os.system", "os.popen")

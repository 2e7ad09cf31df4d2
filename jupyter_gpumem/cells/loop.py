"""Rehearsals: a probe of a fix runs only until the fit is proven.

At the failure, :func:`find_loop` reads the traceback: the innermost loop around the failing line,
in the notebook's own code (the cell, or a function defined in the notebook that the cell called;
a frame without a loop hands over to its caller). A rehearsal then runs the cell under
:class:`LoopStopper`, which stops it once that loop has completed ``passes`` passes (two: a
second step allocates more where optimizer state is created lazily on the first). A cell whose
failure is not inside a loop runs whole.

The same reading tells whether the loop had run earlier passes when it failed
(:func:`earlier_passes`), so the side-effect guard does not count the rest of the loop body as
already done when the failure was on the first pass. It is judged by what ran: the loop target's
value at the failure (a counter past its start, the item of a list it takes, whether or not the
name existed before the cell), names the body binds after the failing line, and the state of an
optimizer stepped after it, which tells only for one the failed run made (an optimizer from an
earlier cell may have had its state then).
"""

from __future__ import annotations

import ast
import linecache
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any

from jupyter_gpumem.backends import torch_objects
from jupyter_gpumem.cells import source as cellsource

_LOOPS = (ast.For, ast.While, ast.AsyncFor)
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


class RehearsalDone(BaseException):
    """Raised into the cell when the rehearsal has seen enough passes; never reaches the user."""


@dataclass(frozen=True)
class LoopSite:
    """The loop a rehearsal stops on."""

    in_cell: bool  # in the failed cell's own code (its file changes with each re-run's source)
    filename: str  # the file of the code: a notebook cell's
    index: int  # position among the loops of that file, in source order
    header: tuple[int, int]  # first and last line of the loop's header
    body_first: int  # first line of the body's first statement
    first_end: int  # last line of the body's first statement
    function: str  # "<module>" or the function's name, for messages
    lineno: int  # the loop's first line, for messages

    def describe(self) -> str:
        where = "the cell" if self.function == "<module>" else f"`{self.function}`"
        return f"the loop at line {self.lineno} of {where}"


def _loops(tree: ast.AST) -> list[ast.For | ast.While | ast.AsyncFor]:
    found = [n for n in ast.walk(tree) if isinstance(n, _LOOPS)]
    return sorted(found, key=lambda n: (n.lineno, n.col_offset))


def _scope_of(tree: ast.AST, node: ast.AST) -> ast.AST | None:
    """The innermost function (or the module) whose own code contains ``node``."""
    best: ast.AST | None = tree

    def visit(n: ast.AST, scope: ast.AST) -> bool:
        nonlocal best
        for child in ast.iter_child_nodes(n):
            if child is node:
                best = scope
                return True
            inner = child if isinstance(child, _SCOPES) else scope
            if visit(child, inner):
                return True
        return False

    visit(tree, tree)
    return best


def _parse_file(filename: str) -> ast.Module | None:
    lines = linecache.getlines(filename)
    if not lines:
        return None
    return cellsource.parse_or_none("".join(lines))


def _innermost_loop(
    tree: ast.Module, lineno: int, scope_name: str
) -> ast.For | ast.While | ast.AsyncFor | None:
    """The innermost loop whose body contains ``lineno`` in the scope named ``scope_name``."""
    best = None
    for loop in _loops(tree):
        body = loop.body
        if not body or not (body[0].lineno <= lineno <= (body[-1].end_lineno or lineno)):
            continue
        scope = _scope_of(tree, loop)
        name = "<module>" if isinstance(scope, ast.Module) else getattr(scope, "name", "")
        if name != scope_name:
            continue
        # the loop must not be outside a def that holds the line (then it is the def's caller's)
        if best is None or loop.lineno >= best.lineno:
            best = loop
    return best


def site_of(
    loop: ast.For | ast.While | ast.AsyncFor, tree: ast.Module, filename: str, in_cell: bool
) -> LoopSite:
    first = loop.body[0]
    scope = _scope_of(tree, loop)
    function = "<module>" if isinstance(scope, ast.Module) else getattr(scope, "name", "?")
    return LoopSite(
        in_cell=in_cell,
        filename=filename,
        index=next(i for i, n in enumerate(_loops(tree)) if n is loop),
        header=(loop.lineno, first.lineno - 1),
        body_first=first.lineno,
        first_end=first.end_lineno or first.lineno,
        function=function,
        lineno=loop.lineno,
    )


def _user_frames(tb: TracebackType | None, user_ns: dict[str, Any]) -> list[tuple[FrameType, int]]:
    """(frame, line) of the notebook's own code in the traceback, outermost first."""
    out = []
    while tb is not None:
        f = tb.tb_frame
        if f.f_globals is user_ns:
            if _inside_model(f):
                break  # a model's forward (its loop over layers is one step's computation)
            out.append((f, tb.tb_lineno))
        tb = tb.tb_next
    return out


def _inside_model(frame: FrameType) -> bool:
    """A frame of a method of a torch module defined in the notebook (``forward``, a block)."""
    try:
        self = frame.f_locals.get("self")
    except Exception:
        return False
    return self is not None and torch_objects.is_module(self)


def find_loop(
    tb: TracebackType | None, user_ns: dict[str, Any], preexisting: frozenset[str] = frozenset()
) -> tuple[LoopSite | None, bool | None]:
    """The loop to stop rehearsals on, and whether it (or a loop around it) ran earlier passes.

    Earlier passes: True when a loop around the failure had run past the failing line before
    (a name assigned later in its body is bound, or its counter is past its start), False when
    every such loop was on its first pass, None when there is no telling.
    """
    frames = _user_frames(tb, user_ns)
    if not frames:
        return None, None
    cell_file = next(
        (f.f_code.co_filename for f, _ in frames if f.f_code.co_name == "<module>"),
        frames[0][0].f_code.co_filename,
    )
    site: LoopSite | None = None
    innermost: LoopSite | None = None
    verdicts: list[bool | None] = []
    for frame, lineno in reversed(frames):
        filename = frame.f_code.co_filename
        tree = _parse_file(filename)
        if tree is None:
            continue
        name = frame.f_code.co_name
        loop = _innermost_loop(tree, lineno, name)
        done_to = lineno  # this pass ran up to here: for an outer loop, the inner loop's end
        while loop is not None:
            # a training step is the loop that steps an optimizer (nanoGPT's micro-step loop
            # inside its `while True` is not: Adam's state appears at the step); else innermost
            if innermost is None:
                innermost = site_of(loop, tree, filename, filename == cell_file)
            if site is None and _steps(loop):
                site = site_of(loop, tree, filename, filename == cell_file)
            scope = _scope_of(tree, loop) or tree
            verdicts.append(_earlier(scope, loop, lineno, done_to, frame, user_ns, preexisting))
            done_to = max(done_to, loop.end_lineno or loop.lineno)
            loop = _innermost_loop(tree, loop.lineno, name)  # the loop around this one, if any
    site = site or innermost
    if any(v is True for v in verdicts):
        return site, True
    if verdicts and all(v is False for v in verdicts):
        return site, False
    return site, None


def earlier_passes(
    tb: TracebackType | None, user_ns: dict[str, Any], preexisting: frozenset[str] = frozenset()
) -> bool | None:
    return find_loop(tb, user_ns, preexisting)[1]


def _stores(node: ast.AST) -> Iterator[ast.Name]:
    """Plain names bound in ``node``'s own code (not in nested defs)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _SCOPES):
            continue
        if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
            yield child
        yield from _stores(child)


def _stores_after(loop: ast.AST, lineno: int, scope: ast.AST | None = None) -> set[str]:
    """Names the loop's body binds only on lines after ``lineno``: bound now, they prove that an
    earlier pass got past it (a name also bound before ``lineno`` proves nothing)."""
    after = {n.id for n in _stores(loop) if n.lineno > lineno}
    if scope is not None:
        after -= {n.id for n in _stores(scope) if n.lineno <= lineno}
    return after


def _counter_start(loop: ast.AST) -> tuple[str, int] | None:
    """``for i in range(a, ...)`` / ``for i, x in enumerate(it, start)``: (i, its first value)."""
    if not isinstance(loop, (ast.For, ast.AsyncFor)) or not isinstance(loop.iter, ast.Call):
        return None
    call, target = loop.iter, loop.target
    fn = call.func.id if isinstance(call.func, ast.Name) else None
    if fn == "range" and isinstance(target, ast.Name):
        if len(call.args) == 1:
            return target.id, 0
        first = call.args[0] if call.args else None
        if isinstance(first, ast.Constant) and isinstance(first.value, int):
            return target.id, first.value
    if fn == "enumerate" and isinstance(target, ast.Tuple) and target.elts:
        idx = target.elts[0]
        if not isinstance(idx, ast.Name):
            return None
        start: ast.expr | None = call.args[1] if len(call.args) > 1 else None
        for kw in call.keywords:
            if kw.arg == "start":
                start = kw.value
        if start is None:
            return idx.id, 0
        if isinstance(start, ast.Constant) and isinstance(start.value, int):
            return idx.id, start.value
    return None


def _earlier(
    tree: ast.AST,
    loop: ast.AST,
    lineno: int,
    done_to: int,
    frame: FrameType,
    user_ns: dict[str, Any],
    preexisting: frozenset[str],
) -> bool | None:
    module = frame.f_code.co_name == "<module>"
    scope: dict[str, Any] = user_ns if module else dict(frame.f_locals)

    def bound(name: str) -> bool:
        if module and name in preexisting:
            return False  # bound before the cell: says nothing about this run
        return name in scope

    # the loop's own target was bound by this run's pass (the failing line is in its body),
    # whether or not the name existed before the cell
    told = _pass_of(loop, lineno, scope)
    if told is not None:
        return told
    after = {n for n in _stores_after(loop, done_to, tree) if not (module and n in preexisting)}
    after -= {n.id for n in _stores(tree) if n.lineno <= lineno}
    if any(bound(n) for n in after):
        return True
    # an optimizer stepped after the failing line has no state yet: no pass got that far; state
    # tells only of an optimizer this run made (one from before the cell may have had it then)
    stepped = _steps_after(loop, done_to, scope)
    if stepped and not any(_has_state(o) for _, o in stepped):
        return False
    made_here = _made_before(tree, loop, {n for n, _ in stepped}, preexisting if module else None)
    if any(n in made_here and _has_state(o) for n, o in stepped):
        return True
    return False if after else None


def _pass_of(loop: ast.AST, lineno: int, scope: dict[str, Any]) -> bool | None:
    """Whether the failing pass of ``loop`` was past its first, read from its target's value at
    the failure: a counter (``range``, ``enumerate``) past its start, or the item of a list or
    tuple the loop takes (by identity, where it stands once in it); None when neither tells or
    the body rebinds the target before the failing line."""
    if not isinstance(loop, (ast.For, ast.AsyncFor)):
        return None
    rebound = {n.id for n in _stores(loop) if n.lineno <= lineno and n.lineno > loop.lineno}
    counter = _counter_start(loop)
    if counter is not None:
        value = scope.get(counter[0])
        if counter[0] not in rebound and type(value) is int:
            return value != counter[1]
        return None
    return _item_pass(loop, scope, rebound)


def _item_pass(
    loop: ast.For | ast.AsyncFor, scope: dict[str, Any], rebound: set[str]
) -> bool | None:
    """``for x in xs`` / ``for x, y in pairs`` over a list or tuple the scope holds: the pass is
    where the target's value stands in it, by identity (its first name, for a tuple target)."""
    target, it = loop.target, loop.iter
    if not isinstance(it, ast.Name) or type(scope.get(it.id)) not in (list, tuple):
        return None
    items: list[Any] | tuple[Any, ...] = scope[it.id]
    first = target.elts[0] if isinstance(target, (ast.Tuple, ast.List)) and target.elts else target
    if not isinstance(first, ast.Name) or first.id in rebound or first.id not in scope:
        return None
    value = scope[first.id]
    if first is not target:
        items = [x[0] if type(x) in (list, tuple) and x else _NOTHING for x in items]
    at = [i for i, x in enumerate(items) if x is value]
    if len(at) != 1:
        return None
    return at[0] != 0


_NOTHING = object()


def _made_before(
    tree: ast.AST, loop: ast.AST, names: set[str], preexisting: frozenset[str] | None
) -> set[str]:
    """Of ``names``, those the failed run made before ``loop``: assigned in the scope's own code
    above the loop (not a parameter); at the cell's top level, also a name that did not exist
    before the cell (``preexisting`` given)."""
    start = getattr(loop, "lineno", 0)
    made = {n.id for n in _stores(tree) if n.lineno < start and n.id in names}
    if preexisting is not None:
        made |= {n for n in names if n not in preexisting}
    return made


def _steps_after(loop: ast.AST, lineno: int, scope: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, optimizer) the loop body steps (``opt.step()``, ``scaler.step(opt)``) after
    ``lineno``."""
    found = []
    for node in ast.walk(loop):
        if not (isinstance(node, ast.Call) and getattr(node, "lineno", 0) > lineno):
            continue
        f = node.func
        if not (isinstance(f, ast.Attribute) and f.attr == "step"):
            continue
        for cand in (f.value, *node.args):
            if isinstance(cand, ast.Name) and torch_objects.is_optimizer(scope.get(cand.id)):
                found.append((cand.id, scope[cand.id]))
    return found


def _steps(loop: ast.AST) -> bool:
    """Does the loop's body call ``X.step(...)`` (an optimizer, a scaler) or a notebook function
    that may (a call whose name says train or step)?"""
    for node in ast.walk(loop):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name == "step" or "train" in name.lower() or "step" in name.lower():
                return True
    return False


def _has_state(opt: Any) -> bool:
    try:
        return len(opt.state) > 0
    except Exception:
        return True


class LoopStopper:
    """Stop the code once ``site``'s loop has run ``passes`` passes: raise RehearsalDone into it
    when the next pass starts. ``sys.settrace`` on this thread only; restored on exit (a
    debugger's or coverage's tracer is paused meanwhile)."""

    def __init__(self, filename: str, site: LoopSite, passes: int = 2) -> None:
        self.filename = filename
        self.site = site
        self.passes = passes
        self.started = 0  # passes started
        self._prev: Any = None

    def __enter__(self) -> LoopStopper:
        self._prev = sys.gettrace()
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self._prev)

    @property
    def completed(self) -> int:
        return max(0, self.started - 1)

    def _global(self, frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename != self.filename:
            return None
        site = self.site
        h0, h1 = site.header
        first, first_end = site.body_first, site.first_end
        prev: list[int | None] = [None]

        def local(frame: FrameType, event: str, arg: Any) -> Any:
            if event != "line":
                return local
            line = frame.f_lineno
            p = prev[0]
            prev[0] = line
            if line == first and (p is None or h0 <= p <= h1 or p > first_end):
                self.started += 1
                if self.started > self.passes:
                    raise RehearsalDone
            return local

        return local


def relocate(site: LoopSite, code: str, filename: str) -> LoopSite | None:
    """The same loop in a re-run's version of the cell (same position among the loops)."""
    if not site.in_cell:
        return site
    tree = cellsource.parse_or_none(code, filename)  # the tree the re-run compiled, cached
    if tree is None:
        return None
    loops = _loops(tree)
    if site.index >= len(loops):
        return None
    return site_of(loops[site.index], tree, filename, True)

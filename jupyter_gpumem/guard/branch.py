"""Which branch of an ``if`` ran in the failing pass, read from the values its test's names hold at
the failure, for the guard: ``if iter_num > 0:`` on the first pass of nanoGPT's loop was false, so
the ``torch.save`` under it never ran.

Only where that is certain; anything else is None, and the walk then counts both branches, as it
does for any test it cannot read. Certain means:

- the test is made of names, constants, comparisons, boolean and arithmetic operators (no calls,
  attributes, items, walrus), and every value in it is a plain ``int``, ``float``, ``bool``,
  ``str``, ``bytes`` or ``None`` (exactly: a subclass could run code): immutable, so only a
  rebinding changes what the test says, and evaluating it here runs no user code;
- the walk is in the failing pass (no loop around the failing line whose earlier passes ran all of
  it), and the test ran once there or in loops none of whose lines rebind its names;
- no line between the test (or the start of the finished loops around it) and the failing line,
  or the end of the loops around that line when earlier passes ran, binds or deletes one of its
  names, names ``exec``/``globals``/``get_ipython``... or is IPython syntax (``%run`` runs code);
- no notebook code (functions and methods defined in the notebook, generators they started) may
  rebind one of its names as a global (``global n`` then ``n += 1``) or names ``exec``,
  ``globals()``...;
- in a notebook function, the names are globals of the notebook, not the function's own locals
  nor those of the functions around it.

The values are those the names held when the cell failed (``FailedCell.plain_values``, recorded
then: plain values are immutable, so keeping them is keeping what the test saw), whatever a cell
run since has set; without that record (``analyse_rerun`` called on its own), the namespace's. Code outside the
notebook (a library) rebinding a notebook global, or the notebook's module reached under another
name (``m.n = 1``), is not looked for.
"""

from __future__ import annotations

import ast
import dis
import functools
import operator
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jupyter_gpumem.cells.failure import PLAIN
from jupyter_gpumem.guard.calls import MISSING
from jupyter_gpumem.guard.words import zeroes

if TYPE_CHECKING:
    from jupyter_gpumem.guard.effects import CallReader
    from jupyter_gpumem.guard.state import Reach

NUMBERS = (int, float, bool)
# names through which code may bind any global: a line or a function using one is read as binding all
ANY_NAME = {"exec", "eval", "globals", "vars", "locals", "get_ipython", "__import__", "__main__"}
ARITH: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
}  # fmt: skip
COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}  # fmt: skip
PLAIN_NODES = (
    ast.Constant, ast.Name, ast.Compare, ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.Tuple, ast.List,
    ast.Set, ast.expr_context, ast.boolop, ast.unaryop, ast.operator, ast.cmpop,
)  # fmt: skip
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
STATEMENT_PARTS = (ast.stmt, ast.excepthandler, ast.match_case)
NAMESPACE_LIMIT = 20_000  # values of the namespace read for notebook code
CODE_LIMIT = 5_000  # code objects of notebook code read for the globals they bind


class Unsure(Exception):
    """The test is not one we evaluate."""


def taken(w: CallReader, s: ast.If) -> bool | None:
    """Whether ``s``'s body ran (True) or its ``else`` (False) in the passes that ran: the failing
    one, and inside a loop around the failing line whose counter's values are known, every earlier
    pass; None: unknown, or the one in some passes and the other in others."""
    if w.limit is None or w.reach is None or (w.full and not w.passes):
        return None
    names = plain_names(s.test)
    if names is None or (names & local_names(w) and w.local_values is None):
        return None
    if w.fn is not None and names & w.fn.free:
        return None  # a closure's: what the function around it set
    counters = frozenset(w.passes[0]) if w.full and w.passes else frozenset()
    start = w.loops[0] if w.loops else s.lineno
    end = span_end(w.root, w.limit, w.earlier or w.full > 0)
    if any(start <= line <= end for line in w.ipython):
        return None
    bound = bound_in(w.root, start, end)
    if bound is None or (names - counters) & bound:
        return None
    rebound = rebound_globals(w.reach)
    if rebound is None or (names - local_names(w)) & rebound:
        return None
    values = {n: at_failure(w, n) for n in names - counters}
    if not counters or not w.passes:
        return truth(s.test, values)
    # the passes that reached the test: the failing one only if the test is before its line
    envs = w.passes if s.lineno <= w.limit else w.passes[:-1]
    seen = {truth(s.test, {**values, **env}) for env in envs}
    return seen.pop() if len(seen) == 1 else None


def local_names(w: CallReader) -> frozenset[str]:
    """The names of the function walked (none for the cell)."""
    return w.own | (w.fn.local if w.fn is not None else frozenset())


def at_failure(w: CallReader, name: str) -> Any:
    """The plain value ``name`` held when the cell failed (the namespace's without a record); a
    function's own name, from its failing frame's record (MISSING without one)."""
    if name in local_names(w):
        return MISSING if w.local_values is None else w.local_values.get(name, MISSING)
    if w.reach is not None and w.reach.at_failure is not None:
        return w.reach.at_failure.get(name, MISSING)
    return w.lookup(name)


def zeroes_in(w: CallReader, body: list[ast.stmt]) -> bool:
    """Whether ``body`` zeroes the gradients in the passes that ran: ``zero_grad()``, ``p.grad =
    None``; under an ``if`` only where the branch with it ran (``taken``)."""
    for s in body:
        if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if zeroes(s):
            return True
        if isinstance(s, ast.If):
            ran = taken(w, s)
            blocks = [s.body, s.orelse] if ran is None else [s.body if ran else s.orelse]
            heads: list[ast.AST] = [s.test]
        else:
            blocks = [
                b
                for f in ("body", "orelse", "finalbody")
                if isinstance(b := getattr(s, f, None), list)
            ]
            blocks += [h.body for h in getattr(s, "handlers", [])]
            blocks += [c.body for c in getattr(s, "cases", [])]
            heads = [n for n in ast.iter_child_nodes(s) if not isinstance(n, STATEMENT_PARTS)]
        if any(zeroes(n) for h in heads for n in ast.walk(h)):
            return True
        if any(zeroes_in(w, b) for b in blocks):
            return True
    return False


# ---- how many passes of a loop ran before the failing one --------------------------------------------


@dataclass(frozen=True)
class Counted:
    """The passes of a loop around the failing line that ran before the failing one, read from the
    values at the failure."""

    passes: int
    # the loop counter's value in each pass that ran, the failing one last; [] when not known
    values: list[dict[str, Any]]


def passes_before(w: CallReader, loop: ast.For | ast.AsyncFor | ast.While) -> Counted | None:
    """How many passes of ``loop`` (around the failing line, in the cell) ran before the failing
    one, where the values at the failure tell it for certain; None elsewhere.

    - ``for i in range(a, b, k)`` / ``for i, x in enumerate(xs, a)``: ``i``'s value at the failure,
      unless the body rebinds ``i`` before the failing line; a name the loop sets again each pass,
      so one that existed before the cell tells it as well;
    - a counter the cell sets to a number just before the loop and adds a number to once per pass,
      in the loop's own body, with no ``continue`` that could skip it (nanoGPT's
      ``local_iter_num``);

    and neither rebound by notebook code, ``exec`` or IPython syntax anywhere in the loop."""
    if w.reach is None or w.limit is None:
        return None
    if (w.fn is not None or w.own) and w.local_values is None:
        return None  # a function's counters are its locals: known only from its frame's record
    end = loop.end_lineno or loop.lineno
    if any(loop.lineno <= line <= end for line in w.ipython):
        return None
    if bound_in(loop.body, loop.lineno, end) is None:
        return None  # exec, globals(), import *: anything may be rebound
    return _range_counter(w, loop) or _listed_counter(w, loop) or _step_counter(w, loop)


PASS_VALUES = 4096  # earlier passes whose counter values are listed, for the tests of ``if``s


def _range_counter(w: CallReader, loop: ast.AST) -> Counted | None:
    head = _counter_head(w, loop)
    if head is None:
        return None
    name, start, step = head
    value = at_failure(w, name)
    assert isinstance(loop, (ast.For, ast.AsyncFor))
    rebinds = bound_in(loop.body, loop.body[0].lineno, w.limit or 0)
    if type(value) is not int or rebinds is None or name in rebinds or _rebound(w, name):
        return None
    passes, off = divmod(value - start, step)
    if off or passes < 0:
        return None
    values = [{name: start + j * step} for j in range(passes + 1)] if passes < PASS_VALUES else []
    return Counted(passes, values)


def _listed_counter(w: CallReader, loop: ast.AST) -> Counted | None:
    """``for phase in ['train', 'val']``: the pass is where the value at the failure stands in the
    list (its values all plain and different)."""
    if not isinstance(loop, (ast.For, ast.AsyncFor)) or not isinstance(loop.target, ast.Name):
        return None
    if not isinstance(loop.iter, (ast.List, ast.Tuple)):
        return None
    items = [e.value if isinstance(e, ast.Constant) else MISSING for e in loop.iter.elts]
    if MISSING in items or len(set(map(repr, items))) != len(items):
        return None
    name = loop.target.id
    value = at_failure(w, name)
    rebinds = bound_in(loop.body, loop.body[0].lineno, w.limit or 0)
    if type(value) not in PLAIN or rebinds is None or name in rebinds or _rebound(w, name):
        return None
    at = [i for i, x in enumerate(items) if type(x) is type(value) and x == value]
    if len(at) != 1:
        return None
    return Counted(at[0], [{name: x} for x in items[: at[0] + 1]])


def _counter_head(w: CallReader, loop: ast.AST) -> tuple[str, int, int] | None:
    """(counter, first value, step) of ``for i in range(...)`` / ``for i, x in enumerate(...)``."""
    if not isinstance(loop, (ast.For, ast.AsyncFor)) or not isinstance(loop.iter, ast.Call):
        return None
    call, target = loop.iter, loop.target
    fn = call.func.id if isinstance(call.func, ast.Name) else None
    if fn == "range" and isinstance(target, ast.Name) and not call.keywords and call.args:
        start = _number(w, loop, call.args[0]) if len(call.args) > 1 else 0
        step = _number(w, loop, call.args[2]) if len(call.args) > 2 else 1
        if start is None or not step:
            return None
        return target.id, start, step
    if fn == "enumerate" and isinstance(target, ast.Tuple) and target.elts:
        idx = target.elts[0]
        first: ast.expr | None = call.args[1] if len(call.args) > 1 else None
        first = next((k.value for k in call.keywords if k.arg == "start"), first)
        start = 0 if first is None else _number(w, loop, first)
        if not isinstance(idx, ast.Name) or start is None:
            return None
        return idx.id, start, 1
    return None


def _number(w: CallReader, loop: ast.For | ast.AsyncFor, node: ast.expr) -> int | None:
    """An ``int`` constant, or a name holding one that nothing in the loop rebinds."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        n = _number(w, loop, node.operand)
        return None if n is None else -n
    if isinstance(node, ast.Constant):
        return node.value if type(node.value) is int else None
    if isinstance(node, ast.Name):
        value = at_failure(w, node.id)
        bound = bound_in([loop], loop.lineno, loop.end_lineno or loop.lineno)
        if type(value) is int and bound is not None and node.id not in bound:
            return None if _rebound(w, node.id) else value
    return None


def _step_counter(w: CallReader, loop: ast.For | ast.AsyncFor | ast.While) -> Counted | None:
    """``n = 0`` just before the loop, ``n += 1`` once per pass in its body: passes from ``n``."""
    body, at = w.here
    if at >= len(body) or body[at] is not loop or _continues(loop.body):
        return None
    limit = w.limit or 0
    failing = next(
        (j for j, b in enumerate(loop.body) if b.lineno <= limit <= (b.end_lineno or b.lineno)),
        None,
    )
    for j, b in enumerate(loop.body):
        got = _increment(b)
        if got is None or failing is None or _stores(loop, got[0]) != 1 or _rebound(w, got[0]):
            continue
        name, k = got
        start = _set_before(body, at, name)
        value = at_failure(w, name)
        if start is None or type(value) is not int:
            continue
        done, off = divmod(value - start, k)
        passes = done - 1 if j < failing else done  # this pass added already: one fewer before
        if not off and passes >= 0:
            return Counted(passes, [])
    return None


def _increment(s: ast.stmt) -> tuple[str, int] | None:
    """``n += k`` with ``k`` a positive ``int``: (n, k)."""
    if not (isinstance(s, ast.AugAssign) and isinstance(s.op, ast.Add)):
        return None
    if not isinstance(s.target, ast.Name) or not isinstance(s.value, ast.Constant):
        return None
    k = s.value.value
    return (s.target.id, k) if type(k) is int and k > 0 else None


def _set_before(body: list[ast.stmt], at: int, name: str) -> int | None:
    """The number ``name`` was set to by the last statement before ``body[at]`` binding it, when
    that is ``name = <int>`` in the same block."""
    for s in reversed(body[:at]):
        lines = bound_in([s], s.lineno, s.end_lineno or s.lineno)
        if lines is None:
            return None
        if name not in lines:
            continue
        if (
            isinstance(s, ast.Assign)
            and len(s.targets) == 1
            and isinstance(s.targets[0], ast.Name)
            and isinstance(s.value, ast.Constant)
            and type(s.value.value) is int
        ):
            return s.value.value
        return None
    return None


def _stores(loop: ast.AST, name: str) -> int:
    """How many places in ``loop``'s body bind ``name`` (its header aside)."""
    body = getattr(loop, "body", [])
    return sum(
        1
        for b in body
        for n in ast.walk(b)
        if (isinstance(n, ast.Name) and n.id == name and not isinstance(n.ctx, ast.Load))
        or (isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == name)
    )


def _continues(body: list[ast.stmt]) -> bool:
    """A ``continue`` of this loop (not of a loop inside it)."""
    todo: list[ast.AST] = list(body)
    while todo:
        n = todo.pop()
        if isinstance(n, ast.Continue):
            return True
        if not isinstance(n, (ast.For, ast.AsyncFor, ast.While, *SCOPES)):
            todo.extend(ast.iter_child_nodes(n))
        elif isinstance(n, (ast.For, ast.AsyncFor, ast.While)):
            todo.extend(n.orelse)  # a loop's else belongs to the loop around it
    return False


def _rebound(w: CallReader, name: str) -> bool:
    """Notebook code may rebind ``name`` as a global (a function's own name: not as a global)."""
    if name in local_names(w):
        return False
    assert w.reach is not None
    rebound = rebound_globals(w.reach)
    return rebound is None or name in rebound


# ---- the test --------------------------------------------------------------------------------------


def plain_names(test: ast.expr) -> frozenset[str] | None:
    """The names a plain test reads; None when it is not plain (a call, an attribute, ...)."""
    nodes = list(ast.walk(test))
    plain = (
        all(isinstance(n, PLAIN_NODES) for n in nodes)
        and all(type(n.op) in ARITH for n in nodes if isinstance(n, ast.BinOp))
        and all(type(op) in COMPARE for n in nodes if isinstance(n, ast.Compare) for op in n.ops)
    )
    return frozenset(n.id for n in nodes if isinstance(n, ast.Name)) if plain else None


def truth(test: ast.expr, values: Mapping[str, Any]) -> bool | None:
    """What ``test`` says with ``values`` for its names; None when it cannot be told here."""
    try:
        return bool(_value(test, values))
    except (Unsure, ArithmeticError, TypeError, ValueError, RecursionError):
        return None


def _value(n: ast.expr, values: Mapping[str, Any]) -> Any:
    if isinstance(n, ast.Constant):
        return _plain(n.value)
    if isinstance(n, ast.Name):
        return _plain(values.get(n.id, MISSING))
    if isinstance(n, ast.Tuple):
        return tuple(_value(e, values) for e in n.elts)
    if isinstance(n, ast.BoolOp):
        v: Any = None
        for e in n.values:  # short-circuit as Python does
            v = _value(e, values)
            if bool(v) == isinstance(n.op, ast.Or):
                return v
        return v
    if isinstance(n, ast.UnaryOp):
        v = _value(n.operand, values)
        if isinstance(n.op, ast.Not):
            return not v
        if type(v) not in NUMBERS or isinstance(n.op, ast.Invert):
            raise Unsure
        return -v if isinstance(n.op, ast.USub) else +v
    if isinstance(n, ast.BinOp) and type(n.op) in ARITH:
        a, b = _value(n.left, values), _value(n.right, values)
        if not all(type(x) in NUMBERS and abs(x) < 2**64 for x in (a, b)):
            raise Unsure  # numbers only, of sizes that take no time
        return ARITH[type(n.op)](a, b)
    if isinstance(n, ast.Compare):
        return _compare(n, values)
    raise Unsure


def _compare(n: ast.Compare, values: Mapping[str, Any]) -> bool:
    left = _value(n.left, values)
    for op, e in zip(n.ops, n.comparators, strict=True):
        if isinstance(op, (ast.In, ast.NotIn)) and isinstance(e, (ast.List, ast.Set)):
            right: Any = tuple(_value(x, values) for x in e.elts)
        else:
            right = _value(e, values)
        if isinstance(op, (ast.Is, ast.IsNot)) and not {type(left), type(right)} & {
            bool,
            type(None),
        }:
            raise Unsure  # `x is 1000`: identity of numbers depends on how they were made
        if not COMPARE[type(op)](left, right):
            return False
        left = right
    return True


def _plain(v: Any) -> Any:
    if type(v) not in PLAIN:
        raise Unsure
    return v


# ---- what may rebind its names ----------------------------------------------------------------------


def span_end(body: list[ast.stmt], limit: int, earlier: bool) -> int:
    """The last line that may have run after a test before ``limit``: ``limit`` in the first pass,
    else the end of the outermost loop around it (its earlier passes ran all of it)."""
    if not earlier:
        return limit
    ends = [
        n.end_lineno or n.lineno
        for b in body
        for n in ast.walk(b)
        if isinstance(n, (ast.For, ast.AsyncFor, ast.While))
        and n.lineno <= limit <= (n.end_lineno or n.lineno)
    ]
    return max([limit, *ends])


def bound_in(body: list[ast.stmt], start: int, end: int) -> frozenset[str] | None:
    """The names lines ``start``..``end`` of ``body`` bind or delete, nested scopes included; None
    when one of them may bind any name (``exec``, ``globals()``, ``import *``)."""
    out: set[str] = set()
    for b in body:
        for n in ast.walk(b):
            if not start <= getattr(n, "lineno", 0) <= end:
                continue
            if isinstance(n, ast.Name):
                if n.id in ANY_NAME:
                    return None
                if not isinstance(n.ctx, ast.Load):
                    out.add(n.id)
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(n.name)
            elif isinstance(n, (ast.Import, ast.ImportFrom)):
                if any(a.name == "*" or a.name.split(".")[0] in ANY_NAME for a in n.names):
                    return None
                out.update((a.asname or a.name).split(".")[0] for a in n.names)
            elif isinstance(n, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and n.name:
                out.add(n.name)
            elif isinstance(n, ast.MatchMapping) and n.rest:
                out.add(n.rest)
    return frozenset(out)


def rebound_globals(reach: Reach) -> frozenset[str] | None:
    """The globals notebook code may rebind (read once per guard run); None: it may rebind any."""
    if not reach.rebound_read:
        reach.rebound, reach.rebound_read = _notebook_rebinds(reach.namespace), True
    return reach.rebound


def _notebook_rebinds(namespace: Mapping[str, Any]) -> frozenset[str] | None:
    try:
        values = list(namespace.values()) if type(namespace) is dict else None
        if values is None or len(values) > NAMESPACE_LIMIT:
            return None
        codes = list(_notebook_codes(values, namespace))
        if len(codes) > CODE_LIMIT:
            return None
        out: set[str] = set()
        for code in codes:
            for ins in dis.get_instructions(code):
                if ins.opname in ("STORE_GLOBAL", "DELETE_GLOBAL"):
                    out.add(str(ins.argval))
                elif ins.opname in ("LOAD_GLOBAL", "LOAD_NAME", "IMPORT_NAME") and (
                    str(ins.argval).split(".")[0] in ANY_NAME
                ):
                    return None
        return frozenset(out)
    except Exception:  # what cannot be read may rebind anything
        return None


def _notebook_codes(values: list[Any], namespace: Mapping[str, Any]) -> Iterator[types.CodeType]:
    """The code objects of the notebook's functions, methods and generators, nested ones included,
    found without running user code (static lookups only); more than ``CODE_LIMIT`` stops early."""
    seen: set[int] = set()
    todo: list[Any] = [x for v in values for x in (v, type(v))]
    found = 0
    while todo and found <= CODE_LIMIT:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        code = _own_code(obj, namespace)
        if code is not None:
            for c in _nested(code):
                found += 1
                yield c
        todo.extend(_parts(obj))


def _own_code(obj: Any, namespace: Mapping[str, Any]) -> types.CodeType | None:
    if type(obj) is types.FunctionType:
        return obj.__code__ if obj.__globals__ is namespace else None
    for kind, code, frame in (
        (types.GeneratorType, "gi_code", "gi_frame"),
        (types.CoroutineType, "cr_code", "cr_frame"),
        (types.AsyncGeneratorType, "ag_code", "ag_frame"),
    ):
        if type(obj) is kind:
            f = getattr(obj, frame)
            return getattr(obj, code) if f is not None and f.f_globals is namespace else None
    return None


def _parts(obj: Any) -> list[Any]:
    """What ``obj`` runs besides its own code: a method's function, a property's accessors, a
    class's attributes (its own and its bases', read from their ``__dict__``)."""
    t = type(obj)
    if t in (types.MethodType, staticmethod, classmethod):
        return [obj.__func__]
    if t is property:
        return [obj.fget, obj.fset, obj.fdel]
    if t is functools.partial:
        return [obj.func]
    if issubclass(t, type):  # a class (not `list[int]`, which passes for one with isinstance)
        mro = type.__dict__["__mro__"].__get__(obj)
        return [v for k in mro for v in type.__dict__["__dict__"].__get__(k).values()]
    return []


def _nested(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from _nested(c)

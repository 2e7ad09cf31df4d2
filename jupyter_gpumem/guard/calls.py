"""The notebook code a cell calls, read for the side-effect guard: a function or method defined in
the notebook, found through the user namespace, its source read back with ``inspect`` (IPython keeps
every cell's text in ``linecache``), parsed, and its local names listed.

Nothing here runs user code: objects are looked at with ``type()`` and ``inspect.getattr_static``,
never through their own attributes. Anything that cannot be read is ``None``, and the guard then
treats the call as it treats any other call it cannot look into.
"""

from __future__ import annotations

import ast
import inspect
import logging
import os
import sys
import textwrap
import threading
import types
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from types import FunctionType
from typing import Any

from jupyter_gpumem.cells import source as cellsource

__all__ = [
    "MISSING",
    "Callee",
    "GlobalsAsNames",
    "NotebookFunction",
    "bound_method",
    "closure_runs_first",
    "is_executor",
    "is_globals",
    "is_iterator",
    "is_thread",
    "is_thread_class",
    "locals_of",
    "logger_writes_to",
    "name_of",
    "notebook_callee",
    "own_module",
    "root_logger",
]

MISSING = object()  # what ``lookup`` gives for a name that holds no known object


@dataclass(frozen=True)
class NotebookFunction:
    """One function or method defined in the notebook, as the guard walks it."""

    qualname: str  # "train", "Trainer.fit": how messages and failing frames name it
    node: ast.FunctionDef | ast.AsyncFunctionDef  # with ``globals()["n"]`` read as ``n``
    lines: list[str]  # its source; ``node``'s line 1 is ``lines[0]``
    first_lineno: int  # the line of ``lines[0]`` in its cell, as ``inspect.getsourcelines`` says
    key: int  # id of its code object: a function already being walked is not walked again
    local: frozenset[str]  # parameters and names it binds, less those it declares global
    declared: frozenset[str]  # names it declares ``global``
    free: frozenset[str] = frozenset()  # names of the functions around it (a closure's cells)

    def file_line(self, lineno: int) -> int:
        """A line of ``node`` as a line of its cell."""
        return self.first_lineno + lineno - 1

    def node_line(self, file_lineno: int) -> int | None:
        """A line of its cell as a line of ``node``, None outside the function."""
        lineno = file_lineno - self.first_lineno + 1
        end = self.node.end_lineno or self.node.lineno
        return lineno if self.node.lineno <= lineno <= end else None


@dataclass(frozen=True)
class Callee:
    """What a call runs: the function, and how its first parameter is bound."""

    fn: NotebookFunction
    receiver: ast.expr | None  # ``trainer`` in ``trainer.fit()``: bound to the first parameter
    skips_first: bool  # the first parameter is bound to something new (``Cls(...)``'s self)
    closure: dict[str, Any] = field(default_factory=dict)  # a closure's cells: name -> value


def notebook_callee(
    func: ast.expr,
    namespace: Mapping[str, Any],
    lookup: Callable[[str], Any],
    cache: dict[int, NotebookFunction | None],
) -> Callee | None:
    """The notebook function ``func(...)`` runs: ``f``, ``obj.method``, ``Cls``, ``Cls.method``.

    ``lookup(name)`` is the object a name holds where the call is, or ``MISSING``.
    """
    if isinstance(func, ast.Name):
        obj = lookup(func.id)
        if _is_class(obj):  # Cls(...) runs Cls.__init__ on a new object
            return _callee(_static(obj, "__init__"), namespace, cache, None, first_is_new=True)
        return _callee(obj, namespace, cache, None, first_is_new=False)
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        obj = lookup(func.value.id)
        if obj is MISSING:
            return None
        if _is_class(obj):  # Cls.method(x): a plain function, unless a classmethod
            attr = _static(obj, func.attr)
            return _callee(attr, namespace, cache, None, first_is_new=isinstance(attr, classmethod))
        attr = _static(type(obj), func.attr)
        if isinstance(attr, staticmethod):
            return _callee(attr, namespace, cache, None, first_is_new=False)
        if isinstance(attr, classmethod):
            return _callee(attr, namespace, cache, None, first_is_new=True)
        return _callee(attr, namespace, cache, func.value, first_is_new=False)
    return None


@dataclass(frozen=True)
class Arguments:
    """What a call gives each parameter of the function it runs."""

    names: list[str]  # every parameter
    bound: dict[str, ast.expr]  # parameter -> the expression given for it
    spread: list[ast.expr]  # ``*xs``, ``**kw``, surplus: may reach any parameter not bound
    defaults: dict[str, str]  # parameter not given -> the global its default names


def match_args(callee: Callee, c: ast.Call) -> Arguments:
    a = callee.fn.node.args
    positional = [p.arg for p in [*a.posonlyargs, *a.args]]
    names = [*positional, *(p.arg for p in a.kwonlyargs)]
    names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
    given: list[ast.expr | None] = [*c.args]
    if callee.receiver is not None or callee.skips_first:
        given.insert(0, callee.receiver)  # None: a new object (``Cls(...)``), or the class
    bound: dict[str, ast.expr] = {}
    spread: list[ast.expr] = []
    for i, expr in enumerate(given):
        if isinstance(expr, ast.Starred) or spread or i >= len(positional):
            spread += [expr.value if isinstance(expr, ast.Starred) else expr] if expr else []
        elif expr is not None:
            bound[positional[i]] = expr
    for k in c.keywords:
        if k.arg is not None and k.arg in names:
            bound[k.arg] = k.value
        else:
            spread.append(k.value)
    first_default = len(positional) - len(a.defaults)
    pairs = [*zip(positional[first_default:], a.defaults, strict=True)]
    pairs += [(p.arg, d) for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d]
    defaults = {n: d.id for n, d in pairs if n not in bound and isinstance(d, ast.Name)}
    return Arguments(names, bound, spread, defaults)


def _callee(
    obj: Any,
    namespace: Mapping[str, Any],
    cache: dict[int, NotebookFunction | None],
    receiver: ast.expr | None,
    *,
    first_is_new: bool,
) -> Callee | None:
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if type(obj) is not FunctionType:
        return None
    try:
        obj = inspect.unwrap(obj)
    except ValueError:
        return None
    if type(obj) is not FunctionType or obj.__globals__ is not namespace:
        return None  # defined in a module, not in the notebook
    key = id(obj.__code__)
    if key not in cache:
        cache[key] = _read(obj)
    fn = cache[key]
    if fn is None:
        return None
    return Callee(fn, receiver, first_is_new, _cells(obj))


def _cells(fn: FunctionType) -> dict[str, Any]:
    """A closure's variables and what they hold (an empty cell left out)."""
    out: dict[str, Any] = {}
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=False):
        try:
            out[name] = cell.cell_contents
        except ValueError:
            continue
    return out


def _read(obj: FunctionType) -> NotebookFunction | None:
    try:
        source_lines, first = inspect.getsourcelines(obj)
    except (OSError, TypeError):
        return None
    source = textwrap.dedent("".join(source_lines))
    reading = cellsource.read(source)
    if reading.changed or reading.magic is not None:
        return None  # IPython syntax in a function: a call not looked into
    tree = reading.new_tree()  # its own: globals()["n"] is rewritten below
    if tree is None:
        return None
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if len(defs) != 1 or defs[0].name != obj.__name__:
        return None  # a lambda, or a source we cannot line up with the function
    node = defs[0]
    declared = frozenset(
        name for n in _own_nodes(node) if isinstance(n, ast.Global) for name in n.names
    )
    local = frozenset(_params(node) | _bound(node)) - declared
    GlobalsAsNames().visit(node)
    lines = cellsource.lines(source)
    return NotebookFunction(obj.__qualname__, node, lines, max(first, 1), id(obj.__code__),
                            local, declared, frozenset(obj.__code__.co_freevars))  # fmt: skip


def locals_of(node: ast.FunctionDef | ast.AsyncFunctionDef) -> frozenset[str]:
    """A function's own names: its parameters and what its body binds, less its ``global``s."""
    declared = {name for n in _own_nodes(node) if isinstance(n, ast.Global) for name in n.names}
    return frozenset(_params(node) | _bound(node)) - declared


def _is_class(obj: Any) -> bool:
    return obj is not MISSING and issubclass(type(obj), type)


def _static(owner: Any, attr: str) -> Any:
    try:
        return inspect.getattr_static(owner, attr)
    except AttributeError:
        return None


def _params(node: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    a = node.args
    names = {p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs]}
    names |= {p.arg for p in (a.vararg, a.kwarg) if p is not None}
    return names


def _own_nodes(node: ast.AST) -> list[ast.AST]:
    """The nodes of a function's body, not those of functions, classes, lambdas in it."""
    out: list[ast.AST] = []
    todo = list(ast.iter_child_nodes(node))
    while todo:
        n = todo.pop()
        out.append(n)
        if not isinstance(
            n,
            (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.comprehension),
        ):
            todo.extend(ast.iter_child_nodes(n))
    return out


def _bound(node: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """The names a function's body binds: its locals (comprehension variables are their own)."""
    out: set[str] = set()
    for n in _own_nodes(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            out.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in n.names if a.name != "*")
        elif isinstance(n, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and n.name:
            out.add(n.name)
    return out


def is_globals(node: ast.AST) -> bool:
    """``globals()``."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "globals"
        and not node.args
    )


class GlobalsAsNames(ast.NodeTransformer):
    """``globals()["n"]`` is the name ``n``: ``globals()["n"] += 1`` adds to ``n``."""

    def visit_Subscript(self, node: ast.Subscript) -> ast.AST:
        key = node.slice
        if (
            is_globals(node.value)
            and isinstance(key, ast.Constant)
            and isinstance(key.value, str)
            and key.value.isidentifier()
        ):
            return ast.copy_location(ast.Name(id=key.value, ctx=node.ctx), node)
        self.generic_visit(node)
        return node


# ---- objects of the notebook, read by their type (nothing of theirs runs) ------------------------

NAME_SCAN = 20_000  # names of the namespace looked through for the one holding an object


def _is(obj: Any, kind: type | tuple[type, ...]) -> bool:
    """``isinstance`` by the object's type alone: a class that lies about ``__class__`` (a
    property that raises, a proxy) runs nothing here."""
    return issubclass(type(obj), kind)


def bound_method(
    obj: Any, name: str, owner: Callable[[Any], str | None], namespace: Mapping[str, Any]
) -> ast.expr | None:
    """``add`` holding ``L.append`` (or ``trainer.fit``, a method of a notebook class), as the
    expression ``L.append``: its object by the notebook's name for it (``owner``), else
    ``add.__self__``. None for anything else: a function, a builtin such as ``print``, a method of
    a library's object (``from random import shuffle`` is read by its name, as before)."""
    t = type(obj)
    if t is types.MethodType:
        func = obj.__func__
        if type(func) is not FunctionType or func.__globals__ is not namespace:
            return None
    elif t not in (types.BuiltinMethodType, types.MethodWrapperType):
        return None
    receiver = obj.__self__
    if receiver is None or _is(receiver, (types.ModuleType, type)):
        return None  # `print`, a classmethod: nothing of the notebook's changes through them
    method = obj.__func__.__name__ if t is types.MethodType else obj.__name__
    held = owner(receiver)
    root: ast.expr = (
        ast.Name(held, ast.Load())
        if held
        else ast.Attribute(ast.Name(name, ast.Load()), "__self__", ast.Load())
    )
    return ast.Attribute(root, str(method), ast.Load())


def name_of(obj: Any, namespace: Mapping[str, Any], names: Collection[str]) -> str | None:
    """The first of ``names`` whose value in ``namespace`` is ``obj`` (looked through by identity,
    up to ``NAME_SCAN`` names)."""
    for i, name in enumerate(names):
        if i >= NAME_SCAN:
            return None
        if namespace.get(name, MISSING) is obj:
            return name
    return None


def _mro_has(obj: Any, attr: str) -> bool:
    try:
        inspect.getattr_static(type(obj), attr)
    except AttributeError:
        return False
    return True


def is_iterator(obj: Any) -> bool:
    """An iterator (a generator, ``iter(xs)``, an open file): taking an item from it is gone for a
    re-run. Read from its type; a class that is its own iterator by ``__next__`` counts."""
    if obj is MISSING or _is(obj, type):
        return False
    return _mro_has(obj, "__next__")


def is_thread(obj: Any) -> bool:
    return obj is not MISSING and is_thread_class(type(obj))


def is_thread_class(cls: Any) -> bool:
    """``threading.Thread`` or ``multiprocessing.Process``, or a subclass (read from the MRO)."""
    if not _is(cls, type):
        return False
    bases = [threading.Thread]
    mp = sys.modules.get("multiprocessing.process")
    if mp is not None:
        bases.append(mp.BaseProcess)
    mro = type.__dict__["__mro__"].__get__(cls)
    return any(b in mro for b in bases)


def is_executor(obj: Any) -> bool:
    """A ``concurrent.futures`` executor or a ``multiprocessing`` pool: what it is given runs
    beside the cell."""
    if obj is MISSING:
        return False
    mro = type.__dict__["__mro__"].__get__(type(obj))
    bases = []
    for module, name in (("concurrent.futures", "Executor"), ("multiprocessing.pool", "Pool")):
        m = sys.modules.get(module)
        base = getattr(m, name, None) if m is not None else None
        if isinstance(base, type):
            bases.append(base)
    return any(b in mro for b in bases)


def own_module(obj: Any) -> bool:
    """A module from the notebook's own directory (under the working directory, not installed):
    ``import helpers`` of ``./helpers.py``."""
    if type(obj) is not types.ModuleType:
        return False
    try:
        path = inspect.getattr_static(obj, "__file__")
    except AttributeError:
        return False
    if type(path) is not str:
        return False
    path = os.path.abspath(path)
    here = os.path.abspath(os.getcwd())
    installed = ("site-packages", "dist-packages")
    return path.startswith(here + os.sep) and not any(p in path.split(os.sep) for p in installed)


def closure_runs_first(opt: Any) -> bool:
    """An optimizer whose ``step(closure)``, stopped by an error inside the closure, had changed
    no parameter yet: one of ``torch.optim``'s, whose ``step`` evaluates the closure before any
    update (read in torch/optim/*.py: ``loss = closure()`` opens every ``step``), except an
    ``LBFGS`` that has iterated (its later evaluations follow an update; ``n_iter`` is counted
    before the first, so 0 at the failure means none). Read from the type and the state dict,
    as torch keeps them; a subclass that defines its own ``step`` is not one."""
    if opt is MISSING:
        return False
    try:
        step = inspect.getattr_static(type(opt), "step")
    except AttributeError:
        return False
    module = getattr(step, "__module__", None)
    if type(module) is not str or not module.startswith("torch.optim."):
        return False
    if module != "torch.optim.lbfgs":
        return True
    state = _instance_state(opt)
    if state is None:
        return False
    for per_param in dict.values(state):
        if type(per_param) is dict and per_param.get("n_iter", 0) != 0:
            return False
    return True


def _instance_state(opt: Any) -> dict[Any, Any] | None:
    """``opt.state`` (a dict, or torch's defaultdict) from the instance's own ``__dict__``."""
    try:
        d = object.__getattribute__(opt, "__dict__")
    except Exception:
        return None
    state = dict.get(d, "state") if type(d) is dict else None
    return state if isinstance(state, dict) else None


def root_logger() -> logging.Logger:
    return logging.getLogger()


def logger_writes_to(obj: Any, level: int) -> str | None:
    """Where a ``logging.Logger`` writes a record of ``level`` (0: any level) other than the
    terminal: ``'train.log'`` for a ``FileHandler``, a handler's class name otherwise. None when it
    writes nowhere else (no such handler, its level above, ``propagate`` off) or ``obj`` is no
    logger. Read from the loggers' own attributes (``getattr_static``)."""
    if obj is MISSING or not _is(obj, logging.Logger):
        return None
    if level and level < _effective_level(obj):
        return None
    seen = 0
    node: Any = obj
    while _is(node, logging.Logger) and seen < 50:
        seen += 1
        for h in list(_static(node, "handlers") or ()):
            where = _handler_target(h, level)
            if where is not None:
                return where
        if not _static(node, "propagate"):
            return None
        node = _static(node, "parent")
    return None


def _effective_level(logger: logging.Logger) -> int:
    node: Any = logger
    for _ in range(50):
        if not _is(node, logging.Logger):
            break
        lvl = _static(node, "level")
        if type(lvl) is int and lvl:
            return lvl
        node = _static(node, "parent")
    return logging.WARNING


def _handler_target(h: Any, level: int) -> str | None:
    if not _is(h, logging.Handler) or _is(h, logging.NullHandler):
        return None
    lvl = _static(h, "level")
    if level and type(lvl) is int and level < lvl:
        return None
    if _is(h, logging.FileHandler):
        return repr(_static(h, "baseFilename"))
    if _is(h, logging.StreamHandler):
        stream = _static(h, "stream")
        std = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}
        if id(stream) in std or type(stream).__module__.startswith(("ipykernel", "IPython")):
            return None
        return f"the stream of a `{type(h).__name__}`"
    return f"a `{type(h).__name__}`"

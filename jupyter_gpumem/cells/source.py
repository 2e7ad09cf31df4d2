"""One reading of a cell's source: its IPython syntax made Python once, parsed once, cached.

A cell is Python, or Python with IPython syntax (``%time x = f()``, ``!ls``, ``model?``), or a cell
magic (``%%time`` runs its body as Python, ``%%bash`` does not). ``read(source)`` gives the Python a
cell runs, line for line with the cell (a cell magic's own line left blank), with the lines IPython
syntax rewrote, and its syntax tree; IPython syntax that moves lines (a magic continued with ``\\``)
is no reading, since nothing could be said about the cell's lines from it. The guard, the batch
search, the failure record and the re-runs all read a cell here, so they agree on what it says.

``to_python(source, shell)`` is the one exception: a re-run executes what the shell itself makes of
the cell (its registered input transformers included, a ``%%time`` cell through the magic), so it
asks the shell; ``parse`` then reads that text once for all of a fix's runs.

Trees come from a cache and are shared: callers read them, and take ``new_tree()`` for one they
change.
"""

from __future__ import annotations

import ast
import dis
import functools
import re
import symtable
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

__all__ = [
    "MAGIC_OPTIONS",
    "PYTHON_CELL_MAGICS",
    "SHELL_CELL_MAGICS",
    "STATEMENT_MAGICS",
    "TEXT_CELL_MAGICS",
    "CellReading",
    "IPythonCall",
    "cell_magic",
    "dotted",
    "ipython_call",
    "lines",
    "lines_with_ends",
    "names_used",
    "parse",
    "parse_or_none",
    "read",
    "short",
    "to_python",
]

# cell magics whose body is Python run as is (the body is the cell's reading)
PYTHON_CELL_MAGICS = frozenset(
    {"time", "timeit", "capture", "prun", "oomsafe", "debug", "memit", "mprun"}
)
# cell magics whose body is a script for another program
SHELL_CELL_MAGICS = frozenset(
    {"bash", "sh", "script", "system", "sx", "perl", "ruby", "python", "python3"}
)
# cell magics whose body is shown, not run
TEXT_CELL_MAGICS = frozenset({"html", "HTML", "javascript", "js", "latex", "markdown", "svg"})


def lines(source: str) -> list[str]:
    """The cell's lines as Python numbers them, without their endings (``\\r\\n``, ``\\r``, ``\\n``)."""
    return re.split(r"\r\n|\r|\n", source)


def lines_with_ends(source: str) -> list[str]:
    """Lines as Python numbers them, with their endings (not ``str.splitlines``, which also
    splits on ``\\f``, ``\\x1c``...); no empty last line."""
    return re.findall(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$", source)


def cell_magic(source: str) -> str | None:
    """The name of the cell magic the cell starts with (``time`` for ``%%time -n 3``), as IPython
    reads it: ``%%`` at the very start; ``""`` for a bare ``%%``. None for a cell without one."""
    if not source.startswith("%%"):
        return None
    return lines(source)[0][2:].rstrip().partition(" ")[0]


@dataclass(frozen=True)
class CellReading:
    """What a cell says as Python. ``tree`` is None when it is not Python, with ``why``."""

    source: str
    magic: str | None  # the cell magic on line 1, if any
    python: str | None  # the Python it runs, line for line with the cell
    tree: ast.Module | None  # ``python`` parsed: shared, do not change it (see ``new_tree``)
    changed: frozenset[int]  # lines (1-based) whose IPython syntax was rewritten
    why: str | None = None  # why there is no tree: "this cell runs the cell magic %%bash, ..."

    def new_tree(self) -> ast.Module | None:
        """A tree of the cell's own, for a caller that changes it."""
        return None if self.python is None else ast.parse(self.python)


@lru_cache(maxsize=256)
def read(source: str) -> CellReading:
    """The cell's reading (cached: a failure, its guard and its fixes read the same cell)."""
    magic = cell_magic(source)
    python, tree, changed, why = _read(source)
    return CellReading(source, magic, python, tree, frozenset(changed), why)


def _read(
    source: str, offset: int = 0
) -> tuple[str | None, ast.Module | None, set[int], str | None]:
    """(Python, tree, changed lines, why not) for ``source``, which starts ``offset`` lines into
    the cell."""
    try:
        return source, ast.parse(source), set(), None
    except (SyntaxError, ValueError) as e:
        # read here, not kept: the error's traceback holds this frame and, through it, every
        # caller's (their locals alive until the garbage collector runs)
        line = getattr(e, "lineno", None)
        msg = getattr(e, "msg", str(e))
    magic = cell_magic(source)
    if magic is not None:
        if magic not in PYTHON_CELL_MAGICS:
            return None, None, set(), f"this cell runs the cell magic %%{magic}, not Python"
        _, *rest = lines_with_ends(source)
        python, tree, changed, why = _read("".join(rest), offset + 1)
        if python is None or tree is None:
            return None, None, set(), why
        ast.increment_lineno(tree, 1)  # the body's own tree, made for this reading
        return "\n" + python, tree, {n + 1 for n in changed}, None
    line = None if line is None else line + offset
    why = f"this cell does not parse (line {line}: {msg})"
    try:
        python = _transform(source)
        tree = ast.parse(python)
    except Exception:
        return None, None, set(), why
    old, new = lines_with_ends(source), lines_with_ends(python)
    if len(new) != len(old):
        why = "IPython syntax in this cell moves its lines: cannot read or edit it line by line"
        return None, None, set(), why
    changed = {
        i + 1 for i, (a, b) in enumerate(zip(old, new, strict=True)) if a.rstrip() != b.rstrip()
    }
    return python, tree, changed, None


def _transform(source: str) -> str:
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(source)


def to_python(source: str, shell: Any = None) -> str:
    """The Python that runs for ``source``: the shell's own reading (its input transformers, a cell
    magic through the magic) when given one, else IPython's default transforms."""
    if shell is not None:
        return str(shell.transform_cell(source))
    return _transform(source)


@lru_cache(maxsize=64)
def parse(python: str, filename: str = "<unknown>") -> ast.Module:
    """``ast.parse``, cached: the same run's text is read once for all of a fix's runs. Shared:
    do not change the tree."""
    return ast.parse(python, filename=filename)


def parse_or_none(python: str, filename: str = "<unknown>") -> ast.Module | None:
    """:func:`parse`, or None where the text is not Python (a syntax error, a null byte): for
    readers of code they did not write (a notebook function's file, a re-run's cell), which have
    nothing to say about code that does not parse."""
    try:
        return parse(python, filename)
    except (SyntaxError, ValueError):
        return None


@dataclass(frozen=True)
class IPythonCall:
    """What a call IPython's transforms wrote stands for."""

    kind: str  # "magic" (a line magic, help ``x?`` included), "shell" (``!cmd``, ``!!cmd``), "help"
    name: str  # the line magic's name ("time", "pinfo"); "" for shell and help
    arg: str  # the rest of the line: the magic's arguments, the shell command


def ipython_call(node: ast.AST) -> IPythonCall | None:
    """``get_ipython().run_line_magic('time', 'x = f()')``, ``get_ipython().system('ls')``,
    ``get_ipython().getoutput('ls')``, ``get_ipython().show_usage()``: what each stands for."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
        return None
    recv = node.func.value
    if not (
        isinstance(recv, ast.Call)
        and isinstance(recv.func, ast.Name)
        and recv.func.id == "get_ipython"
        and not recv.args
        and not node.keywords
    ):
        return None
    args = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    if len(args) != len(node.args):
        return None
    attr = node.func.attr
    if attr == "run_line_magic" and len(args) == 2:
        return IPythonCall("magic", args[0], args[1])
    if attr in ("system", "getoutput") and len(args) == 1:
        return IPythonCall("shell", "", args[0])
    if attr == "show_usage" and not args:
        return IPythonCall("help", "", "")
    return None


# ---- names, as messages show them --------------------------------------------------------------


def dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a chain of names, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def short(text: str, width: int = 60) -> str:
    """``text`` cut to ``width`` characters, an ellipsis last."""
    return text if len(text) <= width else text[: width - 1] + "…"


# ---- the names a cell uses ------------------------------------------------------------------------

# line magics whose argument is a Python statement, and their leading options (`%timeit -n 3 f()`)
STATEMENT_MAGICS = frozenset({"time", "timeit", "prun", "memit", "debug"})
MAGIC_OPTIONS = re.compile(r"^(?:-[A-Za-z]\s*\d*\s+)*")
NAMES_DEPTH = 3  # calls followed into notebook code, one inside another
NAMES_CODES = 500  # code objects of notebook code read for one cell, all depths together
GLOBAL_OPS = frozenset(
    {"LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL", "LOAD_NAME", "STORE_NAME", "DELETE_NAME"}
)


def names_used(
    source: str, namespace: Mapping[str, Any] | None = None, depth: int = NAMES_DEPTH
) -> set[str]:
    """The notebook's names a cell uses (reads, binds or deletes), the one reading of them.

    The cell's own: every name of its module scope and the globals its functions, classes, lambdas
    and comprehensions use (stdlib ``symtable``: ``def f(a): return a + y`` uses ``y``, not ``a``);
    an attribute chain by its root (``trainer.model.fc`` uses ``trainer``). A cell whose syntax the
    symbol table refuses (``await`` at the top level) by every name in its tree; one that does not
    parse by every word that could be a name. Given the ``namespace``, the globals used by the
    notebook code those names reach are added, ``depth`` calls deep: a function defined in the
    notebook, the methods of a notebook class and of an object whose class is one, a bound method,
    a ``functools.partial`` (``train()`` uses ``model`` when ``train``'s body reads it). Nothing
    runs: objects are read by their type, code by its instructions.
    """
    names = _cell_names(source)
    if namespace is None:
        return names
    todo = sorted(names)
    seen: set[int] = set()
    budget = [NAMES_CODES]
    for _ in range(depth):
        found: set[str] = set()
        for name in todo:
            if name not in namespace:
                continue
            for code in _notebook_code(namespace[name], namespace, seen, budget):
                found.update(_globals_of(code))
        todo = sorted(found - names)
        names |= found
        if not todo:
            break
    return names


def _cell_names(source: str) -> set[str]:
    reading = read(source)
    if reading.python is None or reading.tree is None:
        return set(re.findall(r"[^\W\d]\w*", source))
    try:
        table = symtable.symtable(reading.python, "<cell>", "exec")
    except (SyntaxError, ValueError):  # valid syntax the compiler refuses (top-level await, ...)
        return {n.id for n in ast.walk(reading.tree) if isinstance(n, ast.Name)}
    names = {s.get_name() for s in table.get_symbols()}
    todo = list(table.get_children())
    while todo:
        t = todo.pop()
        names.update(s.get_name() for s in t.get_symbols() if s.is_global())
        todo.extend(t.get_children())
    return names | _magic_statement_names(reading)


def _magic_statement_names(reading: CellReading) -> set[str]:
    """The names in the Python a line magic runs (``%time step += 1``), which the rewritten line
    holds as a string."""
    out: set[str] = set()
    if not reading.changed or reading.tree is None:
        return out
    for node in ast.walk(reading.tree):
        call = ipython_call(node) if getattr(node, "lineno", 0) in reading.changed else None
        if call is None or call.kind != "magic" or call.name not in STATEMENT_MAGICS:
            continue
        try:
            tree = ast.parse(MAGIC_OPTIONS.sub("", call.arg.strip()))
        except (SyntaxError, ValueError):
            continue
        out.update(n.id for n in ast.walk(tree) if isinstance(n, ast.Name))
    return out


def _notebook_code(
    obj: Any, namespace: Mapping[str, Any], seen: set[int], budget: list[int]
) -> Iterator[types.CodeType]:
    """The code of the notebook functions ``obj`` is or runs, nested ones included; read by type
    only (an instance's class through ``type()``, a class's methods from its own ``__dict__``)."""
    todo = [obj]
    while todo and budget[0] > 0:
        o = todo.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        t = type(o)
        if t is types.FunctionType:
            if o.__globals__ is namespace:
                budget[0] -= 1
                yield from _nested_code(o.__code__)
        elif t in (types.MethodType, staticmethod, classmethod):
            todo.append(o.__func__)
        elif t is property:
            todo += [o.fget, o.fset, o.fdel]
        elif t is functools.partial:
            todo.append(o.func)
        elif issubclass(t, type):
            todo += _own_functions(o, namespace)
        elif _is_notebook_class(t, namespace):
            todo.append(t)


def _own_functions(cls: type, namespace: Mapping[str, Any]) -> list[Any]:
    """What a notebook class defines (its own ``__dict__``, read without its metaclass); nothing
    for a class from a module."""
    if not _is_notebook_class(cls, namespace):
        return []
    return list(type.__dict__["__dict__"].__get__(cls).values())


def _is_notebook_class(cls: type, namespace: Mapping[str, Any]) -> bool:
    """Defined in the notebook: one of its own functions has the notebook's globals."""
    try:
        own = type.__dict__["__dict__"].__get__(cls)
    except TypeError:
        return False
    return any(
        type(v) is types.FunctionType and v.__globals__ is namespace
        for v in list(own.values())[:200]
    )


def _nested_code(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from _nested_code(c)


def _globals_of(code: types.CodeType) -> set[str]:
    """The global names one code object uses (not its attributes: ``self.model`` is ``self``'s)."""
    try:
        return {
            str(i.argval).split(".")[0]
            for i in dis.get_instructions(code)
            if i.opname in GLOBAL_OPS and isinstance(i.argval, str)
        }
    except Exception:  # an instruction this Python's dis cannot read: the names it lists
        return set(code.co_names)

"""Before a failed cell is re-run: which of its lines already changed something a re-run changes again.

Static, from the cell's text and the names that existed before it ran; nothing is executed. A line
counts when it ran before the failing line, or anywhere in a loop around it (earlier passes ran the
whole body), unless the caller says the failing pass was the first (``earlier_passes=False``). The
failing statement's own effect did not happen (``step += f()`` where ``f`` raised), except
``X.step()`` and ``.backward()``, which may have run part way before running out of memory.
A name the cell binds from scratch (``acc = 0`` before ``acc += 1``) is recreated by the re-run,
and so is an optimizer built in the cell over a model built in the cell. ``x = x.to(device)``,
``.cuda()``, ``.eval()`` are not rebinds: doing them twice is doing them once. Given the user
namespace, the functions and methods defined in the notebook that the cell calls are read too
(``guard_calls``), up to five calls deep: a parameter stands for the object the caller passed, a
``global`` name for the global; a call before the failing line ran all of its body, the failing call
ran up to its own failing line when ``failed_frames`` names it, else all of it may have.

Limits, by design: which branch of an ``if`` ran is unknown, so both count; ``obj.add(x)`` or
``t.sort()`` count as mutations even where the receiver's type makes them pure; aliasing is followed
only through plain names, attributes, items, views and bound methods (``w = model.weight``,
``add = L.append``), not through containers; a pre-existing name passed to a call (``crit(out, y)``)
is taken to carry state into the result, so a ``.backward()`` with no ``zero_grad()`` is counted
unless everything it reads was made in the cell. Code that is not the notebook's (a library, a
module on disk) is judged by its name only, and notebook code is read only where the call names it
plainly (``f(x)``, ``obj.method()``, ``Cls(...)``), not through ``model(x)`` reaching a
``forward``, a callback, or a function kept in a container; a notebook function whose source cannot
be read is a call not looked into; a function's assignments to globals do not carry back to the
cell. ``next(it)`` counts only on a pre-existing iterator, not on a ``for`` loop over one;
``exec``/``eval`` of a string (not a call-free constant) and ``globals()`` used other than as
``globals()["name"]`` are effects we cannot read, so they count; SQL counts unless its text starts
with a read (``SELECT``, ``PRAGMA``...). ``del name`` of a name the cell did not make counts even if
the names before the cell missed it: the failed run could not have deleted it otherwise.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from . import cellsource
from . import guard_calls as calls
from .cellsource import dotted as _dotted
from .guard_calls import MISSING, Callee, NotebookFunction, is_globals

# `try: ... except* ...` (ast.TryStar) exists from Python 3.11; on 3.10 only ast.Try
_TRY_NODES: tuple[type[ast.stmt], ...] = tuple(
    t for t in (ast.Try, getattr(ast, "TryStar", None)) if t is not None
)

__all__ = ["GuardVerdict", "SideEffect", "analyse_rerun"]


@dataclass(frozen=True)
class SideEffect:
    lineno: int  # 1-based line in the cell
    kind: str  # augassign_global, global_rebind, mutate_global, append, delete_global,
    # optimizer_step, backward, file_write, io_call, iterator, queue, database, exec, unknown
    name: str  # the global or object involved: "step", "history", "open('log.txt', 'a')"
    text: str  # the source line, stripped
    why: str  # "adds to `step`, which existed before the cell: a re-run adds again"
    again: str = ""  # what a re-run would do, for questions: "add to `step` again"


@dataclass(frozen=True)
class GuardVerdict:
    effects: tuple[SideEffect, ...]
    failed_lineno: int | None = None
    in_loop: bool = False  # the failing line is in a loop: all of the loop may have run

    @property
    def safe(self) -> bool:
        return not self.effects

    def summary(self) -> str:
        """One line: which lines already ran with side effects, and what each would repeat."""
        if self.safe:
            return "this cell changed nothing that a re-run would change again."
        if self.effects[0].kind == "unknown":
            return self.effects[0].why + "."
        by_line: dict[int, list[SideEffect]] = {}
        for e in self.effects:
            by_line.setdefault(e.lineno, []).append(e)
        n = len(by_line)
        lines = "line" if n == 1 else "lines"
        if self.failed_lineno is None:
            head = f"this cell may have run {n} {lines} with side effects before it failed"
        else:
            head = f"this cell already ran {n} {lines} with side effects before it failed"
            head += f" at line {self.failed_lineno}"
            if self.in_loop:
                head += ", inside a loop whose earlier passes ran all of it"
        parts = []
        for lineno, group in list(by_line.items())[:4]:
            what = "; ".join(dict.fromkeys(_third(e.again) if e.again else e.why for e in group))
            parts.append(f"line {lineno} `{_short(group[0].text)}` ({what})")
        more = f", and {n - 4} more" if n > 4 else ""
        return f"{head}: {', '.join(parts)}{more}."

    def question(self) -> str:
        """The confirm-button question: what a re-run would repeat."""
        if self.safe:
            return "Re-run the cell?"
        if self.effects[0].kind == "unknown":
            return (
                "Re-run anyway? The cell would run again from the top, repeating what it changed."
            )
        phrases = list(dict.fromkeys(e.again or e.why for e in self.effects))
        if len(phrases) > 4:
            phrases = [*phrases[:3], f"{len(phrases) - 3} more things again"]
        said = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return f"Re-run anyway? The cell would {said}."


def analyse_rerun(
    source: str,
    *,
    failed_lineno: int | None,
    preexisting: Collection[str],
    earlier_passes: bool | None = None,
    namespace: Mapping[str, Any] | None = None,
    failed_frames: Sequence[tuple[str, int]] | None = None,
) -> GuardVerdict:
    """The side effects a re-run of ``source`` would repeat, given where it failed.

    ``earlier_passes``: whether loops around the failing line had run passes before the failing
    one; False means it failed in the first pass of each, None that it is unknown (as True).
    ``namespace``: the user namespace; given, the functions and methods defined in the notebook
    that the cell calls are read too. ``failed_frames``: (qualname, line in its cell) of each
    notebook function the failure went through, outermost first, for where each one stopped.
    """
    lines = cellsource.lines(source)
    limit = (
        failed_lineno if failed_lineno is not None and 1 <= failed_lineno <= len(lines) else None
    )
    try:
        tree = _parse(source)
        if isinstance(tree, SideEffect):
            return GuardVerdict((tree,), limit)
        if tree is None:
            return _unknown(limit, "could not read the cell; re-running may repeat its effects")
        walker = _Walker(lines, preexisting, limit, earlier_passes is not False)
        if namespace is not None:
            walker.reach = _Reach(namespace)
            walker.frames = tuple((str(q), int(n)) for q, n in failed_frames or ())
        walker.block(calls.GlobalsAsNames().visit(tree).body)
    except Exception as exc:  # fail closed: a cell we cannot read is one we ask about
        why = f"could not read the cell ({type(exc).__name__}); re-running may repeat its effects"
        return _unknown(limit, why)
    found = {(e.lineno, e.kind, e.name): e for e in walker.effects}
    return GuardVerdict(
        tuple(sorted(found.values(), key=lambda e: e.lineno)), limit, walker.in_loop
    )


def _unknown(limit: int | None, why: str) -> GuardVerdict:
    again = "run again from the top, repeating what it changed"
    return GuardVerdict((SideEffect(limit or 1, "unknown", "", "", why, again),), limit)


# ---- reading IPython cells -------------------------------------------------------------------------

_SHELL = "__gpumem_shell__"  # stands for a `!command` line, so it counts only where it ran
_STMT_MAGICS = {"time", "timeit", "prun", "memit", "debug"}  # line magics running a statement
_OPTIONS = re.compile(r"^(?:-[A-Za-z]\s*\d*\s+)*")  # `%timeit -n 3 -r 2 f()`: the options
_HARMLESS_SHELL = re.compile(
    r"^\s*(?:nvidia-smi|ls|pwd|cat|head|tail|echo|which|df|du|free|nvcc|uname|hostname|date|"
    r"whoami|wc|grep|ps|nproc|lscpu|pip3? +(?:install|list|show|freeze))\b[^>;&]*$"
)


def _parse(source: str) -> ast.Module | SideEffect | None:
    """The cell's syntax tree (``cellsource``'s reading, its IPython syntax as the Python effects
    it has), or a whole-cell effect; None for a cell that cannot be read."""
    reading = cellsource.read(source)
    name = reading.magic
    if name is not None and name not in cellsource.PYTHON_CELL_MAGICS:
        text = cellsource.lines(source)[0].strip()
        if name in ("writefile", "file"):
            path = text.split()[-1]
            why = f"writes `{path}`; a re-run writes it again"
            return SideEffect(1, "file_write", path, text, why, f"write `{path}` again")
        if name in cellsource.SHELL_CELL_MAGICS:
            why = "runs a script; a re-run runs it again"
            return SideEffect(1, "io_call", name, text, why, "run the script again")
        if name in cellsource.TEXT_CELL_MAGICS:
            return ast.Module(body=[], type_ignores=[])
        return None
    tree = reading.new_tree()
    if tree is None or not reading.changed:
        return tree
    try:
        return ast.fix_missing_locations(_IPythonEffects(reading.changed).visit(tree))
    except (SyntaxError, ValueError):  # `%time` of something that is not Python
        return None


class _IPythonEffects(ast.NodeTransformer):
    """IPython's calls on the lines it rewrote, as Python with the same effects we look for:
    ``%time step += 1`` is ``step += 1``, ``!rm -rf out`` a shell command, ``%matplotlib`` and
    ``model?`` nothing."""

    def __init__(self, changed: frozenset[int]) -> None:
        self.changed = changed

    def call(self, node: ast.expr) -> cellsource.IPythonCall | None:
        return cellsource.ipython_call(node) if node.lineno in self.changed else None

    def visit_Expr(self, node: ast.Expr) -> ast.AST | list[ast.stmt]:
        call = self.call(node.value)
        if call is None:
            return node
        if call.kind == "magic" and call.name in _STMT_MAGICS:
            stmt = _OPTIONS.sub("", call.arg.strip())
            if not stmt:
                return ast.copy_location(ast.Pass(), node)
            body = ast.parse(stmt).body
            for s in body:
                ast.increment_lineno(s, node.lineno - 1)
            return body
        value = self.value(call, node.value)
        if isinstance(value, ast.Constant):
            return ast.copy_location(ast.Pass(), node)
        return ast.copy_location(ast.Expr(value=value), node)

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        call = self.call(node.value)
        if call is None:
            return node
        if call.kind == "magic" and call.name in _STMT_MAGICS:
            stmt = _OPTIONS.sub("", call.arg.strip())
            if stmt:
                value = ast.increment_lineno(ast.parse(stmt, mode="eval").body, node.lineno - 1)
            else:
                value = ast.copy_location(ast.Constant(None), node.value)
        else:
            value = self.value(call, node.value)
        node.value = value
        return node

    @staticmethod
    def value(call: cellsource.IPythonCall, at: ast.expr) -> ast.expr:
        """A shell command that changes things is a call of ``_SHELL``; anything else nothing."""
        shell = call.kind == "shell" or (call.kind == "magic" and call.name in ("sx", "system"))
        if not shell or _HARMLESS_SHELL.match(call.arg):
            return ast.copy_location(ast.Constant(None), at)
        return ast.copy_location(ast.Call(ast.Name(_SHELL, ast.Load()), [], []), at)


# ---- what counts ----------------------------------------------------------------------------------

_ADDS = {"append", "extend", "insert", "appendleft", "extendleft"}
_CHANGES = {
    "pop": "pop from", "popleft": "pop from", "popitem": "pop from", "remove": "remove from",
    "discard": "discard from", "clear": "clear", "update": "update", "add": "add to",
    "setdefault": "set a default in", "sort": "sort", "reverse": "reverse", "rotate": "rotate",
    "__setitem__": "set an item of", "__delitem__": "delete an item of", "__iadd__": "add to",
}  # fmt: skip
_INPLACE = re.compile(r"^[a-z][a-z0-9_]*(?<!_)_$")  # torch's in-place methods: add_, mul_, copy_
_NOT_DATA = {"requires_grad_", "share_memory_", "retain_grad_"}
_VIEWS = {"detach", "view", "view_as", "narrow", "select", "squeeze", "unsqueeze", "t", "get",
          "setdefault"}  # fmt: skip
_SAME = {"to", "cuda", "cpu", "eval", "train", "detach", "contiguous"}  # twice is once
_MODULES = {
    "torch", "nn", "F", "init", "optim", "np", "numpy", "pd", "pandas", "os", "sys", "shutil",
    "json", "pickle", "math", "random", "time", "re", "io", "pathlib", "subprocess", "itertools",
    "functools", "collections", "plt", "matplotlib", "sns", "tqdm", "wandb", "mlflow", "logging",
    "gc", "warnings", "joblib", "yaml", "csv", "glob", "copy", "datetime", "tempfile", "requests",
    "torchvision", "transformers", "accelerate", "jax", "jnp", "tf", "scipy", "sklearn", "cv2",
    "gzip", "bz2", "lzma", "codecs", "tarfile", "zipfile", "h5py", "einops",
}  # fmt: skip
_SAVES = {"save", "savez", "savez_compressed", "savetxt", "save_file", "save_pretrained",
          "save_model", "savefig", "tofile", "write_text", "write_bytes", "touch", "unlink",
          "rmdir", "symlink_to", "hardlink_to"}  # fmt: skip
_EXPORTS = re.compile(r"^to_(?:csv|parquet|json|pickle|excel|hdf|feather|netcdf|sql|zarr|stata)$")
_OS_WRITES = {"remove", "unlink", "rename", "renames", "replace", "rmdir", "removedirs",
              "makedirs", "mkdir", "symlink", "link", "truncate", "chmod", "chown"}  # fmt: skip
_IO_CALLS = {"os.system", "os.popen", "subprocess.run", "subprocess.call", "subprocess.Popen",
             "subprocess.check_call", "subprocess.check_output", "requests.post", "requests.put",
             "requests.patch", "requests.delete", "wandb.log", "mlflow.log_metric",
             "mlflow.log_metrics", "mlflow.log_param", "mlflow.log_params",
             "mlflow.log_artifact"}  # fmt: skip
_IO_METHODS = {"add_scalar", "add_scalars", "add_histogram", "add_image", "add_figure",
               "add_text", "log_metrics", "log_hyperparams"}  # fmt: skip
_SHUTIL_READS = {"which", "disk_usage", "get_terminal_size"}
_STD_STREAMS = ("sys.stdout", "sys.stderr")
_HEAPQ = {"heappush", "heappop", "heapify", "heapreplace", "heappushpop", "heappush_max",
          "heappop_max", "heapify_max", "heapreplace_max", "heappushpop_max"}  # fmt: skip
_RUN_CELL = {"run_cell", "run_line_magic", "run_cell_magic"}  # get_ipython().run_cell(...)
_SQL_CALLS = {"execute", "executemany", "executescript", "commit"}
_SQL_READS = {"SELECT", "WITH", "PRAGMA", "EXPLAIN", "SHOW", "DESCRIBE", "DESC", "VALUES"}
_SQL_WRITES = {"INSERT", "UPDATE", "DELETE", "REPLACE", "UPSERT", "MERGE", "CREATE", "DROP",
               "ALTER", "TRUNCATE", "COPY", "GRANT", "REVOKE", "VACUUM"}  # fmt: skip
_DB_NAME = re.compile(r"cur|conn|\bcon\b|db|sql|session|engine")
_PARTLY = " (on the failing line: it may have done part of it before running out of memory)"
_OPEN_MODE = re.compile(r"^[rwxabtU+]{1,4}(?::\w*)?$")
_STATE_KW = {"params", "parameters", "model", "module", "optimizer"}
_AUG_VERBS = {ast.Add: "add to", ast.Sub: "subtract from", ast.Mult: "multiply",
              ast.Div: "divide", ast.FloorDiv: "divide", ast.Mod: "reduce",
              ast.BitOr: "merge into", ast.MatMult: "multiply"}  # fmt: skip


@dataclass
class _State:
    """What the walk knows at one point of the cell."""

    fresh: set[str] = field(default_factory=set)  # bound by the cell from scratch
    gone: set[str] = field(default_factory=set)  # pre-existing names the cell deleted
    alias: dict[str, str] = field(default_factory=dict)  # cell name -> pre-existing object it is
    deps: dict[str, frozenset[str]] = field(default_factory=dict)  # pre-existing state it came from
    zeroed: bool = False  # gradients were zeroed before this point
    methods: dict[str, ast.Attribute] = field(
        default_factory=dict
    )  # add = L.append: name -> L.append

    def copy(self) -> _State:
        return _State(
            set(self.fresh),
            set(self.gone),
            dict(self.alias),
            dict(self.deps),
            self.zeroed,
            dict(self.methods),
        )

    @staticmethod
    def merge(states: list[_State]) -> _State:
        """After branches of which any one ran: fresh only if fresh in all of them."""
        out = states[0].copy()
        for s in states[1:]:
            out.fresh &= s.fresh
            out.gone |= s.gone
            out.alias.update(s.alias)
            for k, v in s.deps.items():
                out.deps[k] = out.deps.get(k, frozenset()) | v
            out.zeroed = out.zeroed and s.zeroed
            out.methods.update(s.methods)
        return out


@dataclass
class _Reach:
    """What a walk needs to read the notebook functions a cell calls, shared by all depths."""

    namespace: Mapping[str, Any]
    cache: dict[int, NotebookFunction | None] = field(default_factory=dict)
    walks: int = 0  # function bodies walked so far


_DEPTH = 5  # calls followed into notebook code, one inside another
_WALKS = 100  # function bodies walked for one cell, all depths together


class _Walker:
    """Walks the cell (or a notebook function it calls) in execution order, up to the failing
    line, collecting effects."""

    def __init__(
        self, lines: list[str], preexisting: Collection[str], limit: int | None, earlier: bool
    ) -> None:
        self.lines = lines
        self.pre = frozenset(preexisting)
        self.limit = limit
        self.earlier = earlier  # False: the failing pass is the first of every loop around it
        self.full = 0  # > 0 inside a loop around the failing line: every line may have run
        self.in_loop = False
        self.st = _State()
        self.modules: set[str] = set()  # names the cell imported
        self.effects: list[SideEffect] = []
        # reading notebook functions: all unset for the cell when no namespace is given
        self.reach: _Reach | None = None
        self.frames: tuple[tuple[str, int], ...] = ()  # failing frames below this walk
        self.fn: NotebookFunction | None = None  # the function walked; None: the cell
        self.gpre: frozenset[str] = self.pre  # globals that existed before the cell, at the call
        self.values: dict[str, Any] = {}  # parameter -> the object the caller passed
        self.depth = 0
        self.active: frozenset[int] = frozenset()  # functions being walked, outermost first

    # ---- names

    def is_outer(self, name: str) -> bool:
        return name in self.pre and name not in self.st.fresh and name not in self.st.gone

    def origin(self, name: str) -> str | None:
        """The pre-existing name whose object ``name`` is, if any."""
        return name if self.is_outer(name) else self.st.alias.get(name)

    def is_module(self, node: ast.expr) -> bool:
        root = _chain_root(node, calls=False)
        if root is None:
            return False
        if root in self.modules or (root in _MODULES and root not in self.st.fresh):
            return True
        return root not in self.st.fresh and isinstance(self.lookup(root), ModuleType)

    def lookup(self, name: str) -> Any:
        """The object ``name`` holds, from the namespace or the caller; MISSING if unknown."""
        if self.reach is None:
            return MISSING
        if self.fn is not None and name in self.fn.local:
            return self.values.get(name, MISSING)
        return self.reach.namespace.get(name, MISSING)

    def global_view(self) -> frozenset[str]:
        """The globals that existed before the cell and still hold the same object here."""
        if self.fn is None:
            return frozenset(n for n in self.pre if self.is_outer(n))
        return frozenset(n for n in self.gpre if n not in self.fn.declared or self.is_outer(n))

    def before(self, root: str, name: str) -> str:
        origin = self.origin(root) or root
        if origin == name:
            return "which existed before the cell"
        return f"part of `{origin}`, which existed before the cell"

    def state_reads(self, node: ast.AST) -> frozenset[str]:
        """The pre-existing objects (not classes, modules or plain settings) ``node`` is made from."""
        out: set[str] = set()

        def visit(n: ast.AST) -> None:
            if isinstance(n, ast.Name):
                if self.is_outer(n.id) and n.id not in _MODULES:
                    out.add(n.id)
                out.update(self.st.deps.get(n.id, ()))
            elif isinstance(n, ast.Call):
                name = _dotted(n.func) or ""
                if not name.rpartition(".")[2][:1].isupper():  # a constructor reads no state
                    visit(n.func.value if isinstance(n.func, ast.Attribute) else n.func)
                for a in n.args:
                    visit(a)
                for k in n.keywords:
                    if not isinstance(k.value, ast.Name) or k.arg in _STATE_KW:
                        visit(k.value)
            elif not isinstance(n, ast.Lambda):
                for c in ast.iter_child_nodes(n):
                    visit(c)

        visit(node)
        return frozenset(out)

    def add(self, node: ast.AST, kind: str, name: str, why: str, again: str) -> None:
        lineno = getattr(node, "lineno", 1)
        text = self.lines[lineno - 1].strip() if lineno <= len(self.lines) else ""
        self.effects.append(SideEffect(lineno, kind, name, text, why, again))

    # ---- statements

    def block(self, body: list[ast.stmt]) -> bool:
        """Walk statements in order; True once the failing statement was reached."""
        for i, s in enumerate(body):
            nxt = body[i + 1] if i + 1 < len(body) else None
            lim = self.limit
            end = s.end_lineno or s.lineno
            if self.full or lim is None or end < lim or (nxt is not None and nxt.lineno <= lim):
                self.stmt(s, failing=False)
            elif s.lineno > lim or self.stmt(s, failing=True):
                return True
        return False

    def stmt(self, s: ast.stmt, *, failing: bool) -> bool:
        """One statement; ``failing``: it holds the failing line. True when the walk stops here."""
        lim = self.limit or 0
        if isinstance(s, (ast.For, ast.AsyncFor, ast.While)):
            in_else = failing and bool(s.orelse) and lim >= s.orelse[0].lineno
            around = failing and not in_else
            first = around and not self.earlier  # the first pass: only the lines before it ran
            if first and lim < s.body[0].lineno:
                return True  # the header failed before the first pass
            around = around and not first
            self.full += around
            self.in_loop |= around
            if isinstance(s, ast.While):
                self.scan(s.test)
            else:
                self.scan(s.iter)
                self.bind(s.target, s.iter, iterates=True)
            if not first:
                self.st.zeroed |= any(_zeroes(n) for b in s.body for n in ast.walk(b))
            self.block(s.body)
            if first:
                return True
            self.full -= around
            return around or self.block(s.orelse)
        if isinstance(s, ast.If):
            if failing and lim < s.body[0].lineno:
                return True  # the test itself failed
            self.scan(s.test)
            if failing:
                in_else = bool(s.orelse) and lim >= s.orelse[0].lineno
                return self.block(s.orelse if in_else else s.body)
            self.branches([s.body, s.orelse])
        elif isinstance(s, (ast.With, ast.AsyncWith)):
            if failing and lim < s.body[0].lineno:
                return True  # entering failed: the body never ran
            for item in s.items:
                self.scan(item.context_expr)
                if item.optional_vars is not None:
                    self.bind(item.optional_vars, item.context_expr)
            return self.block(s.body) and failing
        elif isinstance(s, _TRY_NODES):
            return self.try_(s, lim if failing else None)  # type: ignore[arg-type]
        elif isinstance(s, ast.Match):
            if failing and lim < s.cases[0].pattern.lineno:
                return True
            self.scan(s.subject)
            if failing:
                case = [c for c in s.cases if c.pattern.lineno <= lim][-1]
                return self.block(case.body)
            self.branches([c.body for c in s.cases] + [[]])
        elif isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for d in s.decorator_list:
                self.scan(d)
            self.bind_name(s.name, None)
            if failing:
                self.limit = None  # failed inside a body: where it was called from is unknown
            return False
        elif failing:
            self.failing(s)
            return True
        else:
            self.simple(s)
        return False

    def branches(self, blocks: list[list[ast.stmt]]) -> None:
        start, ends = self.st, []
        for b in blocks:
            self.st = start.copy()
            self.block(b)
            ends.append(self.st)
        self.st = _State.merge(ends)

    def try_(self, s: ast.Try, lim: int | None) -> bool:  # or ast.TryStar (3.11+)
        starts = [("body", s.lineno)] + [(f"h{i}", h.lineno) for i, h in enumerate(s.handlers)]
        starts += [("else", s.orelse[0].lineno)] if s.orelse else []
        starts += [("finally", s.finalbody[0].lineno)] if s.finalbody else []
        where = "" if lim is None else [k for k, line in starts if line <= lim][-1]
        if where == "body":
            return self.block(s.body)
        if where.startswith("h"):
            self.block(s.body)
            h = s.handlers[int(where[1:])]
            if h.name:
                self.bind_name(h.name, None)
            return self.block(h.body)
        if where == "else":
            self.block(s.body)
            return self.block(s.orelse)
        start = self.st.copy()
        self.block(s.body)
        self.block(s.orelse)
        ends = [self.st]
        for h in s.handlers:
            self.st = start.copy()
            if h.name:
                self.bind_name(h.name, None)
            self.block(h.body)
            ends.append(self.st)
        self.st = _State.merge(ends)
        return self.block(s.finalbody) and lim is not None

    def failing(self, s: ast.stmt) -> None:
        """The statement that raised: its effect came after the raise, unless it is the call."""
        read = set()
        if self.reach is not None:  # a notebook function it called may have run part way
            read = {
                id(n) for n in ast.walk(s) if isinstance(n, ast.Call) and self.enter(n, self.frames)
            }
        if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call) and id(s.value) not in read:
            self.call(s.value, partial=True)

    def simple(self, s: ast.stmt) -> None:
        self.scan(s)
        if isinstance(s, ast.Assign):
            for t in s.targets:
                self.bind(t, s.value)
        elif isinstance(s, ast.AnnAssign) and s.value is not None:
            self.bind(s.target, s.value)
        elif isinstance(s, ast.AugAssign):
            self.augassign(s)
        elif isinstance(s, ast.Delete):
            for t in s.targets:
                self.delete(t)
        elif isinstance(s, (ast.Import, ast.ImportFrom)):
            for a in s.names:
                if a.name != "*":
                    name = a.asname or a.name.split(".")[0]
                    self.bind_name(name, None)
                    self.modules.add(name)

    def augassign(self, s: ast.AugAssign) -> None:
        t = s.target
        verb = _AUG_VERBS.get(type(s.op), "update")
        if isinstance(t, ast.Name):
            if self.is_outer(t.id):
                why = f"{_third(verb)} `{t.id}`, which existed before the cell: a re-run does it again"
                self.add(s, "augassign_global", t.id, why, f"{verb} `{t.id}` again")
            return
        if isinstance(t, ast.Subscript) and is_globals(t.value):
            return self.store(t, verb)
        root = _chain_root(t, calls=False)
        if root is not None and self.origin(root) and not self.is_module(t):
            name = _unparse(t)
            why = f"{_third(verb)} `{name}`, {self.before(root, name)}: a re-run does it again"
            self.add(s, "augassign_global", name, why, f"{verb} `{name}` again")

    def delete(self, t: ast.expr) -> None:
        if isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                self.delete(e)
        elif isinstance(t, ast.Name):
            # a name the cell did not make existed before it, or the failed run could not delete it
            if t.id not in self.st.fresh and t.id not in self.st.gone:
                why = f"deletes `{t.id}`, which a re-run needs"
                self.add(t, "delete_global", t.id, why, f"find `{t.id}` already deleted")
                self.st.gone.add(t.id)
            self.st.fresh.discard(t.id)
            self.st.alias.pop(t.id, None)
            self.st.methods.pop(t.id, None)
        else:
            self.store(t, "delete")

    def store(self, t: ast.expr, verb: str = "set") -> None:
        """``obj.attr = v`` / ``d[k] = v`` (or ``del``) on an object that existed before the cell."""
        if isinstance(t, ast.Subscript) and is_globals(t.value):  # globals()[name] = v
            name = _unparse(t)
            why = f"{_third(verb)} `{name}`, a global of the notebook: a re-run does it again"
            self.add(t, "mutate_global", name, why, f"{verb} `{name}` again")
            return
        root = _chain_root(t, calls=False)
        if root is None or not self.origin(root) or self.is_module(t) or _has_grad(t):
            return
        name = _unparse(t)
        why = f"{_third(verb)} `{name}`, {self.before(root, name)}: a re-run does it again"
        self.add(t, "mutate_global", name, why, f"{verb} `{name}` again")

    def bind(self, t: ast.expr, value: ast.expr, *, iterates: bool = False) -> None:
        if isinstance(t, (ast.Tuple, ast.List)):
            same = isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(t.elts)
            parts = value.elts if same and isinstance(value, (ast.Tuple, ast.List)) else None
            for i, e in enumerate(t.elts):
                self.bind(e, parts[i] if parts else value, iterates=iterates)
        elif isinstance(t, ast.Starred):
            self.bind(t.value, value, iterates=iterates)
        elif isinstance(t, ast.Name):
            self.bind_name(t.id, value, iterates=iterates, node=t)
        else:
            self.store(t)

    def bind_name(
        self,
        name: str,
        value: ast.expr | None,
        *,
        iterates: bool = False,
        node: ast.AST | None = None,
    ) -> None:
        if value is not None and self.is_outer(name) and _reads(value, name):
            if not _same_object(value, name):
                why = f"rebinds `{name}` from its own value: a re-run applies it twice"
                again = f"rebind `{name}` from its own value again"
                self.add(node or value, "global_rebind", name, why, again)
            return  # still the pre-existing object, or made from it
        root = _chain_root(value, calls=iterates) if value is not None else None
        origin = self.origin(root) if root is not None and root not in _MODULES else None
        deps = self.state_reads(value) if value is not None else frozenset()
        self.st.fresh.add(name)
        self.st.gone.discard(name)
        if origin:
            self.st.alias[name] = origin
        else:
            self.st.alias.pop(name, None)
        if origin and isinstance(value, ast.Attribute):
            self.st.methods[name] = value  # a bound method: calling the name calls it
        else:
            self.st.methods.pop(name, None)
        self.st.deps[name] = deps

    # ---- expressions

    def scan(self, node: ast.AST) -> None:
        """Every call in ``node``, arguments before the call; walrus bindings."""
        if isinstance(node, (ast.Lambda, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return
        for child in ast.iter_child_nodes(node):
            self.scan(child)
        if isinstance(node, ast.Call):
            self.call(node)
        elif isinstance(node, ast.NamedExpr):
            self.bind_name(node.target.id, node.value, node=node)

    def call(self, c: ast.Call, *, partial: bool = False) -> None:
        f = c.func
        if isinstance(f, ast.Name) and f.id in self.st.methods:  # add = L.append; add(1)
            f = self.st.methods[f.id]
            c = ast.copy_location(ast.Call(func=f, args=c.args, keywords=c.keywords), c)
        if self.reach is not None and not partial and self.enter(c, ()):
            return  # its body was read: what its name suggests does not matter
        recv = f.value if isinstance(f, ast.Attribute) else None
        attr = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        dotted = _dotted(f) or ""
        if attr == "zero_grad" or (attr == "zero_" and recv is not None and _has_grad(recv)):
            self.st.zeroed = True
        elif attr == "step" and recv is not None:
            if self.state_reads(c) or not _fresh_root(recv, self):
                self.step(c, recv, partial)
        elif attr == "backward" and not self.st.zeroed and self.state_reads(c):
            why = "adds to the gradients, with no `zero_grad()` before it"
            why += _PARTLY if partial else ""
            why += ": a re-run adds them again"
            name = _unparse(recv) if recv else dotted
            self.add(c, "backward", name, why, "accumulate gradients again")
        elif partial or self.more(c, recv, attr, dotted):
            return
        elif attr == _SHELL:
            why = "runs a shell command: a re-run runs it again"
            self.add(c, "io_call", "shell command", why, "run the shell command again")
        elif attr == "open" and (recv is None or self.is_module(recv)):
            self.opens(c, _arg(c, 1, "mode"), strict=False)
        elif attr == "open":
            self.opens(c, _arg(c, 0, "mode"), strict=True)
        elif dotted in _IO_CALLS or (recv is not None and attr in _IO_METHODS):
            name = _unparse(c)
            why = f"calls `{name}`: a re-run does it again"
            self.add(c, "io_call", name, why, f"call `{name}` again")
        elif self.writes(c, recv, attr, dotted):
            name = _unparse(c)
            why = f"writes with `{name}`: a re-run writes again"
            self.add(c, "file_write", name, why, f"run `{name}` again")
        elif recv is None or self.is_module(recv):
            # the function form, ``nn.init.zeros_(w)``: the first argument changes
            inplace = _INPLACE.match(attr) and not attr.startswith("clip_grad")
            if (inplace or attr == "shuffle") and c.args and not _has_grad(c.args[0]):
                self.mutation(c, c.args[0], attr)
        elif _mutates(attr) and not _has_grad(recv):
            self.mutation(c, recv, attr)

    def enter(self, c: ast.Call, frames: tuple[tuple[str, int], ...]) -> bool:
        """A call of a function defined in the notebook: its effects, as effects of this line.

        True when the function was read (or is being read, one call further out)."""
        reach = self.reach
        if reach is None or self.depth >= _DEPTH or reach.walks >= _WALKS:
            return False
        try:
            callee = calls.notebook_callee(c.func, reach.namespace, self.lookup, reach.cache)
            if callee is None or callee.fn.key in self.active:
                return callee is not None
            fn = callee.fn
            reach.walks += 1
            limit: int | None = None
            below: tuple[tuple[str, int], ...] = ()
            if frames and frames[0][0] == fn.qualname:  # where it stopped, when it failed in it
                limit, below = fn.node_line(frames[0][1]), frames[1:]
            pre = self.global_view()
            inner = _Walker(fn.lines, pre - fn.local, limit, self.earlier)
            inner.reach, inner.fn, inner.gpre, inner.frames = reach, fn, pre, below
            inner.depth, inner.active = self.depth + 1, self.active | {fn.key}
            inner.st.zeroed = self.st.zeroed
            self.pass_args(c, callee, inner)
            inner.block(fn.node.body)
        except Exception:  # a function we cannot read is a call we do not look into
            return False
        self.st.zeroed |= inner.st.zeroed
        for e in inner.effects:
            where = f"`{fn.qualname}`, whose line {fn.file_line(e.lineno)} `{_short(e.text, 40)}`"
            self.add(c, e.kind, e.name, f"calls {where} {e.why}", f"call {where} {_third(e.again)}")
        return True

    def pass_args(self, c: ast.Call, callee: Callee, inner: _Walker) -> None:
        """Bind the parameters: fresh names, each standing for the caller's object it was given."""
        args = calls.match_args(callee, c)
        inner.st.fresh.update(args.names)
        for name, glob in args.defaults.items():  # a default is evaluated where the def ran
            if glob in inner.gpre:
                inner.st.alias[name], inner.st.deps[name] = glob, frozenset({glob})
        spread = frozenset().union(*(self.state_reads(e) for e in args.spread))
        for name in args.names:
            expr = args.bound.get(name)
            if expr is None:
                if spread:
                    inner.st.deps[name] = inner.st.deps.get(name, frozenset()) | spread
                continue
            if self.outer(expr):
                inner.st.alias[name] = self.origin(_chain_root(expr, calls=False) or "") or name
            inner.st.deps[name] = self.state_reads(expr)
            if isinstance(expr, ast.Name) and (value := self.lookup(expr.id)) is not MISSING:
                inner.values[name] = value

    def more(self, c: ast.Call, recv: ast.expr | None, attr: str, dotted: str) -> bool:
        """Iterators, heaps, queues, setattr, ``out=``, exec, databases: True when one matched."""
        out = next((k.value for k in c.keywords if k.arg == "out"), None)
        if out is not None and self.outer(out):
            name = _unparse(out)
            why = f"changes `{name}` in place (out=), {self.before_of(out)}: a re-run changes it again"
            self.add(c, "mutate_global", name, why, f"change `{name}` in place again")
        plain = recv is None or self.is_module(recv)
        first = c.args[0] if c.args else None
        if (attr == "next" and recv is None and first) or (attr == "__next__" and not plain):
            it = first if attr == "next" else recv
            if it is None or not self.outer(it):
                return False
            name = _unparse(it)
            why = f"advances `{name}`, {self.before_of(it)}: a re-run skips what it took"
            self.add(c, "iterator", name, why, f"advance `{name}` again, skipping what it took")
        elif attr in _HEAPQ and first is not None and (recv is None or dotted == f"heapq.{attr}"):
            if not self.outer(first):
                return False
            name = _unparse(first)
            verb = "push onto" if "push" in attr else "pop from" if "pop" in attr else "reorder"
            kind = "append" if "push" in attr else "mutate_global"
            why = f"{_third(verb)} `{name}`, {self.before_of(first)}: a re-run does it again"
            self.add(c, kind, name, why, f"{verb} `{name}` again")
        elif recv is not None and not plain and _takes_from_queue(c, attr):
            if not self.outer(recv):
                return False
            name = _unparse(recv)
            verb = "put into" if attr.startswith("put") else "take from"
            why = f"{_third(verb)} `{name}`, {self.before_of(recv)}: a re-run does it again"
            self.add(c, "queue", name, why, f"{verb} `{name}` again")
        elif attr in ("setattr", "delattr") and recv is None and first is not None:
            if not self.outer(first):
                return False
            key = c.args[1] if len(c.args) > 1 else None
            name = _unparse(first)
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                name += f".{key.value}"
            verb = "set" if attr == "setattr" else "delete"
            why = f"{_third(verb)} `{name}`, {self.before_of(first)}: a re-run does it again"
            self.add(c, "mutate_global", name, why, f"{verb} `{name}` again")
        elif (recv is not None and is_globals(recv) and _mutates(attr)) or (
            recv is None and attr in ("exec", "eval") and first is not None and not _pure(first)
        ):
            name = _unparse(c) if attr not in ("exec", "eval") else attr
            why = f"runs `{_unparse(c)}`, whose effects cannot be read: a re-run runs it again"
            self.add(c, "exec", name, why, f"run `{_unparse(c)}` again")
        elif recv is not None and not plain and attr in _RUN_CELL:
            why = f"runs `{_unparse(c)}`, whose effects cannot be read: a re-run runs it again"
            self.add(c, "exec", _unparse(c), why, f"run `{_unparse(c)}` again")
        elif recv is not None and not plain and attr in _SQL_CALLS:
            return self.sql(c, recv, attr)
        elif attr == "print" and recv is None:
            dest = next((k.value for k in c.keywords if k.arg == "file"), None)
            if dest is None or not self.outer(dest) or _dotted(dest) in _STD_STREAMS:
                return False
            name = _unparse(dest)
            why = f"writes to `{name}`, {self.before_of(dest)}: a re-run writes again"
            self.add(c, "file_write", name, why, f"write to `{name}` again")
        else:
            return False
        return True

    def sql(self, c: ast.Call, recv: ast.expr, attr: str) -> bool:
        """``db.execute("INSERT ...")``, ``conn.commit()``: True when it may write to a database."""
        name = _unparse(c)
        if attr == "commit":
            if not self.outer(recv) and not self.state_reads(recv):
                return False
            why = f"commits with `{name}`: a re-run commits what it writes again"
            self.add(c, "database", name, why, "commit to the database again")
            return True
        if not c.args:
            return False
        verb = _sql_verb(c.args[0])
        if verb in _SQL_READS:
            return False
        known = verb in _SQL_WRITES
        if not known and attr == "execute" and not _DB_NAME.search(_unparse(recv).lower()):
            return False
        what = "writes to the database" if known else "runs SQL that may write to the database"
        why = f"{what} with `{name}`: a re-run does it again"
        self.add(c, "database", name, why, "write to the database again")
        return True

    def outer(self, node: ast.expr) -> bool:
        """``node`` is (part of) an object that existed before the cell, and not a module."""
        root = _chain_root(node, calls=False)
        return root is not None and bool(self.origin(root)) and not self.is_module(node)

    def before_of(self, node: ast.expr) -> str:
        return self.before(_chain_root(node, calls=False) or "", _unparse(node))

    def step(self, c: ast.Call, recv: ast.expr, partial: bool) -> None:
        x = _unparse(recv)
        low = x.lower()
        if "sched" in low or "lr" in low:
            did, again = "advances the learning-rate schedule", "advance the schedule again"
        elif any(w in low for w in ("opt", "scaler", "sgd", "adam")):
            did, again = "updates the weights", "update the weights again"
        else:
            did, again = f"steps `{x}`", f"step `{x}` again"
        why = did + (_PARTLY if partial else "") + ": a re-run does it again"
        self.add(c, "optimizer_step", x, why, again)

    def writes(self, c: ast.Call, recv: ast.expr | None, attr: str, dotted: str) -> bool:
        if recv is None:
            return False
        if attr in _SAVES or (dotted.startswith("shutil.") and attr not in _SHUTIL_READS):
            return True
        if _EXPORTS.match(attr) or attr == "dump":
            return len(c.args) + len(c.keywords) >= (2 if attr == "dump" else 1)
        if dotted.startswith("os.") and attr in _OS_WRITES:
            return not any(k.arg == "exist_ok" for k in c.keywords)
        if attr == "mkdir":
            return not any(k.arg == "exist_ok" for k in c.keywords)
        if attr in ("write", "writelines"):
            root = _chain_root(recv, calls=False)
            return root is not None and bool(self.origin(root)) and _dotted(recv) not in (
                "sys.stdout", "sys.stderr")  # fmt: skip
        return False

    def opens(self, c: ast.Call, mode: ast.expr | None, *, strict: bool) -> None:
        if isinstance(mode, ast.Constant) and isinstance(mode.value, str):
            m = mode.value
            if not _OPEN_MODE.match(m) or not set(m) & set("wax+"):
                return
        elif mode is None or strict:
            return
        else:
            m = "?"
        path = _unparse(c.args[0]) if c.args else "a file"
        if "a" in m:
            why, again = f"appends to {path}: a re-run appends again", f"append to {path} again"
        elif "x" in m:
            why, again = (
                f"creates {path}: a re-run fails, it exists",
                f"fail to create {path} again",
            )
        else:
            why, again = f"writes {path} (mode {_unparse(mode)})", f"write {path} again"
        self.add(c, "file_write", _unparse(c), why, again)

    def mutation(self, c: ast.Call, target: ast.expr, attr: str) -> None:
        root = _chain_root(target, calls=False)
        if root is None or not self.origin(root) or self.is_module(target):
            return
        name = _unparse(target)
        before = self.before(root, name)
        if attr in _ADDS:
            why = f"appends to `{name}`, {before}: a re-run appends again"
            self.add(c, "append", name, why, f"append to `{name}` again")
        elif attr in _CHANGES:
            verb = _CHANGES[attr]
            why = f"{_third(verb)} `{name}`, {before}: a re-run does it again"
            self.add(c, "mutate_global", name, why, f"{verb} `{name}` again")
        else:
            why = f"changes `{name}` in place ({attr}), {before}: a re-run changes it again"
            self.add(c, "mutate_global", name, why, f"change `{name}` in place again")


# ---- small helpers --------------------------------------------------------------------------------


def _third(phrase: str) -> str:
    """'add to `x` again' -> 'adds to `x` again'."""
    verb, _, rest = phrase.partition(" ")
    if verb.endswith("y") and verb[-2:-1] not in ("a", "e", "o", "u", ""):
        verb = verb[:-1] + "ies"
    elif verb.endswith(("s", "sh", "ch", "x", "z")):
        verb += "es"
    else:
        verb += "s"
    return f"{verb} {rest}".rstrip()


def _short(text: str, width: int = 60) -> str:
    """Shown between backticks in a message: its own backticks become quotes."""
    return cellsource.short(text.replace("`", "'"), width)


def _unparse(node: ast.AST | None) -> str:
    return "" if node is None else _short(ast.unparse(node))


def _chain_root(node: ast.AST | None, *, calls: bool) -> str | None:
    """The name an attribute/item/view chain starts from (``calls``: any method call too)."""
    while node is not None:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, (ast.Attribute, ast.Subscript, ast.Starred)):
            node = node.value
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and (calls or node.func.attr in _VIEWS)
        ):
            node = node.func.value
        else:
            return None
    return None


def _fresh_root(node: ast.expr, walker: _Walker) -> bool:
    root = _chain_root(node, calls=True)
    return root is not None and root in walker.st.fresh


def _arg(c: ast.Call, pos: int, kw: str) -> ast.expr | None:
    for k in c.keywords:
        if k.arg == kw:
            return k.value
    return c.args[pos] if len(c.args) > pos else None


def _reads(node: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node))


def _same_object(value: ast.expr, name: str) -> bool:
    """``x.to(device)``, ``model.cuda().eval()``: doing it twice is doing it once."""
    while isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute):
        if value.func.attr not in _SAME:
            return False
        value = value.func.value
    return isinstance(value, ast.Name) and value.id == name


def _mutates(method: str) -> bool:
    return (
        method in _ADDS
        or method in _CHANGES
        or bool(_INPLACE.match(method) and method not in _NOT_DATA)
    )


def _has_grad(node: ast.AST) -> bool:
    """``p.grad...``: gradients, which the next backward recomputes."""
    return any(isinstance(n, ast.Attribute) and n.attr == "grad" for n in ast.walk(node))


def _zeroes(node: ast.AST) -> bool:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr == "zero_grad" or (node.func.attr == "zero_" and _has_grad(node.func))
    return isinstance(node, ast.Assign) and any(
        isinstance(t, ast.Attribute) and t.attr == "grad" for t in node.targets
    )


def _takes_from_queue(c: ast.Call, attr: str) -> bool:
    """``q.put(x)``, ``q.put_nowait(x)``, ``q.get_nowait()``, ``q.get()`` (a dict's get needs a key)."""
    if attr in ("put", "put_nowait", "get_nowait"):
        return True
    return attr == "get" and not c.args and all(k.arg in ("block", "timeout") for k in c.keywords)


def _pure(node: ast.expr) -> bool:
    """A string constant holding an expression with no calls: ``eval("2 * 3")``."""
    if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
        return False
    try:
        tree = ast.parse(node.value, mode="eval")
    except (SyntaxError, ValueError):
        return False
    return not any(isinstance(n, (ast.Call, ast.NamedExpr, ast.Await)) for n in ast.walk(tree))


def _sql_verb(node: ast.expr) -> str | None:
    """The first keyword of the SQL text ``node`` starts with, when it starts with a constant."""
    while isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
        node = node.left
    if isinstance(node, ast.JoinedStr) and node.values:
        node = node.values[0]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
        node = node.args[0]  # text("INSERT ...") in SQLAlchemy
    if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
        return None
    text = re.sub(r"^(?:\s+|--[^\n]*\n?|/\*.*?\*/|\()*", "", node.value, flags=re.S)
    m = re.match(r"[A-Za-z]+", text)
    return m.group(0).upper() if m else None

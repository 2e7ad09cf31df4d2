"""What one call does to the objects that existed before the cell: the names the walk tracks
(fresh, deleted, aliases, what each was made from), and each call judged against the
vocabulary: a step, a backward, a write, a mutation, an iterator advanced, SQL, ``exec``.
The statements around the calls are ``guard_walk``'s; what the walk knows at a point,
``guard_state``'s."""

from __future__ import annotations

import ast
from collections.abc import Collection
from types import ModuleType
from typing import Any

from jupyter_gpumem.cells.source import dotted as _dotted
from jupyter_gpumem.guard.calls import MISSING, NotebookFunction, is_globals
from jupyter_gpumem.guard.state import Reach, State
from jupyter_gpumem.guard.verdict import SideEffect, third
from jupyter_gpumem.guard.words import (
    ADDS,
    CHANGES,
    DB_NAME,
    EXPORTS,
    HEAPQ,
    INPLACE,
    IO_CALLS,
    IO_METHODS,
    MODULES,
    OPEN_MODE,
    OS_WRITES,
    PARTLY,
    RUN_CELL,
    SAVES,
    SHELL,
    SHUTIL_READS,
    SQL_CALLS,
    SQL_READS,
    SQL_WRITES,
    STATE_KW,
    STD_STREAMS,
    arg_of,
    chain_root,
    has_grad,
    mutates,
    pure,
    shown,
    sql_verb,
    takes_from_queue,
)


class CallReader:
    """What the walk knows of names, and the effects of the calls it meets (``guard_walk.Walker``
    adds the statements around them)."""

    def __init__(
        self, lines: list[str], preexisting: Collection[str], limit: int | None, earlier: bool
    ) -> None:
        self.lines = lines
        self.pre = frozenset(preexisting)
        self.limit = limit
        self.earlier = earlier  # False: the failing pass is the first of every loop around it
        self.full = 0  # > 0 inside a loop around the failing line: every line may have run
        self.in_loop = False
        self.st = State()
        self.modules: set[str] = set()  # names the cell imported
        self.effects: list[SideEffect] = []
        # reading notebook functions: all unset for the cell when no namespace is given
        self.reach: Reach | None = None
        self.frames: tuple[tuple[str, int], ...] = ()  # failing frames below this walk
        self.fn: NotebookFunction | None = None  # the function walked; None: the cell
        self.gpre: frozenset[str] = self.pre  # globals that existed before the cell, at the call
        self.values: dict[str, Any] = {}  # parameter -> the object the caller passed
        self.depth = 0
        self.active: frozenset[int] = frozenset()  # functions being walked, outermost first
        # which branch of an `if` ran (``guard_branch``): the body walked, the finished loops
        # around the walk's point (their first lines), the lines IPython syntax rewrote
        self.root: list[ast.stmt] = []
        self.loops: list[int] = []
        self.ipython: frozenset[int] = frozenset()

    # ---- names

    def is_outer(self, name: str) -> bool:
        return name in self.pre and name not in self.st.fresh and name not in self.st.gone

    def origin(self, name: str) -> str | None:
        """The pre-existing name whose object ``name`` is, if any."""
        return name if self.is_outer(name) else self.st.alias.get(name)

    def is_module(self, node: ast.expr) -> bool:
        root = chain_root(node, calls=False)
        if root is None:
            return False
        if root in self.modules or (root in MODULES and root not in self.st.fresh):
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
                if self.is_outer(n.id) and n.id not in MODULES:
                    out.add(n.id)
                out.update(self.st.deps.get(n.id, ()))
            elif isinstance(n, ast.Call):
                name = _dotted(n.func) or ""
                if not name.rpartition(".")[2][:1].isupper():  # a constructor reads no state
                    visit(n.func.value if isinstance(n.func, ast.Attribute) else n.func)
                for a in n.args:
                    visit(a)
                for k in n.keywords:
                    if not isinstance(k.value, ast.Name) or k.arg in STATE_KW:
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

    def enter(self, c: ast.Call, frames: tuple[tuple[str, int], ...]) -> bool:
        """A call of a notebook function, read as this line's effects: ``guard_walk``'s."""
        return False

    # ---- calls

    def call(self, c: ast.Call, *, partial: bool = False) -> None:  # noqa: C901 (issue 17: to be split)
        f = c.func
        if isinstance(f, ast.Name) and f.id in self.st.methods:  # add = L.append; add(1)
            f = self.st.methods[f.id]
            c = ast.copy_location(ast.Call(func=f, args=c.args, keywords=c.keywords), c)
        if self.reach is not None and not partial and self.enter(c, ()):
            return  # its body was read: what its name suggests does not matter
        recv = f.value if isinstance(f, ast.Attribute) else None
        attr = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        dotted = _dotted(f) or ""
        if attr == "zero_grad" or (attr == "zero_" and recv is not None and has_grad(recv)):
            self.st.zeroed = True
        elif attr == "step" and recv is not None:
            if self.state_reads(c) or not fresh_root(recv, self):
                self.step(c, recv, partial)
        elif attr == "backward" and not self.st.zeroed and self.state_reads(c):
            why = "adds to the gradients, with no `zero_grad()` before it"
            why += PARTLY if partial else ""
            why += ": a re-run adds them again"
            name = shown(recv) if recv else dotted
            self.add(c, "backward", name, why, "accumulate gradients again")
        elif partial or self.more(c, recv, attr, dotted):
            return
        elif attr == SHELL:
            why = "runs a shell command: a re-run runs it again"
            self.add(c, "io_call", "shell command", why, "run the shell command again")
        elif attr == "open" and (recv is None or self.is_module(recv)):
            self.opens(c, arg_of(c, 1, "mode"), strict=False)
        elif attr == "open":
            self.opens(c, arg_of(c, 0, "mode"), strict=True)
        elif dotted in IO_CALLS or (recv is not None and attr in IO_METHODS):
            name = shown(c)
            why = f"calls `{name}`: a re-run does it again"
            self.add(c, "io_call", name, why, f"call `{name}` again")
        elif self.writes(c, recv, attr, dotted):
            name = shown(c)
            why = f"writes with `{name}`: a re-run writes again"
            self.add(c, "file_write", name, why, f"run `{name}` again")
        elif recv is None or self.is_module(recv):
            # the function form, ``nn.init.zeros_(w)``: the first argument changes
            inplace = INPLACE.match(attr) and not attr.startswith("clip_grad")
            if (inplace or attr == "shuffle") and c.args and not has_grad(c.args[0]):
                self.mutation(c, c.args[0], attr)
        elif mutates(attr) and not has_grad(recv):
            self.mutation(c, recv, attr)

    def more(self, c: ast.Call, recv: ast.expr | None, attr: str, dotted: str) -> bool:
        """Iterators, heaps, queues, setattr, ``out=``, exec, databases: True when one matched."""
        self.out_arg(c)
        plain = recv is None or self.is_module(recv)
        first = c.args[0] if c.args else None
        if (attr == "next" and recv is None and first) or (attr == "__next__" and not plain):
            it = first if attr == "next" else recv
            if it is None or not self.outer(it):
                return False
            name = shown(it)
            why = f"advances `{name}`, {self.before_of(it)}: a re-run skips what it took"
            self.add(c, "iterator", name, why, f"advance `{name}` again, skipping what it took")
        elif attr in HEAPQ and first is not None and (recv is None or dotted == f"heapq.{attr}"):
            if not self.outer(first):
                return False
            name = shown(first)
            verb = "push onto" if "push" in attr else "pop from" if "pop" in attr else "reorder"
            kind = "append" if "push" in attr else "mutate_global"
            why = f"{third(verb)} `{name}`, {self.before_of(first)}: a re-run does it again"
            self.add(c, kind, name, why, f"{verb} `{name}` again")
        elif recv is not None and not plain and takes_from_queue(c, attr):
            if not self.outer(recv):
                return False
            name = shown(recv)
            verb = "put into" if attr.startswith("put") else "take from"
            why = f"{third(verb)} `{name}`, {self.before_of(recv)}: a re-run does it again"
            self.add(c, "queue", name, why, f"{verb} `{name}` again")
        elif attr in ("setattr", "delattr") and recv is None and first is not None:
            if not self.outer(first):
                return False
            key = c.args[1] if len(c.args) > 1 else None
            name = shown(first)
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                name += f".{key.value}"
            verb = "set" if attr == "setattr" else "delete"
            why = f"{third(verb)} `{name}`, {self.before_of(first)}: a re-run does it again"
            self.add(c, "mutate_global", name, why, f"{verb} `{name}` again")
        elif (recv is not None and is_globals(recv) and mutates(attr)) or (
            recv is None and attr in ("exec", "eval") and first is not None and not pure(first)
        ):
            name = shown(c) if attr not in ("exec", "eval") else attr
            why = f"runs `{shown(c)}`, whose effects cannot be read: a re-run runs it again"
            self.add(c, "exec", name, why, f"run `{shown(c)}` again")
        elif recv is not None and not plain and attr in RUN_CELL:
            why = f"runs `{shown(c)}`, whose effects cannot be read: a re-run runs it again"
            self.add(c, "exec", shown(c), why, f"run `{shown(c)}` again")
        elif recv is not None and not plain and attr in SQL_CALLS:
            return self.sql(c, recv, attr)
        elif attr == "print" and recv is None:
            dest = next((k.value for k in c.keywords if k.arg == "file"), None)
            if dest is None or not self.outer(dest) or _dotted(dest) in STD_STREAMS:
                return False
            name = shown(dest)
            why = f"writes to `{name}`, {self.before_of(dest)}: a re-run writes again"
            self.add(c, "file_write", name, why, f"write to `{name}` again")
        else:
            return False
        return True

    def out_arg(self, c: ast.Call) -> None:
        """``torch.add(a, b, out=x)``: ``x`` changed in place, whatever the call is otherwise."""
        out = next((k.value for k in c.keywords if k.arg == "out"), None)
        if out is not None and self.outer(out):
            name = shown(out)
            why = f"changes `{name}` in place (out=), {self.before_of(out)}: a re-run changes it again"
            self.add(c, "mutate_global", name, why, f"change `{name}` in place again")

    def sql(self, c: ast.Call, recv: ast.expr, attr: str) -> bool:
        """``db.execute("INSERT ...")``, ``conn.commit()``: True when it may write to a database."""
        name = shown(c)
        if attr == "commit":
            if not self.outer(recv) and not self.state_reads(recv):
                return False
            why = f"commits with `{name}`: a re-run commits what it writes again"
            self.add(c, "database", name, why, "commit to the database again")
            return True
        if not c.args:
            return False
        verb = sql_verb(c.args[0])
        if verb in SQL_READS:
            return False
        known = verb in SQL_WRITES
        if not known and attr == "execute" and not DB_NAME.search(shown(recv).lower()):
            return False
        what = "writes to the database" if known else "runs SQL that may write to the database"
        why = f"{what} with `{name}`: a re-run does it again"
        self.add(c, "database", name, why, "write to the database again")
        return True

    def outer(self, node: ast.expr) -> bool:
        """``node`` is (part of) an object that existed before the cell, and not a module."""
        root = chain_root(node, calls=False)
        return root is not None and bool(self.origin(root)) and not self.is_module(node)

    def before_of(self, node: ast.expr) -> str:
        return self.before(chain_root(node, calls=False) or "", shown(node))

    def step(self, c: ast.Call, recv: ast.expr, partial: bool) -> None:
        x = shown(recv)
        low = x.lower()
        if "sched" in low or "lr" in low:
            did, again = "advances the learning-rate schedule", "advance the schedule again"
        elif any(w in low for w in ("opt", "scaler", "sgd", "adam")):
            did, again = "updates the weights", "update the weights again"
        else:
            did, again = f"steps `{x}`", f"step `{x}` again"
        why = did + (PARTLY if partial else "") + ": a re-run does it again"
        self.add(c, "optimizer_step", x, why, again)

    def writes(self, c: ast.Call, recv: ast.expr | None, attr: str, dotted: str) -> bool:
        if recv is None:
            return False
        if attr in SAVES or (dotted.startswith("shutil.") and attr not in SHUTIL_READS):
            return True
        if EXPORTS.match(attr) or attr == "dump":
            return len(c.args) + len(c.keywords) >= (2 if attr == "dump" else 1)
        if dotted.startswith("os.") and attr in OS_WRITES:
            return not any(k.arg == "exist_ok" for k in c.keywords)
        if attr == "mkdir":
            return not any(k.arg == "exist_ok" for k in c.keywords)
        if attr in ("write", "writelines"):
            root = chain_root(recv, calls=False)
            return root is not None and bool(self.origin(root)) and _dotted(recv) not in (
                "sys.stdout", "sys.stderr")  # fmt: skip
        return False

    def opens(self, c: ast.Call, mode: ast.expr | None, *, strict: bool) -> None:
        if isinstance(mode, ast.Constant) and isinstance(mode.value, str):
            m = mode.value
            if not OPEN_MODE.match(m) or not set(m) & set("wax+"):
                return
        elif mode is None or strict:
            return
        else:
            m = "?"
        path = shown(c.args[0]) if c.args else "a file"
        if "a" in m:
            why, again = f"appends to {path}: a re-run appends again", f"append to {path} again"
        elif "x" in m:
            why, again = (
                f"creates {path}: a re-run fails, it exists",
                f"fail to create {path} again",
            )
        else:
            why, again = f"writes {path} (mode {shown(mode)})", f"write {path} again"
        self.add(c, "file_write", shown(c), why, again)

    def mutation(self, c: ast.Call, target: ast.expr, attr: str) -> None:
        root = chain_root(target, calls=False)
        if root is None or not self.origin(root) or self.is_module(target):
            return
        name = shown(target)
        before = self.before(root, name)
        if attr in ADDS:
            why = f"appends to `{name}`, {before}: a re-run appends again"
            self.add(c, "append", name, why, f"append to `{name}` again")
        elif attr in CHANGES:
            verb = CHANGES[attr]
            why = f"{third(verb)} `{name}`, {before}: a re-run does it again"
            self.add(c, "mutate_global", name, why, f"{verb} `{name}` again")
        else:
            why = f"changes `{name}` in place ({attr}), {before}: a re-run changes it again"
            self.add(c, "mutate_global", name, why, f"change `{name}` in place again")


def fresh_root(node: ast.expr, walker: CallReader) -> bool:
    root = chain_root(node, calls=True)
    return root is not None and root in walker.st.fresh

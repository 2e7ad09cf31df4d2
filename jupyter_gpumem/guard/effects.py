"""What one call does to the objects that existed before the cell: the names the walk tracks
(fresh, deleted, aliases, what each was made from or holds), and each call judged against the
vocabulary: a step, a backward, a write, a mutation, an iterator advanced, a thread started,
SQL, ``exec``. The statements around the calls are ``walk``'s; what the walk knows at a point,
``state``'s; how the notebook's objects are read without running them, ``calls``'."""

from __future__ import annotations

import ast
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from jupyter_gpumem.cells.source import dotted as _dotted
from jupyter_gpumem.guard import calls
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
    LOG_LEVELS,
    MODULES,
    OPEN_MODE,
    OS_WRITES,
    PARTLY,
    RUN_CELL,
    RUN_IN_NAMESPACE,
    SAVES,
    SHELL,
    SHUTIL_READS,
    SQL_CALLS,
    SQL_READS,
    SQL_WRITES,
    STATE_KW,
    STD_STREAMS,
    THREAD_CALLS,
    WRAPPERS,
    arg_of,
    chain_root,
    has_grad,
    mutates,
    pure,
    shown,
    sql_verb,
    sql_writes,
    takes_from_queue,
)


@dataclass(frozen=True)
class Site:
    """A call as the judges read it: ``recv.attr(...)`` or ``attr(...)``."""

    call: ast.Call
    recv: ast.expr | None  # ``opt`` in ``opt.step()``; None for ``f(x)``
    attr: str  # ``step``; ``f``
    dotted: str  # ``torch.save``: the callee as a dotted name, "" when it is not one
    plain: bool  # a function, not a method: ``f(x)`` or ``module.f(x)``
    first: ast.expr | None  # the first positional argument


class CallReader:
    """What the walk knows of names, and the effects of the calls it meets (``walk.Walker``
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
        # which branch of an `if` ran (``branch``): the body walked, the finished loops around
        # the walk's point (their first lines), the lines IPython syntax rewrote, and the values
        # the counters of the loop around the failing line took in the passes that ran
        self.root: list[ast.stmt] = []
        self.loops: list[int] = []
        self.ipython: frozenset[int] = frozenset()
        self.passes: list[dict[str, Any]] | None = None
        self.here: tuple[list[ast.stmt], int] = ([], 0)  # the statement walked: its block, index
        # the locals of a function defined in the code walked and read where it is called: not
        # the notebook's names, whatever the values at the failure hold under the same name
        self.own: frozenset[str] = frozenset()
        # the plain values of this function's own names at the failure, when it is on the failing
        # path and the record has them; None: unknown
        self.local_values: Mapping[str, Any] | None = None

    # ---- names

    def is_outer(self, name: str) -> bool:
        return name in self.pre and name not in self.st.fresh and name not in self.st.gone

    def origin(self, name: str) -> str | None:
        """The pre-existing name whose object ``name`` is, if any."""
        return name if self.is_outer(name) else self.st.alias.get(name)

    def reached(self, node: ast.expr) -> str | None:
        """The pre-existing object ``node`` is or is part of: through its root's name, or an item
        of a container the cell made around pre-existing objects (``bufs = [history]``,
        ``bufs[0]``), an attribute of a module from the notebook's own directory (the import
        system keeps it: a re-run finds what the failed run left); None when it is the cell's own
        or a library's module."""
        root = chain_root(node, calls=False)
        if root is None:
            return None
        if self.is_module(node):  # a library's settings, but a module of the notebook's own
            own = not isinstance(node, ast.Name) and calls.own_module(self.lookup(root))
            return root if own else None
        origin = self.origin(root)
        if origin is None and root in self.st.holds and not isinstance(node, ast.Name):
            origin = self.st.holds[root]
        return origin

    def outer(self, node: ast.expr) -> bool:
        """``node`` is (part of) an object that existed before the cell, and not a module."""
        return self.reached(node) is not None

    def is_module(self, node: ast.expr) -> bool:
        root = chain_root(node, calls=False)
        if root is None:
            return False
        if root in self.modules or (root in MODULES and root not in self.st.fresh):
            return True
        return root not in self.st.fresh and issubclass(type(self.lookup(root)), ModuleType)

    def lookup(self, name: str) -> Any:
        """The object ``name`` holds, from the namespace or the caller; MISSING if unknown."""
        if self.reach is None:
            return MISSING
        if name in self.own or (self.fn is not None and name in self.fn.local | self.fn.free):
            return self.values.get(name, MISSING)
        return self.reach.namespace.get(name, MISSING)

    def existing(self, node: ast.expr) -> Any:
        """The object a plain name that existed before the cell holds; MISSING otherwise."""
        if isinstance(node, ast.Name) and self.is_outer(node.id):
            return self.lookup(node.id)
        return MISSING

    def global_view(self) -> frozenset[str]:
        """The globals that existed before the cell and still hold the same object here."""
        if self.fn is None:
            return frozenset(n for n in self.pre if self.is_outer(n))
        return frozenset(n for n in self.gpre if n not in self.fn.declared or self.is_outer(n))

    def before(self, node: ast.expr) -> str:
        name = shown(node)
        origin = self.reached(node) or chain_root(node, calls=False) or name
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

    def changed(self, c: ast.AST, node: ast.expr, kind: str, verb: str) -> None:
        """``verb`` done to ``node``, part of an object from before the cell: a re-run does it
        again."""
        name = shown(node)
        why = f"{third(verb)} `{name}`, {self.before(node)}: a re-run does it again"
        self.add(c, kind, name, why, f"{verb} `{name}` again")

    def enter(self, c: ast.Call, frames: tuple[tuple[str, int], ...]) -> bool:
        """A call of a notebook function, read as this line's effects: ``walk``'s."""
        return False

    # ---- calls

    def call(self, c: ast.Call, *, partial: bool = False) -> None:
        """The effects of one call on what existed before the cell. ``partial``: the failing
        statement's call, which may have run part way (a step, a backward); nothing else of it
        happened."""
        c = self.unalias(c)
        local = isinstance(c.func, ast.Name) and c.func.id in self.st.defs
        if (self.reach is not None or local) and not partial and self.enter(c, ()):
            return  # its body was read: what its name suggests does not matter
        f = c.func
        recv = f.value if isinstance(f, ast.Attribute) else None
        attr = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        plain = recv is None or (self.is_module(recv) and self.reached(recv) is None)
        site = Site(c, recv, attr, _dotted(f) or "", plain, c.args[0] if c.args else None)
        if self.training(site, partial) or partial:
            return
        self.out_arg(c)
        judges = (self.takes, self.runs, self.sql, self.writes, self.mutation)
        any(judge(site) for judge in judges)

    def unalias(self, c: ast.Call) -> ast.Call:
        """``add(1)`` where ``add = L.append`` (in the cell, or before it: a bound method) is
        ``L.append(1)``."""
        f = c.func
        if not isinstance(f, ast.Name):
            return c
        method: ast.expr | None = self.st.methods.get(f.id)
        if method is None and self.reach is not None and self.is_outer(f.id):
            obj = self.lookup(f.id)
            method = calls.bound_method(obj, f.id, self.owner_name, self.reach.namespace)
        if method is None:
            return c
        return ast.copy_location(ast.Call(func=method, args=c.args, keywords=c.keywords), c)

    def owner_name(self, obj: Any) -> str | None:
        """The name of the notebook that holds ``obj`` and existed before the cell."""
        if self.reach is None:
            return None
        return calls.name_of(obj, self.reach.namespace, self.global_view())

    def training(self, s: Site, partial: bool) -> bool:
        """``zero_grad``, a step, a backward: True when the call was one of them."""
        recv, attr = s.recv, s.attr
        if attr == "zero_grad" or (attr == "zero_" and recv is not None and has_grad(recv)):
            self.st.zeroed = True
        elif attr == "step" and recv is not None:
            if self.state_reads(s.call) or not fresh_root(recv, self):
                self.step(s.call, recv, partial)
        elif attr == "backward" and recv is not None:
            if not self.st.zeroed and self.state_reads(s.call):
                self.backward(s, partial)
        else:
            return False
        return True

    def backward(self, s: Site, partial: bool) -> None:
        name = shown(s.recv)
        if partial:
            why = (
                "ran out of memory part way, leaving part of the failed batch's gradients in "
                "`.grad`, with no `zero_grad()` before it: a re-run adds its own to them"
            )
        else:
            why = (
                "adds to the gradients in `.grad`, with no `zero_grad()` before it: they stay "
                "there, and a re-run adds its own to them"
            )
        left = "the failed backward left" if partial else "left"
        self.add(s.call, "backward", name, why, f"add its gradients to those {left} in `.grad`")

    def step(self, c: ast.Call, recv: ast.expr, partial: bool) -> None:
        if partial and self.closure_failed(c, recv):
            return  # it ran out of memory in its closure, before it changed any weight
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

    def closure_failed(self, c: ast.Call, recv: ast.expr) -> bool:
        """The failing ``opt.step(closure)`` ran out of memory inside its closure (the failure
        went through the notebook function it was given, by the failure record's frames) while
        ``opt`` had changed no weight yet (``calls.closure_runs_first``): the step did not
        happen. Read from what ran, not from what a step could do."""
        given = arg_of(c, 0, "closure")
        if given is None or not self.frames:
            return False
        if isinstance(given, ast.Lambda):
            name = "<lambda>"
        elif isinstance(given, (ast.Name, ast.Attribute)):
            name = given.id if isinstance(given, ast.Name) else given.attr
        else:
            return False
        if self.frames[0][0].rpartition(".")[2] != name:
            return False
        root = chain_root(recv, calls=False)
        opt = self.lookup(root) if isinstance(recv, ast.Name) and root is not None else MISSING
        return calls.closure_runs_first(opt)

    def out_arg(self, c: ast.Call) -> None:
        """``torch.add(a, b, out=x)``: ``x`` changed in place, whatever the call is otherwise."""
        out = next((k.value for k in c.keywords if k.arg == "out"), None)
        if out is not None and self.outer(out):
            self.in_place(c, out, "out=")

    # ---- the judges: each True when the call was its kind

    def takes(self, s: Site) -> bool:
        """``next(it)``, heaps, queues: something taken from or put into a pre-existing object."""
        c, recv, attr, first = s.call, s.recv, s.attr, s.first
        if (attr == "next" and recv is None and first) or (attr == "__next__" and not s.plain):
            it = first if attr == "next" else recv
            if it is not None and self.outer(it):
                self.advanced(c, it)
        elif attr in HEAPQ and first is not None and (recv is None or s.dotted == f"heapq.{attr}"):
            if self.outer(first):
                verb = "push onto" if "push" in attr else "pop from" if "pop" in attr else "reorder"
                self.changed(c, first, "append" if "push" in attr else "mutate_global", verb)
        elif recv is not None and not s.plain and takes_from_queue(c, attr):
            if self.outer(recv):
                verb = "put into" if attr.startswith("put") else "take from"
                self.changed(c, recv, "queue", verb)
        else:
            return False
        return True

    def advanced(self, c: ast.AST, it: ast.expr, *, loop: bool = False) -> None:
        name = shown(it)
        how = f"takes items from `{name}` in a `for` loop" if loop else f"advances `{name}`"
        why = f"{how}, {self.before(it)}: a re-run skips what it took"
        self.add(c, "iterator", name, why, f"advance `{name}` again, skipping what it took")

    def iterates(self, s: ast.For | ast.AsyncFor) -> None:
        """``for x in it:`` over an iterator made before the cell (a generator, ``iter(...)``, an
        open file), not over something iterable again (a list, a DataLoader): each pass takes
        from it. Known only from the namespace."""
        for node in iterated(s.iter):
            obj = self.existing(node)
            if obj is not MISSING and calls.is_iterator(obj):
                self.advanced(s, node, loop=True)

    def runs(self, s: Site) -> bool:
        """Code whose effects cannot be read: ``exec``, ``run_cell``, ``%run -i``, a thread."""
        c, recv, attr = s.call, s.recv, s.attr
        if attr == RUN_IN_NAMESPACE and recv is None:
            script = s.first.value if isinstance(s.first, ast.Constant) else None
            script = script if isinstance(script, str) else "a script"
            what = f"`{script}`"
            why = (
                f"runs {what} in the notebook's namespace (`%run -i`), whose effects cannot be "
                "read: a re-run runs it again"
            )
            self.add(c, "exec", what, why, f"run {what} in the notebook's namespace again")
        elif (recv is not None and is_globals(recv) and mutates(attr)) or (
            recv is None and attr in ("exec", "eval") and s.first is not None and not pure(s.first)
        ):
            self.unreadable(c, shown(c) if attr not in ("exec", "eval") else attr)
        elif recv is not None and not s.plain and attr in RUN_CELL:
            self.unreadable(c, shown(c))
        elif self.starts_thread(s):
            name = shown(c)
            why = (
                f"starts a thread with `{name}`, which runs beside the cell and may still be "
                "running: a re-run starts another"
            )
            self.add(c, "thread", name, why, "start another thread beside the first")
        else:
            return False
        return True

    def unreadable(self, c: ast.Call, name: str) -> None:
        why = f"runs `{shown(c)}`, whose effects cannot be read: a re-run runs it again"
        self.add(c, "exec", name, why, f"run `{shown(c)}` again")

    def starts_thread(self, s: Site) -> bool:
        """``t.start()`` of a thread or process, ``Thread(...).start()``, ``pool.submit(f)``."""
        recv = s.recv
        if s.dotted in THREAD_CALLS:
            return True
        if recv is None or s.plain:
            return False
        if s.attr == "start":
            if isinstance(recv, ast.Name) and recv.id in self.st.threads:
                return True
            if isinstance(recv, ast.Call) and self.makes_thread(recv):
                return True
            return calls.is_thread(self.existing(recv))
        if s.attr in ("submit", "apply_async", "map_async", "starmap_async"):
            return calls.is_executor(self.existing(recv))
        return False

    def makes_thread(self, value: ast.expr) -> bool:
        """``threading.Thread(...)``, ``Process(...)``, ``Timer(...)``, a notebook subclass."""
        if not isinstance(value, ast.Call):
            return False
        name = _dotted(value.func) or ""
        if name.rpartition(".")[2] in ("Thread", "Process", "Timer"):
            return True
        return isinstance(value.func, ast.Name) and calls.is_thread_class(
            self.lookup(value.func.id)
        )

    def sql(self, s: Site) -> bool:
        """``db.execute("INSERT ...")``, ``conn.commit()``: True when it may write to a database."""
        c, recv = s.call, s.recv
        if recv is None or s.plain or s.attr not in SQL_CALLS:
            return False
        name = shown(c)
        if s.attr == "commit":
            if not self.outer(recv) and not self.state_reads(recv):
                return False
            why = f"commits with `{name}`: a re-run commits what it writes again"
            self.add(c, "database", name, why, "commit to the database again")
            return True
        if s.first is None:
            return False
        verb = sql_verb(s.first)
        known = verb in SQL_WRITES or (verb == "WITH" and sql_writes(s.first))
        if verb in SQL_READS and not known:
            return False
        if not known and s.attr == "execute" and not DB_NAME.search(shown(recv).lower()):
            return False
        what = "writes to the database" if known else "runs SQL that may write to the database"
        why = f"{what} with `{name}`: a re-run does it again"
        self.add(c, "database", name, why, "write to the database again")
        return True

    def writes(self, s: Site) -> bool:
        """Files, shell commands, services: what leaves the kernel."""
        c, recv, attr = s.call, s.recv, s.attr
        if attr == SHELL:
            why = "runs a shell command: a re-run runs it again"
            self.add(c, "io_call", "shell command", why, "run the shell command again")
        elif attr == "open":
            self.opens(c, arg_of(c, 1 if s.plain else 0, "mode"), strict=not s.plain)
        elif attr == "print" and recv is None:
            dest = next((k.value for k in c.keywords if k.arg == "file"), None)
            if dest is None or not self.outer(dest) or _dotted(dest) in STD_STREAMS:
                return False
            name = shown(dest)
            why = f"writes to `{name}`, {self.before(dest)}: a re-run writes again"
            self.add(c, "file_write", name, why, f"write to `{name}` again")
        elif s.dotted in IO_CALLS or (recv is not None and attr in IO_METHODS):
            name = shown(c)
            self.add(c, "io_call", name, f"calls `{name}`: a re-run does it again", f"call `{name}` again")  # fmt: skip
        elif self.file_call(s):
            name = shown(c)
            why = f"writes with `{name}`: a re-run writes again"
            self.add(c, "file_write", name, why, f"run `{name}` again")
        elif attr in LOG_LEVELS and recv is not None:
            return self.logs(s)
        else:
            return False
        return True

    def file_call(self, s: Site) -> bool:
        c, recv, attr, dotted = s.call, s.recv, s.attr, s.dotted
        if recv is None:
            return False
        if attr in SAVES or (dotted.startswith("shutil.") and attr not in SHUTIL_READS):
            return True
        if EXPORTS.match(attr) or attr == "dump":
            return len(c.args) + len(c.keywords) >= (2 if attr == "dump" else 1)
        if (dotted.startswith("os.") and attr in OS_WRITES) or attr == "mkdir":
            return not any(k.arg == "exist_ok" for k in c.keywords)
        if attr in ("write", "writelines"):
            return self.outer(recv) and _dotted(recv) not in STD_STREAMS
        return False

    def logs(self, s: Site) -> bool:
        """``logger.info(...)`` on a logger (or ``logging.info``) whose handlers write to a file."""
        recv = s.recv
        if recv is None:
            return False
        if _dotted(recv) == "logging":
            obj: Any = calls.root_logger()
        else:
            root = chain_root(recv, calls=False)
            obj = self.lookup(root) if isinstance(recv, ast.Name) and root else MISSING
        where = calls.logger_writes_to(obj, LOG_LEVELS[s.attr])
        if where is None:
            return False
        name = shown(s.call)
        why = f"writes to {where} through logging: a re-run writes again"
        self.add(s.call, "file_write", name, why, f"write to {where} again")
        return True

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
            why, again = f"creates {path}: a re-run fails, it exists", f"fail to create {path} again"  # fmt: skip
        else:
            why, again = f"writes {path} (mode {shown(mode)})", f"write {path} again"
        self.add(c, "file_write", shown(c), why, again)

    def mutation(self, s: Site) -> bool:
        """A method that changes its receiver, or the function form (``nn.init.zeros_(w)``,
        ``random.shuffle(xs)``), whose first argument changes."""
        attr = s.attr
        if attr in ("setattr", "delattr") and s.recv is None and s.first is not None:
            return self.sets(s)
        if s.plain:
            inplace = INPLACE.match(attr) and not attr.startswith("clip_grad")
            target = s.first if inplace or attr == "shuffle" else None
        else:
            target = s.recv if mutates(attr) else None
        if target is None or has_grad(target) or not self.outer(target):
            return False
        if attr in ADDS:
            name = shown(target)
            why = f"appends to `{name}`, {self.before(target)}: a re-run appends again"
            self.add(s.call, "append", name, why, f"append to `{name}` again")
        elif attr in CHANGES:
            self.changed(s.call, target, "mutate_global", CHANGES[attr])
        else:
            self.in_place(s.call, target, attr)
        return True

    def sets(self, s: Site) -> bool:
        """``setattr(cfg, 'lr', v)``, ``delattr(model, name)``: as ``cfg.lr = v``, ``del ...``."""
        c, first = s.call, s.first
        origin = self.reached(first) if first is not None else None
        if first is None or origin is None:
            return False
        value = c.args[2] if s.attr == "setattr" and len(c.args) > 2 else None
        if value is not None and origin not in self.state_reads(value):
            return True  # set again to the same value
        key = c.args[1] if len(c.args) > 1 else None
        name = shown(first)
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            name += f".{key.value}"
        verb = "set" if s.attr == "setattr" else "delete"
        why = f"{third(verb)} `{name}`, {self.before(first)}: a re-run does it again"
        self.add(c, "mutate_global", name, why, f"{verb} `{name}` again")
        return True

    def in_place(self, c: ast.Call, target: ast.expr, how: str) -> None:
        name = shown(target)
        why = f"changes `{name}` in place ({how}), {self.before(target)}: a re-run changes it again"
        self.add(c, "mutate_global", name, why, f"change `{name}` in place again")


def iterated(node: ast.expr) -> list[ast.expr]:
    """What a ``for`` header takes items from: ``it`` in ``enumerate(it)``, ``zip(a, b)``,
    ``tqdm(it)``, ``islice(it, n)``."""
    if isinstance(node, ast.Call):
        name = (_dotted(node.func) or "").rpartition(".")[2]
        if name in WRAPPERS:
            skip = WRAPPERS[name]
            return [x for a in node.args[skip:] for x in iterated(a)]
    return [node]


def fresh_root(node: ast.expr, walker: CallReader) -> bool:
    root = chain_root(node, calls=True)
    return root is not None and root in walker.st.fresh

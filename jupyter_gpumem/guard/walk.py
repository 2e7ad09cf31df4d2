"""The walk over a cell (or a notebook function it calls) in execution order, up to the failing
line: which statements ran, what each binds, how many passes of the loops around the failing line
ran, and the calls into notebook code it follows."""

from __future__ import annotations

import ast

from jupyter_gpumem.guard import branch, calls
from jupyter_gpumem.guard.calls import MISSING, Callee, is_globals
from jupyter_gpumem.guard.effects import CallReader
from jupyter_gpumem.guard.state import DEPTH, WALKS, State
from jupyter_gpumem.guard.verdict import quoted, third
from jupyter_gpumem.guard.words import (
    AUG_VERBS,
    MODULES,
    chain_root,
    has_grad,
    reads_name,
    same_object,
    shown,
)

# `try: ... except* ...` (ast.TryStar) exists from Python 3.11; on 3.10 only ast.Try
TRY_NODES: tuple[type[ast.stmt], ...] = tuple(
    t for t in (ast.Try, getattr(ast, "TryStar", None)) if t is not None
)
LOOPS = (ast.For, ast.AsyncFor, ast.While)
WITHS = (ast.With, ast.AsyncWith)
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
DISPLAYS = (ast.List, ast.Tuple, ast.Set, ast.Dict)


class Walker(CallReader):
    """Walks the cell (or a notebook function it calls) in execution order, up to the failing
    line, collecting effects."""

    # ---- statements

    def block(self, body: list[ast.stmt]) -> bool:
        """Walk statements in order; True once the failing statement was reached."""
        for i, s in enumerate(body):
            nxt = body[i + 1] if i + 1 < len(body) else None
            lim = self.limit
            end = s.end_lineno or s.lineno
            self.here = (body, i)
            if self.full or lim is None or end < lim or (nxt is not None and nxt.lineno <= lim):
                self.stmt(s, failing=False)
            elif s.lineno > lim or self.stmt(s, failing=True):
                return True
        return False

    def stmt(self, s: ast.stmt, *, failing: bool) -> bool:
        """One statement; ``failing``: it holds the failing line. True when the walk stops here."""
        lim = self.limit or 0
        if isinstance(s, LOOPS):
            return self.loop(s, lim, failing=failing)
        if isinstance(s, ast.If):
            return self.if_(s, lim, failing=failing)
        if isinstance(s, WITHS):
            return self.with_(s, lim, failing=failing)
        if isinstance(s, TRY_NODES):
            return self.try_(s, lim if failing else None)  # type: ignore[arg-type]
        if isinstance(s, ast.Match):
            return self.match(s, lim, failing=failing)
        if isinstance(s, DEFS):
            return self.define(s, failing=failing)
        if failing:
            self.failing(s)
            return True
        self.simple(s)
        return False

    def if_(self, s: ast.If, lim: int, *, failing: bool) -> bool:
        if failing and lim < s.body[0].lineno:
            return True  # the test itself failed
        self.scan(s.test)
        if failing:
            in_else = bool(s.orelse) and lim >= s.orelse[0].lineno
            return self.block(s.orelse if in_else else s.body)
        ran = branch.taken(self, s)  # the branch the values at the failure say ran; None: either
        self.branches([s.body, s.orelse] if ran is None else [s.body if ran else s.orelse])
        return False

    def with_(self, s: ast.With | ast.AsyncWith, lim: int, *, failing: bool) -> bool:
        if failing and lim < s.body[0].lineno:
            return True  # entering failed: the body never ran
        for item in s.items:
            self.scan(item.context_expr)
            if item.optional_vars is not None:
                self.bind(item.optional_vars, item.context_expr)
        return self.block(s.body) and failing

    def match(self, s: ast.Match, lim: int, *, failing: bool) -> bool:
        if failing and lim < s.cases[0].pattern.lineno:
            return True
        self.scan(s.subject)
        if failing:
            case = [c for c in s.cases if c.pattern.lineno <= lim][-1]
            return self.block(case.body)
        self.branches([c.body for c in s.cases] + [[]])
        return False

    def define(
        self, s: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef, *, failing: bool
    ) -> bool:
        for d in s.decorator_list:
            self.scan(d)
        self.bind_name(s.name, None)
        if not isinstance(s, ast.ClassDef) and not s.decorator_list:
            self.st.defs[s.name] = s  # read where it is called
        if failing:
            self.limit = None  # failed inside a body: where it was called from is unknown
        return False

    def loop(self, s: ast.For | ast.AsyncFor | ast.While, lim: int, *, failing: bool) -> bool:
        """A ``for`` or ``while``; ``failing``: it holds the failing line. Around that line every
        line of the body may have run in an earlier pass (``full``), unless the failing pass is the
        first, where only the lines before the failing one ran: the passes are counted from the
        values at the failure where they tell (``branch.passes_before``), else ``earlier`` says.
        True when the walk stops here."""
        in_else = failing and bool(s.orelse) and lim >= s.orelse[0].lineno
        around = failing and not in_else
        counted = branch.passes_before(self, s) if around else None
        if around and counted is not None:
            first = counted.passes == 0
        else:
            first = around and not self.earlier  # the first pass: only the lines before it ran
        if first and lim < s.body[0].lineno:
            return True  # the header failed before the first pass
        around = around and not first
        self.full += around
        self.in_loop |= around
        saved = self.passes
        if around and counted is not None and self.full == 1:
            self.passes = counted.values  # the counter's values in the passes that ran
        self.header(s)
        finished = [] if first else [s.lineno]  # its lines may have run after any of them
        self.loops += finished
        if not first:
            self.st.zeroed |= branch.zeroes_in(self, s.body)  # earlier passes may have zeroed
        self.block(s.body)
        del self.loops[len(self.loops) - len(finished) :]
        self.passes = saved
        if first:
            return True
        self.full -= around
        return around or self.block(s.orelse)

    def header(self, s: ast.For | ast.AsyncFor | ast.While) -> None:
        if isinstance(s, ast.While):
            self.scan(s.test)
            return
        self.scan(s.iter)
        self.iterates(s)
        self.bind(s.target, s.iter, iterates=True)

    def branches(self, blocks: list[list[ast.stmt]]) -> None:
        start, ends = self.st, []
        for b in blocks:
            self.st = start.copy()
            self.block(b)
            ends.append(self.st)
        self.st = State.merge(ends)

    def try_(self, s: ast.Try, lim: int | None) -> bool:  # or ast.TryStar (3.11+)
        starts = [("body", s.lineno)] + [(f"h{i}", h.lineno) for i, h in enumerate(s.handlers)]
        starts += [("else", s.orelse[0].lineno)] if s.orelse else []
        starts += [("finally", s.finalbody[0].lineno)] if s.finalbody else []
        where = "" if lim is None else [k for k, line in starts if line <= lim][-1]
        if where == "body":
            return self.block(s.body)
        if where.startswith("h"):
            self.block(s.body)
            return self.handler(s.handlers[int(where[1:])])
        if where == "else":
            self.block(s.body)
            return self.block(s.orelse)
        start = self.st.copy()
        self.block(s.body)
        self.block(s.orelse)
        ends = [self.st]
        for h in s.handlers:
            self.st = start.copy()
            self.handler(h)
            ends.append(self.st)
        self.st = State.merge(ends)
        return self.block(s.finalbody) and lim is not None

    def handler(self, h: ast.ExceptHandler) -> bool:
        if h.name:
            self.bind_name(h.name, None)
        return self.block(h.body)

    def failing(self, s: ast.stmt) -> None:
        """The statement that raised: its effect came after the raise, unless it is the call."""
        read = set()
        if self.reach is not None or self.st.defs:  # a function it called may have run part way
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
        verb = AUG_VERBS.get(type(s.op), "update")
        if isinstance(t, ast.Name):
            if self.is_outer(t.id):
                why = (
                    f"{third(verb)} `{t.id}`, which existed before the cell: a re-run does it again"
                )
                self.add(s, "augassign_global", t.id, why, f"{verb} `{t.id}` again")
            return
        if isinstance(t, ast.Subscript) and is_globals(t.value):
            return self.store(t, verb)
        if self.outer(t):
            self.changed(s, t, "augassign_global", verb)

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
            self.st.forget(t.id)
        else:
            self.store(t, "delete")

    def store(self, t: ast.expr, verb: str = "set", value: ast.expr | None = None) -> None:
        """``obj.attr = v`` / ``d[k] = v`` (or ``del``) on an object that existed before the cell.

        Setting it to a ``value`` made without that object sets it to the same thing again
        (nanoGPT's ``param_group['lr'] = lr``): only a value made from the object itself counts
        (``cfg.n = cfg.n + 1``)."""
        if isinstance(t, ast.Subscript) and is_globals(t.value):  # globals()[name] = v
            name = shown(t)
            why = f"{third(verb)} `{name}`, a global of the notebook: a re-run does it again"
            self.add(t, "mutate_global", name, why, f"{verb} `{name}` again")
            return
        if not isinstance(t, (ast.Attribute, ast.Subscript)) or has_grad(t):
            return
        origin = self.reached(t.value)
        if origin is None:
            return
        if value is not None and origin not in self.state_reads(value):
            return  # set again to the same value
        self.changed(t, t, "mutate_global", verb)

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
            self.store(t, value=None if iterates else value)

    def bind_name(
        self,
        name: str,
        value: ast.expr | None,
        *,
        iterates: bool = False,
        node: ast.AST | None = None,
    ) -> None:
        if value is not None and self.is_outer(name) and reads_name(value, name):
            if not same_object(value, name):
                why = f"rebinds `{name}` from its own value: a re-run applies it twice"
                again = f"rebind `{name}` from its own value again"
                self.add(node or value, "global_rebind", name, why, again)
            return  # still the pre-existing object, or made from it
        held = self.held(value, iterates=iterates)
        if iterates and held is not None:  # for h in (train_log, val_log): h is each of them
            origin: str | None = held
            held = None
        else:
            root = chain_root(value, calls=iterates) if value is not None else None
            origin = self.origin(root) if root is not None and root not in MODULES else None
        deps = self.state_reads(value) if value is not None else frozenset()
        self.st.fresh.add(name)
        self.st.gone.discard(name)
        self.st.forget(name)
        if origin:
            self.st.alias[name] = origin
        if held:
            self.st.holds[name] = held
        if origin and isinstance(value, ast.Attribute):
            self.st.methods[name] = value  # a bound method: calling the name calls it
        if value is not None and self.makes_thread(value):
            self.st.threads.add(name)
        self.st.deps[name] = deps

    def held(self, value: ast.expr | None, *, iterates: bool) -> str | None:
        """The first pre-existing object a container display the cell makes holds
        (``[train_log, val_log]``, ``{'train': history}``); None for anything else."""
        if iterates and isinstance(value, ast.Call):
            value = next(iter(reversed(value.args)), None)  # enumerate([a, b]), zip(...)
        if not isinstance(value, DISPLAYS):
            return None
        items = value.values if isinstance(value, ast.Dict) else value.elts
        for e in items:
            if e is not None and self.outer(e):
                return self.reached(e)
        return None

    # ---- expressions and calls into notebook code

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

    def enter(self, c: ast.Call, frames: tuple[tuple[str, int], ...]) -> bool:
        """A call of a function defined in the notebook (or in the code walked): its effects, as
        effects of this line. True when the function was read (or is being read, further out)."""
        if isinstance(c.func, ast.Name) and c.func.id in self.st.defs:
            return self.inline(c, self.st.defs[c.func.id], frames)
        reach = self.reach
        if reach is None or self.depth >= DEPTH or reach.walks >= WALKS:
            return False
        try:
            callee = calls.notebook_callee(c.func, reach.namespace, self.lookup, reach.cache)
            if callee is None or callee.fn.key in self.active:
                return callee is not None
            inner = self.inner_walker(c, callee, frames)
            inner.block(callee.fn.node.body)
        except Exception:  # a function we cannot read is a call we do not look into
            return False
        self.absorb(c, inner, callee.fn.qualname, callee.fn.file_line)
        return True

    def inner_walker(
        self, c: ast.Call, callee: Callee, frames: tuple[tuple[str, int], ...]
    ) -> Walker:
        fn = callee.fn
        assert self.reach is not None
        self.reach.walks += 1
        limit: int | None = None
        below: tuple[tuple[str, int], ...] = ()
        here = None
        if frames and frames[0][0] == fn.qualname:  # where it stopped, when it failed in it
            limit, below, here = fn.node_line(frames[0][1]), frames[1:], frames[0]
        pre = self.global_view()
        # a closure made before the cell: what its cells hold existed before the cell too
        cells = callee.closure if self.outer(c.func) else {}
        inner = Walker(fn.lines, (pre - fn.local) | set(cells), limit, self.earlier)
        inner.reach, inner.fn, inner.gpre, inner.frames = self.reach, fn, pre, below
        inner.depth, inner.active = self.depth + 1, self.active | {fn.key}
        inner.st.zeroed, inner.root = self.st.zeroed, fn.node.body
        inner.values.update(cells)
        if here is not None and limit is not None:
            inner.local_values = self.reach.frame_values.get(here)
        self.pass_args(c, callee, inner)
        return inner

    def inline(
        self,
        c: ast.Call,
        node: ast.FunctionDef | ast.AsyncFunctionDef,
        frames: tuple[tuple[str, int], ...],
    ) -> bool:
        """A function defined in the code walked (``def get(): return next(it)``), read where it
        is called, with the names it sees there."""
        if self.depth >= DEPTH or id(node) in self.active:
            return True
        limit: int | None = None
        here = None
        if frames and frames[0][0].rpartition(".")[2] == node.name:
            limit, frames, here = frames[0][1], frames[1:], frames[0]
        inner = Walker(self.lines, self.pre, limit, self.earlier)
        if here is not None and self.reach is not None:
            inner.local_values = self.reach.frame_values.get(here)
        inner.reach, inner.fn, inner.gpre, inner.frames = self.reach, self.fn, self.gpre, frames
        inner.values, inner.modules = self.values, self.modules
        inner.own = self.own | calls.locals_of(node)
        inner.depth, inner.active = self.depth + 1, self.active | {id(node)}
        inner.st, inner.root = self.st.copy(), node.body
        a = node.args
        params = [*a.posonlyargs, *a.args]
        for p, expr in zip(params, c.args, strict=False):
            inner.bind_name(p.arg, expr if not isinstance(expr, ast.Starred) else None)
        given = {p.arg for p in params[: len(c.args)]}
        for p in [*params, *a.kwonlyargs, *(x for x in (a.vararg, a.kwarg) if x is not None)]:
            kw = next((k.value for k in c.keywords if k.arg == p.arg), None)
            if kw is not None or p.arg not in given:
                inner.bind_name(p.arg, kw)
        inner.block(node.body)
        self.st.zeroed |= inner.st.zeroed
        self.absorb(c, inner, node.name, lambda n: n)
        return True

    def absorb(self, c: ast.Call, inner: Walker, qualname: str, line: object) -> None:
        """The effects of a function read at a call, said as effects of the calling line."""
        self.st.zeroed |= inner.st.zeroed
        at = line if callable(line) else (lambda n: n)
        for e in inner.effects:
            where = f"`{qualname}`, whose line {at(e.lineno)} `{quoted(e.text, 40)}`"
            self.add(c, e.kind, e.name, f"calls {where} {e.why}", f"call {where} {third(e.again)}")

    def pass_args(self, c: ast.Call, callee: Callee, inner: Walker) -> None:
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
            origin = self.reached(expr)
            if origin is not None:
                inner.st.alias[name] = origin
            inner.st.deps[name] = self.state_reads(expr)
            if isinstance(expr, ast.Name) and (value := self.lookup(expr.id)) is not MISSING:
                inner.values[name] = value

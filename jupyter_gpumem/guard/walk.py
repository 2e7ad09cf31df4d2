"""The walk over a cell (or a notebook function it calls) in execution order, up to the failing
line: which statements ran, what each binds, and the calls into notebook code it follows."""

from __future__ import annotations

import ast

from jupyter_gpumem.guard import calls
from jupyter_gpumem.guard.branch import taken
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
    zeroes,
)

# `try: ... except* ...` (ast.TryStar) exists from Python 3.11; on 3.10 only ast.Try
TRY_NODES: tuple[type[ast.stmt], ...] = tuple(
    t for t in (ast.Try, getattr(ast, "TryStar", None)) if t is not None
)


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
            if self.full or lim is None or end < lim or (nxt is not None and nxt.lineno <= lim):
                self.stmt(s, failing=False)
            elif s.lineno > lim or self.stmt(s, failing=True):
                return True
        return False

    def stmt(self, s: ast.stmt, *, failing: bool) -> bool:  # noqa: C901 (issue 17: to be split)
        """One statement; ``failing``: it holds the failing line. True when the walk stops here."""
        lim = self.limit or 0
        if isinstance(s, (ast.For, ast.AsyncFor, ast.While)):
            return self.loop(s, lim, failing=failing)
        if isinstance(s, ast.If):
            if failing and lim < s.body[0].lineno:
                return True  # the test itself failed
            self.scan(s.test)
            if failing:
                in_else = bool(s.orelse) and lim >= s.orelse[0].lineno
                return self.block(s.orelse if in_else else s.body)
            ran = taken(self, s)  # the branch the values at the failure say ran; None: either
            self.branches([s.body, s.orelse] if ran is None else [s.body if ran else s.orelse])
        elif isinstance(s, (ast.With, ast.AsyncWith)):
            if failing and lim < s.body[0].lineno:
                return True  # entering failed: the body never ran
            for item in s.items:
                self.scan(item.context_expr)
                if item.optional_vars is not None:
                    self.bind(item.optional_vars, item.context_expr)
            return self.block(s.body) and failing
        elif isinstance(s, TRY_NODES):
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

    def loop(self, s: ast.For | ast.AsyncFor | ast.While, lim: int, *, failing: bool) -> bool:
        """A ``for`` or ``while``; ``failing``: it holds the failing line. Around that line every
        line of the body may have run in an earlier pass (``full``), unless the failing pass is the
        first, where only the lines before the failing one ran. True when the walk stops here."""
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
            self.st.zeroed |= any(zeroes(n) for b in s.body for n in ast.walk(b))
        finished = [] if first else [s.lineno]  # its lines may have run after any of them
        self.loops += finished
        self.block(s.body)
        del self.loops[len(self.loops) - len(finished) :]
        if first:
            return True
        self.full -= around
        return around or self.block(s.orelse)

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
        self.st = State.merge(ends)
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
        root = chain_root(t, calls=False)
        if root is not None and self.origin(root) and not self.is_module(t):
            name = shown(t)
            why = f"{third(verb)} `{name}`, {self.before(root, name)}: a re-run does it again"
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
            name = shown(t)
            why = f"{third(verb)} `{name}`, a global of the notebook: a re-run does it again"
            self.add(t, "mutate_global", name, why, f"{verb} `{name}` again")
            return
        root = chain_root(t, calls=False)
        if root is None or not self.origin(root) or self.is_module(t) or has_grad(t):
            return
        name = shown(t)
        why = f"{third(verb)} `{name}`, {self.before(root, name)}: a re-run does it again"
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
        if value is not None and self.is_outer(name) and reads_name(value, name):
            if not same_object(value, name):
                why = f"rebinds `{name}` from its own value: a re-run applies it twice"
                again = f"rebind `{name}` from its own value again"
                self.add(node or value, "global_rebind", name, why, again)
            return  # still the pre-existing object, or made from it
        root = chain_root(value, calls=iterates) if value is not None else None
        origin = self.origin(root) if root is not None and root not in MODULES else None
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
        """A call of a function defined in the notebook: its effects, as effects of this line.

        True when the function was read (or is being read, one call further out)."""
        reach = self.reach
        if reach is None or self.depth >= DEPTH or reach.walks >= WALKS:
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
            inner = Walker(fn.lines, pre - fn.local, limit, self.earlier)
            inner.reach, inner.fn, inner.gpre, inner.frames = reach, fn, pre, below
            inner.depth, inner.active = self.depth + 1, self.active | {fn.key}
            inner.st.zeroed, inner.root = self.st.zeroed, fn.node.body
            self.pass_args(c, callee, inner)
            inner.block(fn.node.body)
        except Exception:  # a function we cannot read is a call we do not look into
            return False
        self.st.zeroed |= inner.st.zeroed
        for e in inner.effects:
            where = f"`{fn.qualname}`, whose line {fn.file_line(e.lineno)} `{quoted(e.text, 40)}`"
            self.add(c, e.kind, e.name, f"calls {where} {e.why}", f"call {where} {third(e.again)}")
        return True

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
            if self.outer(expr):
                inner.st.alias[name] = self.origin(chain_root(expr, calls=False) or "") or name
            inner.st.deps[name] = self.state_reads(expr)
            if isinstance(expr, ast.Name) and (value := self.lookup(expr.id)) is not MISSING:
                inner.values[name] = value

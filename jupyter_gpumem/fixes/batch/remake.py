"""What earlier cells built from the batch setting, re-made at each batch Reduce batch runs.

The setup cells of pytorch/examples make things from the batch setting that the training cell
only reads: DCGAN's ``fixed_noise = torch.randn(opt.batchSize, nz, 1, 1, device=device)``,
word_language_model's ``train_data = batchify(corpus.train, args.batch_size)``, VAE's
``test_loader``. Changing ``opt.batchSize`` alone leaves them at the old batch: the run at the new
batch runs out on them, or raises (a hidden state of the new batch against data of the old).

Found in the notebook's input history (``In``), before any run: the top-level statements of the
cells before the failing one that bind a name the failing cell reads (itself or through the
notebook functions it calls) and read the batch setting, directly (``opt.batchSize``,
``args.batch_size``, ``cfg["bs"]``, a ``batch_size`` global) or through a name bound so
(``bsz = args.batch_size``). Just those statements (a slice: re-running the whole setup cell would
make new models and parse ``args`` again) run in the user namespace at the start of each run,
after the setting changed (``Plan.namespace_updates``) and inside the fix's transaction: a
rehearsal's rollback and Ctrl-C put the old values back, the kept run keeps the new ones.

The guard reads the slice first: a slice that would write a file, append to a list the notebook
had, or print is not re-run (the fix says which cell to re-run with which value instead). The
slice runs with the random generators put back after it, so the failing cell's own random stream
is as it was; what the slice drew is new, and the outcome says so.
"""

from __future__ import annotations

import ast
import contextlib
import io
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jupyter_gpumem.backends import torch_state
from jupyter_gpumem.cells import source as cellsource
from jupyter_gpumem.fixes.batch.sites import BatchFinding
from jupyter_gpumem.rescue import sandbox

_MAX_CELLS = 200  # the latest cells of a long history are the ones that matter


@dataclass(frozen=True)
class _Setting:
    """How an earlier cell reads the batch setting."""

    attrs: frozenset[tuple[str, str]]  # ``opt.batchSize``
    items: frozenset[tuple[str, str]]  # ``cfg["batch_size"]``
    names: frozenset[str]  # a ``batch_size`` global
    variables: frozenset[str]  # names a slice must never rebind (``args``, ``opt``, the loaders)

    def read_by(self, node: ast.AST) -> str | None:
        """The setting as ``node`` reads it (``opt.batchSize``), or None."""
        for n in ast.walk(node):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
                if (n.value.id, n.attr) in self.attrs:
                    return f"{n.value.id}.{n.attr}"
            elif isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name):
                key = n.slice
                if isinstance(key, ast.Constant) and (n.value.id, key.value) in self.items:
                    return f"{n.value.id}[{key.value!r}]"
            elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id in self.names:
                return n.id
        return None


def _setting(finding: BatchFinding) -> _Setting:
    attrs: set[tuple[str, str]] = set()
    items: set[tuple[str, str]] = set()
    names: set[str] = set()
    variables: set[str] = set()
    for s in finding.sites:
        if s.lineno is not None:
            continue  # the cell's own number: no earlier cell reads it
        if s.kind == "config" and s.name in finding.configs:
            var, key, is_item, _obj = finding.configs[s.name]
            (items if is_item else attrs).add((var, key))
            variables.add(var)
        elif s.kind in ("global", "named"):
            names.add(s.name)
            variables.add(s.name)
        else:  # a DataLoader (or an entry of one): rebuilt by ``apply_batch``
            variables.add(s.name.split("[", 1)[0].split(".", 1)[0])
    return _Setting(frozenset(attrs), frozenset(items), frozenset(names), frozenset(variables))


@dataclass(frozen=True)
class Made:
    """One statement of an earlier cell that a slice re-runs."""

    cell: int  # In [cell]
    lineno: int
    node: ast.stmt = field(compare=False, repr=False)
    binds: tuple[str, ...]
    reads: str | None  # the setting it reads itself (``opt.batchSize``), or None: through a name

    def where(self) -> str:
        return f"In [{self.cell}], line {self.lineno}"


@dataclass
class Remake:
    """The names the failing cell reads that earlier cells made from the batch setting, and the
    slice that makes them again."""

    targets: tuple[str, ...]
    slice: tuple[Made, ...]
    refused: str | None = None  # why the slice is not re-run (the guard's words)
    draws_random: bool = False  # measured: the slice moved a random generator

    def context(self, namespace: dict[str, Any], batch: int) -> Callable[[], _Run]:
        """The ``Plan.contexts`` factory that re-makes the targets at the start of a run."""
        return lambda: _Run(self, namespace, batch)

    def made(self, name: str) -> Made:
        return next(m for m in reversed(self.slice) if name in m.binds)

    def notes(self, batch: int) -> list[str]:
        """What the kept run re-made, in words."""
        if self.refused is not None:
            return [self.refused_note(batch)]
        made = ", ".join(f"`{t}` ({self.made(t).where()})" for t in self.targets)
        note = f"Also re-made {made} at batch {batch}: made from {self.setting()} in an earlier "
        note += "cell, the statements that make it ran again (nothing else of that cell)."
        notes = [note]
        if self.draws_random:
            notes.append(
                "The re-made values are new random draws (the cell's own random stream is as it "
                "was): this is not the same as one clean run of both cells at batch "
                f"{batch}, whose earlier cell would have drawn them in its own order."
            )
        return notes

    def setting(self) -> str:
        """``opt.batchSize``, as the slice reads it."""
        read = next((m.reads for m in self.slice if m.reads is not None), None)
        return f"`{read}`" if read else "the batch setting"

    def refused_note(self, batch: int | None = None) -> str:
        made = ", ".join(f"`{t}` ({self.made(t).where()})" for t in self.targets)
        at = f"batch {batch}" if batch is not None else "the new batch"
        return (
            f"Not re-made: {made}, made from {self.setting()} in an earlier cell; re-running "
            f"{'it' if len(self.targets) == 1 else 'them'} {self.refused}. Re-run "
            f"{_cells_text(self.slice)} at {at} yourself, then this cell."
        )

    def tell(self, exc: BaseException, batch: int | None) -> None:
        """A run's own error where the slice was not re-run: the note under its traceback (the
        error may well be the old batch meeting the new one)."""
        add_note = getattr(exc, "add_note", None)  # Python 3.11+
        if add_note is not None:
            with contextlib.suppress(Exception):
                add_note(f"jupyter_gpumem: {self.refused_note(batch)}")

    def permanent(self) -> str:
        """For "To make it permanent": each line the slice re-ran, by cell; they read the batch
        setting, so they follow it once it is changed."""
        per_cell: dict[int, list[Made]] = {}
        for m in self.slice:
            per_cell.setdefault(m.cell, []).append(m)
        parts = []
        for cell, made in per_cell.items():
            lines = ", ".join(f"{m.lineno} ({', '.join(f'`{b}`' for b in m.binds)})" for m in made)
            parts.append(f"In [{cell}], line{'s' if len(made) > 1 else ''} {lines}")
        one = len(self.slice) == 1
        return (
            "; ".join(parts)
            + (" reads" if one else " read")
            + " the batch setting and follow"
            + ("s" if one else "")
            + " it: nothing to change there; re-run "
            + _cells_text(self.slice)
            + " before this cell"
        )


def _cells_text(made: Sequence[Made]) -> str:
    cells = sorted({m.cell for m in made})
    return " and ".join(f"In [{c}]" for c in cells)


class RemakeStopped(RuntimeError):
    """The slice reached a write outside memory the guard could not see (in a library it
    calls): stopped before it, the fix stops, the notebook is put back."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


class _Run:
    """The slice, run in the user namespace at a run's start; the random generators as they
    were after it."""

    def __init__(self, remake: Remake, namespace: dict[str, Any], batch: int) -> None:
        self.remake, self.namespace, self.batch = remake, namespace, batch

    def __enter__(self) -> _Run:
        before = torch_state.read_rng()
        try:
            # the guard reads the notebook's code, not a library's: what the slice calls runs
            # as a rehearsal does, stopped at its first write outside memory (a file, a
            # subprocess, os.environ), its output not shown, in every run, the kept one too
            with sandbox.rehearsing() as state, _quiet():
                for code in _compiled(self.remake.slice):
                    exec(code, self.namespace)  # the user's own statements, guarded
            if state.stopped is not None:  # the code caught the stop itself and went on
                raise sandbox.WorldTouched(state.stopped)
        except sandbox.WorldTouched as touched:
            self.remake.refused = (
                f"would write outside memory ({sandbox.stopped_text(touched.what)})"
            )
            raise RemakeStopped(self.remake.refused_note(self.batch)) from None
        finally:
            after = torch_state.read_rng()
            torch_state.restore_rng(before)
        if not _same_rng(before, after):
            self.remake.draws_random = True
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _compiled(made: Sequence[Made]) -> Iterator[types.CodeType]:
    """The slice, one code object per cell (its tracebacks name the cell and the line)."""
    by_cell: dict[int, list[ast.stmt]] = {}
    for m in made:
        by_cell.setdefault(m.cell, []).append(m.node)
    for cell, nodes in by_cell.items():
        yield compile(ast.Module(body=nodes, type_ignores=[]), f"<In [{cell}]>", "exec")


def _same_rng(a: torch_state.RngState, b: torch_state.RngState) -> bool:
    if a.python != b.python:
        return False
    if (a.torch_cpu is None) != (b.torch_cpu is None):
        return False
    if a.torch_cpu is not None and not a.torch_cpu.equal(b.torch_cpu):
        return False
    for x, y in zip(a.torch_cuda or [], b.torch_cuda or [], strict=False):
        if not x.equal(y):
            return False
    if a.numpy is not None and b.numpy is not None:
        return bool(a.numpy[1].tobytes() == b.numpy[1].tobytes() and a.numpy[2:] == b.numpy[2:])
    return True


# -- finding the slice ------------------------------------------------------------------------


def _failing_index(history: Sequence[str], failed_source: str) -> int:
    """Where the failing cell's latest run is in the history, else the last cell."""
    want = failed_source.strip()
    for n in range(len(history) - 1, 0, -1):
        cell = history[n]
        if isinstance(cell, str) and want and (cell.strip() == want or cell.strip().endswith(want)):
            return n
    return len(history) - 1


def _earlier_cells(history: Sequence[str], failed_source: str) -> list[tuple[int, str]]:
    """The cells before the failing one (its latest run in the history), else before the last."""
    end = _failing_index(history, failed_source)
    start = max(1, end - _MAX_CELLS)
    return [(n, history[n]) for n in range(start, end) if isinstance(history[n], str)]


def _later_cells(history: Sequence[str], failed_source: str) -> list[str]:
    """The cells run since the failing one (the user's own changes after the failure)."""
    end = _failing_index(history, failed_source)
    return [c for c in history[end + 1 :] if isinstance(c, str)]


# methods that change their object in place: a value changed so is the user's now, not the
# statement's that made it (``noise.mul_(0)``, ``batches.append(x)``)
_MUTATORS = frozenset(
    {"append", "extend", "insert", "update", "add", "pop", "popitem", "remove", "clear",
     "setdefault", "discard", "sort", "reverse", "resize_", "set_", "requires_grad_"}
)  # fmt: skip


def _changed(stmt: ast.stmt) -> set[str]:
    """The names a statement binds or changes in place: ``x[:] = 0``, ``x.attr = v``, ``del
    x[0]``, ``x.add_(1)``, ``x.append(v)`` change ``x``."""
    out = _bound(stmt)
    for node in ast.walk(stmt):
        if isinstance(node, (ast.Attribute, ast.Subscript)) and isinstance(
            node.ctx, (ast.Store, ast.Del)
        ):
            root = _root_name(node.value)
            if root is not None:
                out.add(root)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            method = node.func.attr
            if method in _MUTATORS or (method.endswith("_") and not method.startswith("_")):
                root = _root_name(node.func.value)
                if root is not None:
                    out.add(root)
    return out


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _bound(stmt: ast.stmt) -> set[str]:
    """Every name a top-level statement binds, at any depth of its blocks (not in functions)."""
    out: set[str] = set()
    stack: list[ast.AST] = [stmt]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
            continue
        if isinstance(node, ast.Lambda):
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            out.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".", 1)[0] for a in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return out


def _simple_targets(stmt: ast.stmt) -> tuple[str, ...] | None:
    """The names a plain assignment binds (``x = ...``, ``a, b = ...``, ``x += ...``), else None."""
    if isinstance(stmt, ast.Assign):
        targets = stmt.targets
    elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)) and (
        not isinstance(stmt, ast.AnnAssign) or stmt.value is not None
    ):
        targets = [stmt.target]
    else:
        return None
    names: list[str] = []
    for t in targets:
        for el in t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]:
            if not isinstance(el, ast.Name):
                return None  # ``opt.niter = 1``, ``d[k] = v``: a change to an object, not a binding
            names.append(el.id)
    return tuple(names)


def _loads(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


@dataclass
class _Def:
    made: Made
    deps: list[_Def]


def find_remake(
    history: Sequence[str] | None,
    failed_source: str,
    finding: BatchFinding,
    used: Iterable[str],
    namespace: Mapping[str, Any],
    skip: Iterable[str] = (),
) -> Remake | None:
    """What the failing cell reads that earlier cells made from the batch setting, with the slice
    that makes it again and the guard's verdict on that slice; None where there is nothing.
    ``skip``: names the failing cell binds before it reads them (it makes them again itself)."""
    if not history or not finding.sites:
        return None
    setting = _setting(finding)
    if not (setting.attrs or setting.items or setting.names):
        return None
    defs = _definitions(_earlier_cells(history, failed_source), setting)
    for src in _later_cells(history, failed_source):  # changed since the failure: the user's
        tree = cellsource.read(src).tree
        for stmt in tree.body if tree is not None else ():
            for name in _changed(stmt):
                defs.pop(name, None)
    skipped = set(skip) | setting.variables
    targets = tuple(
        sorted(n for n in set(used) if n in defs and n in namespace and n not in skipped)
    )
    if not targets:
        return None
    made = _closure([defs[t] for t in targets])
    remake = Remake(targets, made)
    remake.refused = _refusal(made, namespace)
    return remake


def _definitions(cells: list[tuple[int, str]], setting: _Setting) -> dict[str, _Def]:
    """name -> the statement that last bound it, where that statement reads the setting
    (directly or through a name bound so); a later binding of another kind forgets the name."""
    defs: dict[str, _Def] = {}
    for n, src in cells:
        reading = cellsource.read(src)
        if reading.tree is None or reading.magic is not None:
            continue
        for stmt in reading.tree.body:
            bound = _changed(stmt)  # what it binds, and what it changes in place
            if not bound:
                continue
            targets = _simple_targets(stmt)
            if targets is not None and not set(targets) & setting.variables:
                deps = [defs[r] for r in sorted(_loads(stmt)) if r in defs]
                reads = setting.read_by(stmt)
                if reads is not None or deps:
                    d = _Def(Made(n, stmt.lineno, stmt, targets, reads), deps)
                    for name in targets:
                        defs[name] = d
                    continue
            for name in bound:
                defs.pop(name, None)
    return defs


def _closure(roots: list[_Def]) -> tuple[Made, ...]:
    seen: dict[int, Made] = {}
    stack = list(roots)
    while stack:
        d = stack.pop()
        if id(d.made) in seen:
            continue
        seen[id(d.made)] = d.made
        stack.extend(d.deps)
    return tuple(sorted(seen.values(), key=lambda m: (m.cell, m.lineno)))


def _refusal(made: Sequence[Made], namespace: Mapping[str, Any]) -> str | None:
    """Why the slice must not be re-run silently, in words, or None: the guard's side effects
    (a file written, a list the notebook had appended to), and printing (the slice's own
    ``print`` or one in a notebook function it calls)."""
    from jupyter_gpumem.guard.analyse import analyse_rerun

    for m in made:
        # every line of the statement ran (the guard's failing line is the one after it)
        text = ast.unparse(m.node) + "\npass"
        verdict = analyse_rerun(
            text,
            failed_lineno=len(text.splitlines()),
            preexisting=frozenset(namespace),
            namespace=namespace,
        )
        if verdict.effects:
            e = verdict.effects[0]
            return f"would repeat what {m.where()} did ({e.why})"
        printer = _prints(m.node, namespace)
        if printer is not None:
            return f"would print again ({m.where()}: {printer})"
    return None


def _prints(node: ast.AST, namespace: Mapping[str, Any]) -> str | None:
    """``print(...)`` in the statement, or ``batchify()`` where the notebook function prints."""
    for n in ast.walk(node):
        if not isinstance(n, ast.Call) or not isinstance(n.func, ast.Name):
            continue
        if n.func.id == "print":
            return "`print(...)`"
        fn = namespace.get(n.func.id)
        code = getattr(fn, "__code__", None) if type(fn) is types.FunctionType else None
        if code is not None and _code_prints(code):
            return f"`{n.func.id}()` prints"
    return None


def _code_prints(code: types.CodeType, depth: int = 0) -> bool:
    if "print" in code.co_names:
        return True
    return depth < 3 and any(
        _code_prints(c, depth + 1) for c in code.co_consts if isinstance(c, types.CodeType)
    )

"""Find a cell's batch size, in its source or in the namespace it reads, and change it.

Where a batch size is looked for, in order of trust:

1. ``--batch-var NAME`` given by the user: ``NAME = <int>`` (or ``NAME=<int>`` as a keyword) in
   the cell, else an int or a DataLoader named ``NAME`` in the namespace;
2. an int literal assigned to a batch-like name (``batch_size = 64``, ``bs, lr = 64, 1e-3``);
3. a batch-like keyword or dict key (``DataLoader(ds, batch_size=64)``, ``{"bsz": 64}``);
4. a DataLoader from the namespace that the cell iterates (``for x in loader``, ``iter(loader)``);
5. a batch-like int global that the cell reads before assigning it;
6. the leading dimension of a tensor factory with two or more dimensions
   (``torch.randn(64, 3, 224, 224)``, ``torch.zeros(size=(64, 512))``); a one-dimensional
   ``torch.randint(0, 10, (64,))`` (labels) joins when it equals the batch, never alone;
7. ``[x] * 64``.

The first kind present gives the value; every literal site of kinds 2, 3, 6 and 7 that carries the
same value changes with it (``bs = 64`` and ``torch.randn(64, 128)`` in one cell are taken as the
same batch). Factories with ``requires_grad=`` or inside ``Parameter(...)`` are weights, not
batches. Numbers in strings and comments are tokens of their own and never match.

Edits are spliced into the original text, so comments, formatting and non-ASCII text survive
(``ast`` columns are UTF-8 byte offsets; sites report character columns).
"""

from __future__ import annotations

import ast
import builtins
import inspect
import itertools
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import cellsource
from ..cellsource import dotted as _dotted
from .batch_evidence import SizedTensor, sized_by
from .batch_namespace import (
    config_items,
    config_name,
    history_of,
    is_batch_name,
    origin,
    with_setting,
)

__all__ = [
    "AccumulationPlan",
    "BatchFinding",
    "BatchSite",
    "accumulation_plan",
    "apply_batch",
    "describe_change",
    "find_batch",
    "is_batch_name",
    "rebuild_loader",
    "try_accumulation",
]

_EVAL_NAME = re.compile(r"(^|_)(eval|val|valid|validation|test|infer|inference|predict)(_|$)", re.I)
_FACTORIES = {"randn", "rand", "zeros", "ones", "empty", "full", "randint", "normal"}
_TORCH_MODULES = {"torch", "th"}
_PRIORITY = (
    "named",
    "assign",
    "kwarg",
    "dataloader",
    "global",
    "config",
    "leading_dim",
    "list_repeat",
)
# With the failing tensors' shapes to check against, a few more kinds may be the batch: a DataLoader
# a notebook function reads, a config's setting, any int literal the cell assigns.
_SIZED_PRIORITY = (
    "named",
    "assign",
    "kwarg",
    "dataloader",
    "config",
    "global",
    "assign_any",
    "leading_dim",
    "list_repeat",
    "call_arg",
)
_NAMED_KINDS = {"named", "assign", "kwarg", "dataloader", "config", "global"}
_NAMESPACE_KINDS = {"dataloader", "config", "global"}
_SOURCE_KINDS = {"named", "assign", "kwarg", "leading_dim", "list_repeat"}
_NOT_FOUND = "no batch size found in this cell: use %gpumem retry batch --batch-var NAME"
_ACCUM = "_gpumem_accum_i"


@dataclass(frozen=True)
class BatchSite:
    """One place that holds the batch size."""

    # "assign" | "kwarg" | "leading_dim" | "list_repeat" | "global" | "dataloader" | "named" |
    # "config" (``args.batch_size``, ``cfg['bs']``) | "assign_any" (``batch = 1024``) |
    # "call_arg" (``train(model, 4096)``: a number passed to a notebook function)
    kind: str
    name: str
    value: int
    lineno: int | None  # 1-based line in the cell; None for a namespace site
    col: int | None  # character offsets within that line
    end_col: int | None
    line_text: str | None


@dataclass(frozen=True)
class BatchFinding:
    """The sites that change together, or why there are none."""

    sites: tuple[BatchSite, ...]
    value: int
    how: str
    reason_not_found: str | None
    # The DataLoader objects of "dataloader" sites, by name, for apply_batch to rebuild.
    loaders: Mapping[str, object] = field(default_factory=dict, compare=False, repr=False)
    # "config" sites: name -> (variable, key, is a dict item, the config object)
    configs: Mapping[str, tuple[str, str, bool, object]] = field(
        default_factory=dict, compare=False, repr=False
    )
    # what ties the value to the failure: "`train_loader.batch_size` = 128 sizes `x` (128, 784)"
    evidence: str = ""
    # where the value was set, for "make it permanent": site name -> "In [3], line 2: ..."
    origins: Mapping[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class AccumulationPlan:
    """The cell rewritten to keep the effective batch with gradient accumulation."""

    source: str
    steps: int
    effective_batch: int
    explanation: str


# -- parsing ------------------------------------------------------------------------------


_split_lines = cellsource.lines_with_ends


def _parse(source: str) -> tuple[ast.Module | None, int, set[int], str | None]:
    """(tree, line offset, lines not to touch, why not): the cell's one reading, whose tree is
    numbered as the cell's lines (offset 0) and is shared (read, never changed, here)."""
    reading = cellsource.read(source)
    return reading.tree, 0, set(reading.changed), reading.why


def _char_cols(line: str, start: int, end: int) -> tuple[int, int]:
    raw = line.encode()
    return len(raw[:start].decode(errors="replace")), len(raw[:end].decode(errors="replace"))


def _int_value(node: ast.AST | None) -> int | None:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    return None


# -- finding ------------------------------------------------------------------------------


class _Finder:
    def __init__(self, tree: ast.Module, lines: list[str], offset: int, skip: set[int]) -> None:
        self.tree, self.lines, self.offset, self.skip = tree, lines, offset, skip
        self.sites: list[BatchSite] = []
        self.near_misses: list[str] = []
        self.weights: set[int] = set()  # ids of factory calls that make weights
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _callee(node) == "Parameter":
                self.weights.update(id(a) for a in node.args)

    def site(self, kind: str, name: str, lit: ast.expr, value: int) -> None:
        lineno = lit.lineno + self.offset
        if lineno in self.skip or getattr(lit, "end_lineno", None) != lit.lineno:
            return
        line = self.lines[lineno - 1]
        col, end = _char_cols(line, lit.col_offset, lit.end_col_offset or lit.col_offset)
        text = line.rstrip("\r\n")
        self.sites.append(BatchSite(kind, name, value, lineno, col, end, text))

    def scan(self, batch_var: str | None) -> None:
        for node in ast.walk(self.tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                self._assign(node, batch_var)
            elif isinstance(node, ast.Call):
                self._call(node, batch_var)
            elif isinstance(node, ast.Dict):
                for key, val in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and isinstance(key.value, str):
                        self._named(key.value, val, "kwarg", batch_var)
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
                for seq, n in ((node.left, node.right), (node.right, node.left)):
                    value = _int_value(n)
                    if isinstance(seq, ast.List) and value is not None and value > 1:
                        self.site("list_repeat", _short(node), n, value)

    def _named(self, name: str, val: ast.expr, kind: str, batch_var: str | None) -> None:
        value = _int_value(val)
        if name == batch_var:
            if value is not None and value >= 1:
                self.site("named", name, val, value)
            else:
                self.near_misses.append(f"{name} = {_short(val)} on line {self._line(val)}")
        elif is_batch_name(name.rsplit(".", 1)[-1]):
            if value is not None and value >= 1:
                self.site(kind, name, val, value)
            elif not isinstance(val, ast.Constant):
                self.near_misses.append(f"{name} = {_short(val)} on line {self._line(val)}")
        elif kind == "assign" and value is not None and value > 1:
            self.site("assign_any", name, val, value)  # the batch only if it sizes the failure

    def describe_misses(self) -> str:
        """``found bs = 2 ** 6 on line 1, not a plain number``."""
        misses = sorted(set(self.near_misses), key=self.near_misses.index)[:3]
        plural = "plain numbers" if len(misses) > 1 else "a plain number"
        return f"found {'; '.join(misses)}, not {plural}"

    def _line(self, node: ast.AST) -> int:
        return getattr(node, "lineno", 0) + self.offset

    def _assign(self, node: ast.Assign | ast.AnnAssign, batch_var: str | None) -> None:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if node.value is None:
            return
        for t in targets:
            if isinstance(t, ast.Tuple) and isinstance(node.value, ast.Tuple):
                if len(t.elts) == len(node.value.elts):
                    for sub, val in zip(t.elts, node.value.elts, strict=True):
                        if (name := _dotted(sub)) is not None:
                            self._named(name, val, "assign", batch_var)
            elif (name := _dotted(t)) is not None:
                self._named(name, node.value, "assign", batch_var)

    def _call(self, node: ast.Call, batch_var: str | None) -> None:
        for kw in node.keywords:
            if kw.arg:
                self._named(kw.arg, kw.value, "kwarg", batch_var)
        lit = _leading_dim(node)
        if lit is None and isinstance(node.func, ast.Name) and _notebook_callee(node.func.id):
            # `step(4096)`: the batch handed to a function of the notebook; anonymous, so only
            # the batch when it sizes most of the failing tensors
            for i, arg in enumerate(node.args):
                if isinstance(arg, ast.Constant) and type(arg.value) is int and arg.value > 1:
                    self.site("call_arg", f"argument {i + 1} of {node.func.id}()", arg, arg.value)
        if lit is not None and id(node) not in self.weights:
            value = _int_value(lit[0])
            if value is not None and value > 1:
                kind = "leading_dim" if lit[1] else "leading_dim_1d"
                self.site(kind, f"{_dotted(node.func)}(...)", lit[0], value)


def _notebook_callee(name: str) -> bool:
    """A call that may take the batch as a plain argument: a function, not a builtin (`range`,
    `print`) and not a class (`Linear(1024, 10)` takes sizes of weights)."""
    return name not in _BUILTINS and not name[:1].isupper()


_BUILTINS = frozenset(dir(builtins))


def _callee(node: ast.Call) -> str:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _short(node: ast.AST, limit: int = 40) -> str:
    return cellsource.short(ast.unparse(node), limit)


def _leading_dim(node: ast.Call) -> tuple[ast.expr, bool] | None:
    """(the literal of the first dimension, whether there are two or more) of a tensor factory."""
    f = node.func
    name = _callee(node)
    if name not in _FACTORIES:
        return None
    if isinstance(f, ast.Attribute) and not (
        isinstance(f.value, ast.Name) and f.value.id in _TORCH_MODULES
    ):
        return None
    if any(kw.arg == "requires_grad" for kw in node.keywords):
        return None
    size = next((kw.value for kw in node.keywords if kw.arg == "size"), None)
    if size is None:
        if name == "randint":  # randint(high, size) / randint(low, high, size)
            size = node.args[-1] if len(node.args) in (2, 3) else None
        elif name == "normal":
            size = None
        elif len(node.args) == 1 or (name == "full" and node.args):
            size = node.args[0]
        elif node.args:
            return (node.args[0], len(node.args) > 1) if _int_value(node.args[0]) else None
    if isinstance(size, (ast.Tuple, ast.List)) and size.elts:
        return size.elts[0], len(size.elts) > 1
    if size is not None and _int_value(size) is not None:
        return size, False
    return None


def _first_loads(tree: ast.Module) -> Iterator[ast.Name]:
    """Names the cell reads before assigning them (in source order: good enough for a cell)."""
    stores: dict[str, tuple[int, int]] = {}
    loads: list[ast.Name] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            pos = (node.lineno, node.col_offset)
            if isinstance(node.ctx, ast.Store):
                stores[node.id] = min(stores.get(node.id, pos), pos)
            else:
                loads.append(node)
    for node in sorted(loads, key=lambda n: (n.lineno, n.col_offset)):
        if node.id not in stores or (node.lineno, node.col_offset) < stores[node.id]:
            yield node


def _iterated(tree: ast.Module) -> set[str]:
    """Names inside ``for ... in <here>``, comprehension iterables, and ``iter(<here>)``."""
    exprs: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
            exprs.append(node.iter)
        elif isinstance(node, ast.Call) and _callee(node) in ("iter", "enumerate", "tqdm", "zip"):
            exprs.extend(node.args)
    return {n.id for e in exprs for n in ast.walk(e) if isinstance(n, ast.Name)}


def _loader_batch(obj: object) -> int | None:
    """A DataLoader's batch size, read without running the object's own code (no
    ``__getattr__``, no properties: a lazy object's getter can take seconds or print)."""
    try:
        size = inspect.getattr_static(obj, "batch_size", None)
        dataset = inspect.getattr_static(obj, "dataset", None)
        if type(size) is int and size >= 1 and dataset is not None:
            return size
    except Exception:
        pass
    return None


def _namespace_sites(
    tree: ast.Module,
    namespace: Mapping[str, object],
    batch_var: str | None,
    used: Iterable[str] = (),
) -> tuple[list[BatchSite], dict[str, tuple[str, str, bool, object]]]:
    """Sites in the namespace: DataLoaders, batch-named ints and configs the cell reads (or, in
    ``used``, the notebook functions it calls read)."""
    sites: list[BatchSite] = []
    configs: dict[str, tuple[str, str, bool, object]] = {}
    read = {n.id for n in _first_loads(tree)}
    stored = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - read
    iterated = _iterated(tree)
    deeper = set(used) - read - stored
    names = sorted(read) + sorted(deeper)
    if batch_var and batch_var not in read:
        names.append(batch_var)
    for name in names:
        if name not in namespace or name.startswith("_"):
            continue
        obj = namespace[name]
        loader = _loader_batch(obj)
        if loader is not None:
            # iterated here, named, or reached otherwise (passed to `train()`, read by it):
            # the last kind only counts when it sizes the failing tensors
            kind = "dataloader" if name in iterated or name == batch_var else "dataloader_used"
            sites.append(BatchSite(kind, name, loader, None, None, None, None))
        elif type(obj) is int and obj > 1 and (name == batch_var or is_batch_name(name)):
            kind = "named" if name == batch_var else "global"
            sites.append(BatchSite(kind, name, obj, None, None, None, None))
        else:
            for key, value, is_item in config_items(obj):
                site_name = config_name(name, key, is_item)
                configs[site_name] = (name, key, is_item, obj)
                sites.append(BatchSite("config", site_name, value, None, None, None, None))
    return sites, configs


def _choose(
    sites: list[BatchSite], batch_var: str | None, evidence: Sequence[SizedTensor] = ()
) -> tuple[BatchSite, ...]:
    """The sites to change: the most trusted one, and every literal that carries its value.

    With the failing tensors' shapes, only a value that sizes one of them can be the batch; a
    batch-named one that sizes none is kept only when nothing else does (the shapes seen may miss
    the tensor that failed)."""
    order: Sequence[str] = _PRIORITY
    if batch_var:
        primary = [s for s in sites if s.name == batch_var and s.kind in ("named", "dataloader")]
        if any(s.lineno is not None for s in primary):  # the cell's own assignment shadows
            primary = [s for s in primary if s.lineno is not None]
    elif evidence:
        order = _SIZED_PRIORITY
        sizes = {s.value: sum(s.value in t.shape for t in evidence) for s in sites}
        most = max(sizes.values(), default=0)
        primary = [
            s
            for s in sites
            if _kind(s) in order
            and s.kind != "leading_dim_1d"
            and sizes[s.value] > 0
            # an anonymous number must size most of what the batch sizes (`epochs = 2` may
            # size the logits (4096, 2), never every activation)
            and (
                s.kind in _NAMED_KINDS or s.kind == "dataloader_used" or 2 * sizes[s.value] >= most
            )
        ]
        if not primary:
            primary = [s for s in sites if s.kind in _NAMED_KINDS]
    else:
        primary = [s for s in sites if s.kind in _PRIORITY]
    if not primary:
        return ()
    kind = min((_kind(s) for s in primary), key=order.index)
    group = [s for s in primary if _kind(s) == kind]
    counts = {s.value: sum(t.value == s.value for t in group) for s in group}
    # The training batch before an evaluation one, then the most common value, then the first.
    top = min(group, key=lambda s: (bool(_EVAL_NAME.search(s.name)), -counts[s.value]))
    from_ns = kind in _NAMESPACE_KINDS
    chosen = [
        s
        for s in sites
        if s is top
        or (
            s.value == top.value
            and (
                (s.lineno is not None and (s.kind != "named" or s.name == top.name))
                or (kind == "global" and s.kind == "global")
                or (from_ns and _kind(s) in _NAMESPACE_KINDS and not _EVAL_NAME.search(s.name))
            )
            and (s.kind != "assign_any" or s.name == top.name)
        )
    ]
    return tuple(
        BatchSite(_kind(s), *_fields(s)[1:]) if _kind(s) != s.kind else s
        for s in sorted(chosen, key=lambda s: (s.lineno or 0, s.col or 0))
    )


def _kind(s: BatchSite) -> str:
    """The kind a site counts as: a 1-d factory joins as a leading dimension, a loader that is
    only passed around as a DataLoader."""
    return {"leading_dim_1d": "leading_dim", "dataloader_used": "dataloader"}.get(s.kind, s.kind)


def _fields(s: BatchSite) -> tuple[str, str, int, int | None, int | None, int | None, str | None]:
    return (s.kind, s.name, s.value, s.lineno, s.col, s.end_col, s.line_text)


def _main(sites: Sequence[BatchSite]) -> BatchSite:
    return min(sites, key=lambda s: _SIZED_PRIORITY.index(s.kind))


def _how(sites: tuple[BatchSite, ...], iterated: bool = True) -> str:
    main = _main(sites)
    where = f"on line {main.lineno} of the cell"
    if main.kind == "dataloader":
        does = "this cell iterates" if iterated else "the cell or a function it calls uses"
        text = f"{main.name}.batch_size = {main.value} (a DataLoader {does})"
    elif main.kind == "config":
        text = f"{main.name} = {main.value}, a setting this cell reads"
    elif main.lineno is None:
        text = f"{main.name} = {main.value}, a global this cell reads"
    elif main.kind == "leading_dim":
        text = f"the leading dimension {main.value} of {main.name} {where}"
    elif main.kind in ("list_repeat", "call_arg"):
        text = (
            f"{main.name} = {main.value} {where}"
            if main.kind == "call_arg"
            else f"{main.name} {where}"
        )
    elif main.kind == "kwarg":
        text = f"{main.name}={main.value} {where}"
    else:
        text = f"{main.name} = {main.value} {where}"
    others = len(sites) - 1
    return text + (f" (and {others} more with the same value)" if others else "")


def _evidence_text(main: BatchSite, evidence: Sequence[SizedTensor]) -> str:
    """``train_loader.batch_size = 128 sizes `x` (128, 784) in train()``."""
    hit = sized_by(main.value, evidence)
    if hit is None:
        return ""
    label = f"{main.name}.batch_size" if main.kind == "dataloader" else main.name
    if main.kind == "leading_dim":
        label = f"the {main.value} of {main.name}"
    # "data in test()": a local of a notebook function, named by it; a library's frame
    # ("input in forward() in linear.py") is the failed call, its file no one's business
    frame = hit.name.split(" in ", 1)[1] if " in " in hit.name else None
    if frame is None:
        where = "made by the failed run"
    else:
        where = "in the failed call" if " in " in frame else f"in {frame}"
    return f"`{label}` = {main.value} sizes {hit.text()} {where}"


def find_batch(
    source: str,
    namespace: Mapping[str, object] | None = None,
    *,
    batch_var: str | None = None,
    evidence: Sequence[SizedTensor] = (),
    used: Iterable[str] = (),
) -> BatchFinding:
    """Find the batch size of a cell; see the module docstring for where and in which order.

    ``evidence``: the failing tensors with their shapes (``batch_evidence.failing_tensors``);
    ``used``: names the notebook functions the cell calls read (``failure.names_used``)."""
    tree, offset, skip, why = _parse(source)
    if tree is None:
        return BatchFinding((), 0, "", f"{why}: use %gpumem retry batch --batch-var NAME")
    finder = _Finder(tree, _split_lines(source), offset, skip)
    finder.scan(batch_var)
    ns = namespace or {}
    ns_sites, configs = _namespace_sites(tree, ns, batch_var, used)
    sites = finder.sites + ns_sites
    sites.sort(key=lambda s: (s.lineno or 0, s.col or 0))
    chosen = _choose(sites, batch_var, evidence)
    if not chosen:
        if batch_var:
            return BatchFinding((), 0, "", _why_not_named(batch_var, finder, namespace))
        hint = f" ({finder.describe_misses()})" if finder.near_misses else ""
        if evidence:
            shapes = ", ".join(t.text() for t in evidence[:3])
            hint += f" (no number in it, or in what it reads, sizes the failing tensors: {shapes})"
        return BatchFinding((), 0, "", _NOT_FOUND.replace(":", hint + ":", 1))
    loaders = {s.name: ns[s.name] for s in chosen if s.kind == "dataloader"}
    main = _main(chosen)
    iterated = main.kind != "dataloader" or main.name in _iterated(tree) or main.name == batch_var
    history = history_of(ns)
    origins = {}
    for s in chosen:
        if s.lineno is not None:
            continue
        var, key = (
            (configs[s.name][0], configs[s.name][1]) if s.kind == "config" else (s.name, None)
        )
        where = origin(
            history, var, key or ("batch_size" if s.kind == "dataloader" else None), s.value
        )
        if where:
            origins[s.name] = where
    return BatchFinding(
        chosen,
        main.value,
        _how(chosen, iterated),
        None,
        loaders,
        {s.name: configs[s.name] for s in chosen if s.kind == "config"},
        _evidence_text(main, evidence),
        origins,
    )


def _why_not_named(name: str, finder: _Finder, namespace: Mapping[str, object] | None) -> str:
    if finder.near_misses:
        in_cell = finder.describe_misses()
    else:
        in_cell = f"this cell assigns no int literal to {name}"
    if namespace is None or name not in namespace:
        in_ns = f"the namespace has no {name}"
    else:
        obj = namespace[name]
        in_ns = f"the global {name} is a {type(obj).__name__}, not an int > 1 or a DataLoader"
    return f"batch variable {name!r} not found: {in_cell}, and {in_ns}"


# -- changing -----------------------------------------------------------------------------

_Edit = tuple[int, int, int, str]  # (lineno, col, end_col, new text), character columns


def _splice(lines: list[str], edits: list[_Edit]) -> list[str]:
    out = list(lines)
    for lineno, col, end, text in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        line = out[lineno - 1]
        out[lineno - 1] = line[:col] + text + line[end:]
    return out


def _batch_edits(lines: list[str], finding: BatchFinding, new: int) -> list[_Edit]:
    edits = []
    for s in finding.sites:
        if s.lineno is None or s.col is None or s.end_col is None:
            continue
        current = lines[s.lineno - 1][s.col : s.end_col] if s.lineno <= len(lines) else ""
        try:
            same = int(current.replace("_", ""), 0) == s.value
        except ValueError:
            same = False
        if not same:
            raise ValueError(f"line {s.lineno} changed since the batch size was found: {current!r}")
        edits.append((s.lineno, s.col, s.end_col, str(new)))
    return edits


def apply_batch(
    source: str, finding: BatchFinding, new_value: int
) -> tuple[str, dict[str, object]]:
    """(the cell with the new batch size, namespace updates for globals and DataLoaders)."""
    if new_value < 1:
        raise ValueError(f"batch size must be >= 1, got {new_value}")
    lines = _split_lines(source)
    new_source = "".join(_splice(lines, _batch_edits(lines, finding, new_value)))
    updates: dict[str, object] = {}
    for s in finding.sites:
        if s.lineno is not None:
            continue
        if s.kind == "dataloader":
            updates[s.name] = rebuild_loader(finding.loaders[s.name], new_value)
        elif s.kind == "config":
            var, key, is_item, obj = finding.configs[s.name]
            updates[var] = with_setting(updates.get(var, obj), key, new_value, is_item)
        else:
            updates[s.name] = new_value
    return new_source, updates


# Passed on to the new DataLoader when the old one has them (and they are not the default).
_LOADER_ARGS = (
    "num_workers",
    "collate_fn",
    "pin_memory",
    "drop_last",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "generator",
    "persistent_workers",
    "pin_memory_device",
    "in_order",
)


def rebuild_loader(loader: object, batch_size: int) -> object:
    """A new DataLoader like ``loader`` with another batch size, without importing torch."""
    kwargs: dict[str, object] = {"batch_size": batch_size}
    for name in _LOADER_ARGS:
        value = getattr(loader, name, None)
        if value is not None and value != "":
            kwargs[name] = value
    prefetch = getattr(loader, "prefetch_factor", None)
    if getattr(loader, "num_workers", 0) and prefetch:  # torch refuses it without workers
        kwargs["prefetch_factor"] = prefetch
    sampler = getattr(loader, "sampler", None)
    kind = type(sampler).__name__
    if kind == "RandomSampler" and not getattr(sampler, "replacement", False):
        if getattr(sampler, "_num_samples", None) is None:
            kwargs["shuffle"] = True
        else:
            kwargs["sampler"] = sampler
    elif kind not in ("SequentialSampler", "_InfiniteConstantSampler", "NoneType"):
        kwargs["sampler"] = sampler  # a custom or weighted sampler: keep it as it is
    dataset = getattr(loader, "dataset")  # noqa: B009
    cls: Any = type(loader)
    try:
        return cls(dataset, **kwargs)
    except TypeError as e:
        raise ValueError(f"cannot rebuild {type(loader).__name__} with batch_size: {e}") from e


def describe_change(finding: BatchFinding, new_value: int) -> str:
    """What to write to keep the new batch size, e.g. ``change line 2 to: batch_size = 9``."""
    if not finding.sites:
        return finding.reason_not_found or _NOT_FOUND
    parts = []
    lines = {s.lineno: s.line_text or "" for s in finding.sites if s.lineno is not None}
    if lines:
        by_line: dict[int, list[_Edit]] = {}
        for s in finding.sites:
            if s.lineno is not None and s.col is not None and s.end_col is not None:
                by_line.setdefault(s.lineno, []).append((1, s.col, s.end_col, str(new_value)))
        changed = [
            f"line {n} to: {_splice([lines[n]], by_line[n])[0].strip()}" for n in sorted(lines)
        ]
        parts.append("change " + "; ".join(changed))
    done: set[str] = set()
    for s in finding.sites:
        if s.lineno is not None:
            continue
        where = finding.origins.get(s.name)
        if where is not None:
            if where not in done:
                parts.append(_change_origin(where, s.value, new_value))
            done.add(where)
        elif s.kind == "dataloader":
            parts.append(
                f"build {s.name} with batch_size={new_value} "
                f"(e.g. DataLoader({s.name}.dataset, batch_size={new_value}, ...))"
            )
        elif s.kind == "config":
            parts.append(f"set {s.name} = {new_value} where it is made")
        else:
            parts.append(f"set {s.name} = {new_value} before the cell (it is a global)")
    return "; ".join(parts)


def _change_origin(where: str, old: int, new: int) -> str:
    """``In [3], line 2: ...(batch_size=2048)`` -> ``change In [3], line 2 to: ...(batch_size=144)``."""
    head, _, text = where.partition(": ")
    number = re.compile(rf"(?<![\w.]){old}(?![\w.])")
    if len(number.findall(text)) == 1:
        return f"change {head} to: {number.sub(str(new), text)}"
    return f"in {head} ({text}), make the batch {new}"


# -- gradient accumulation ----------------------------------------------------------------


def _method_calls(stmt: ast.stmt, method: str) -> list[ast.Call]:
    """``X.method(...)`` calls that are the whole statement ``stmt``."""
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        f = stmt.value.func
        if isinstance(f, ast.Attribute) and f.attr == method:
            return [stmt.value]
    return []


def _receiver(call: ast.Call) -> ast.expr:
    """``X`` of ``X.method(...)``."""
    return call.func.value if isinstance(call.func, ast.Attribute) else call.func


def _training_loop(tree: ast.Module, text: str) -> ast.For | str:
    """The one ``for`` loop that does backward, step and zero_grad in its body, or why not."""
    if re.search(r"accum", text, re.IGNORECASE):
        return "the cell already mentions accumulation"
    loops = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.For):
            continue
        body = node.body
        backward = [c for st in body for c in _method_calls(st, "backward")]
        step = [c for st in body for c in _method_calls(st, "step")]
        zero = [c for st in body for c in _method_calls(st, "zero_grad")]
        if backward and step and zero:
            loops.append(node)
        elif backward and any(
            isinstance(n, ast.Call) and _callee(n) in ("step", "zero_grad")
            for st in body
            if not isinstance(st, ast.Expr)
            for n in ast.walk(st)
        ):
            return "the optimizer steps under a condition in the loop (accumulation already?)"
    if not loops:
        return (
            "no for loop calls .backward(), optimizer.step() and optimizer.zero_grad() "
            "at the same level"
        )
    if len(loops) > 1:
        return "several loops train; which one to accumulate in is not clear"
    loop = loops[0]
    if sum(len(_method_calls(st, "backward")) for st in loop.body) > 1:
        return "the loop calls backward() more than once"
    if loop.body[0].lineno == loop.lineno:
        return "the loop body is on the same line as the for"
    return loop


def try_accumulation(source: str, finding: BatchFinding, new_value: int) -> AccumulationPlan | str:
    """The cell with the new batch and gradient accumulation, or why the cell does not allow it."""
    old = finding.value
    if not finding.sites or new_value >= old:
        return "the batch size does not shrink"
    tree, offset, skip, why = _parse(source)
    if tree is None:
        return why or "the cell does not parse"
    lines = _split_lines(source)
    loop = _training_loop(tree, source)
    if isinstance(loop, str):
        return loop
    steps = math.ceil(old / new_value)
    # the smallest per-step batch that still reaches the old one in that many steps (<= the batch
    # that fit): 4096 at most 959 a step is 5 x 820 = 4100, not 5 x 959 = 4795
    new_value = math.ceil(old / steps)
    body = loop.body
    statements = {st.lineno + offset for st in body}
    if (
        any(b.lineno == (a.end_lineno or a.lineno) for a, b in itertools.pairwise(body))
        or statements & skip
    ):
        return "the loop puts several statements on one line or holds IPython syntax"
    try:
        edits = _batch_edits(lines, finding, new_value)
    except ValueError as e:
        return str(e)
    backward = next(c for st in body for c in _method_calls(st, "backward"))
    recv = _receiver(backward)
    if recv.lineno != recv.end_lineno or recv.end_col_offset is None:
        return "the expression before .backward() spans several lines"
    line = lines[recv.lineno + offset - 1]
    col, end = _char_cols(line, recv.col_offset, recv.end_col_offset)
    edits += [
        (recv.lineno + offset, col, col, "("),
        (recv.lineno + offset, end, end, f" / {steps})"),
    ]
    new_lines = _splice(lines, edits)

    # Statement-level edits, bottom up so that line numbers above stay valid.
    loop_indent = _indent(lines[loop.lineno + offset - 1])
    body_indent = _indent(lines[body[0].lineno + offset - 1])
    unit = body_indent[len(loop_indent) :] or "    "
    nl = "\n" if not lines[0].endswith("\r\n") else "\r\n"
    steppers = {_dotted(_receiver(c)) for st in body for c in _method_calls(st, "step")}
    step_gate = f"if {_ACCUM} % {steps} == 0:"
    gates: list[str | None] = []
    for st in body:
        if _method_calls(st, "step") or any(
            _dotted(_receiver(c)) in steppers for c in _method_calls(st, "update")
        ):
            gates.append(step_gate)
        elif _method_calls(st, "zero_grad"):
            # Zero at the first micro-batch of a group, or after the step at its last one.
            after = st.lineno > backward.lineno
            gates.append(step_gate if after else f"if ({_ACCUM} - 1) % {steps} == 0:")
        else:
            gates.append(None)
    # Consecutive statements under the same condition share one "if", bottom up.
    i = len(body) - 1
    while i >= 0:
        gate = gates[i]
        j = i
        while gate and j > 0 and gates[j - 1] == gate:
            j -= 1
        if gate:
            first, last = body[j].lineno + offset, (body[i].end_lineno or 0) + offset
            for n in range(first, last + 1):
                if new_lines[n - 1].strip():
                    new_lines[n - 1] = unit + new_lines[n - 1]
            new_lines[first - 1] = body_indent + gate + nl + new_lines[first - 1]
        i = j - 1
    first_body = body[0].lineno + offset
    new_lines[first_body - 1] = f"{body_indent}{_ACCUM} += 1{nl}" + new_lines[first_body - 1]
    head = loop.lineno + offset
    new_lines[head - 1] = f"{loop_indent}{_ACCUM} = 0{nl}" + new_lines[head - 1]
    new_source = "".join(new_lines)
    if _parse(new_source)[0] is None:
        return "the rewritten cell does not parse; not offered"
    effective = steps * new_value
    same = (
        f"keeps the effective batch of {old}"
        if effective == old
        else f"gives an effective batch of {effective}, the nearest to {old} it can"
    )
    explanation = (
        f"Gradient accumulation {same}: {steps} batches of {new_value}, "
        f"the loss divided by {steps}, and the optimizer stepped every {steps} batches "
        f"(counter {_ACCUM}); a last group of fewer than {steps} batches is not stepped."
    )
    return AccumulationPlan(new_source, steps, effective, explanation)


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def accumulation_plan(
    source: str, finding: BatchFinding, new_value: int
) -> AccumulationPlan | None:
    """:func:`try_accumulation` for callers that only want a plan; None where none is possible."""
    plan = try_accumulation(source, finding, new_value)
    return plan if isinstance(plan, AccumulationPlan) else None

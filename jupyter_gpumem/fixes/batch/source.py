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
import inspect
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import cast

from jupyter_gpumem.fixes.batch.accumulate import accumulation_plan, try_accumulation
from jupyter_gpumem.fixes.batch.edit import apply_batch, describe_change, rebuild_loader
from jupyter_gpumem.fixes.batch.evidence import SizedTensor, sized_by
from jupyter_gpumem.fixes.batch.literals import _callee, _Finder
from jupyter_gpumem.fixes.batch.namespace import (
    config_items,
    config_name,
    history_of,
    is_batch_name,
    origin,
)
from jupyter_gpumem.fixes.batch.sites import (
    _NAMED_KINDS,
    _NAMESPACE_KINDS,
    _NOT_FOUND,
    _PRIORITY,
    _SIZED_PRIORITY,
    AccumulationPlan,
    BatchFinding,
    BatchSite,
    _parse,
    _split_lines,
    is_eval_name,
)
from jupyter_gpumem.rescue import safe

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


_MAX_ENTRIES = 50


def _loader_entries(
    name: str, obj: object
) -> list[tuple[str, int, tuple[str, object, str, object]]]:
    """The DataLoaders a dict, list or tuple holds, or an object keeps as attributes (torchvision's
    fine-tuning tutorial: ``dataloaders = {"train": ..., "val": ...}``; ``trainer.train_loader``):
    (site name, batch size, (variable, key, how, holder)). Read without running their code."""
    found: list[tuple[str, int, tuple[str, object, str, object]]] = []
    items: list[tuple[object, object]]
    how = "item"
    tp = type(obj)
    if tp is dict:
        items = list(islice(dict.items(cast(dict, obj)), _MAX_ENTRIES))
    elif tp is list or tp is tuple:
        items = list(enumerate(islice(cast(Sequence[object], obj), _MAX_ENTRIES)))
    else:
        attrs = safe.instance_dict(obj)  # no property or __getattr__ of its own runs
        if attrs is None or safe.is_a(tp, type) or safe.type_module(tp) in ("builtins", "types"):
            return found
        items, how = list(islice(attrs.items(), _MAX_ENTRIES)), "attr"
    for key, value in items:
        batch = _loader_batch(value)
        if batch is None or type(key) not in (str, int):
            continue
        site = f"{name}.{key}" if how == "attr" else f"{name}[{key!r}]"
        found.append((site, batch, (name, key, how, obj)))
    return found


def _base_name(expr: str | None) -> str | None:
    """``dataloaders`` of ``dataloaders['train']`` or ``trainer.train_loader``."""
    if not expr:
        return None
    m = re.match(r"\s*([A-Za-z_]\w*)", expr)
    return m.group(1) if m else None


def canonical(expr: str) -> str:
    """``--batch-var dataloaders["train"]`` as the site is named (``dataloaders['train']``); a
    bare key, as a shell's quoting leaves ``dataloaders['train']``, is the string it names."""
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        return expr
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Name):
            node.slice = ast.Constant(node.slice.id)
    return ast.unparse(tree)


def _namespace_sites(
    tree: ast.Module,
    namespace: Mapping[str, object],
    batch_var: str | None,
    used: Iterable[str] = (),
    held: dict[str, tuple[str, object, str, object]] | None = None,
) -> tuple[list[BatchSite], dict[str, tuple[str, str, bool, object]]]:
    """Sites in the namespace: DataLoaders (alone, in a dict or list, or an object's
    attributes: their (variable, key, how, holder) go to ``held``), batch-named ints and configs
    the cell reads (or, in ``used``, the notebook functions it calls read)."""
    held = {} if held is None else held
    sites: list[BatchSite] = []
    configs: dict[str, tuple[str, str, bool, object]] = {}
    read = {n.id for n in _first_loads(tree)}
    stored = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - read
    iterated = _iterated(tree)
    deeper = set(used) - read - stored
    names = sorted(read) + sorted(deeper)
    base_var = _base_name(batch_var)
    if base_var and base_var not in read:
        names.append(base_var)
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
        elif entries := _loader_entries(name, obj):
            for site_name, batch, entry in entries:
                named = site_name == batch_var or (name in iterated and not batch_var)
                kind = "dataloader" if named else "dataloader_used"
                sites.append(BatchSite(kind, site_name, batch, None, None, None, None))
                held[site_name] = entry
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
    sites: list[BatchSite],
    batch_var: str | None,
    evidence: Sequence[SizedTensor] = (),
    evaluating: bool = False,
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
    # The training batch before an evaluation one (the evaluation one first when the failure
    # was in evaluation), then the most common value, then the first.
    top = min(group, key=lambda s: (is_eval_name(s.name) != evaluating, -counts[s.value]))
    top_eval = is_eval_name(top.name)
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
                or (from_ns and _kind(s) in _NAMESPACE_KINDS and is_eval_name(s.name) == top_eval)
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
    evaluation: str | None = None,
) -> BatchFinding:
    """Find the batch size of a cell; see the module docstring for where and in which order.

    ``evidence``: the failing tensors with their shapes (``batch_evidence.failing_tensors``);
    ``used``: names the notebook functions the cell calls read (``failure.names_used``);
    ``evaluation``: why the failure was in evaluation (``phase.evaluation_reason``): then an
    evaluation batch is changed before, and without, the training one."""
    if batch_var:
        batch_var = canonical(batch_var)
    tree, skip, why = _parse(source)
    if tree is None:
        return BatchFinding((), 0, "", f"{why}: use %gpumem retry batch --batch-var NAME")
    finder = _Finder(tree, _split_lines(source), skip)
    finder.scan(batch_var)
    ns = namespace or {}
    held: dict[str, tuple[str, object, str, object]] = {}
    ns_sites, configs = _namespace_sites(tree, ns, batch_var, used, held)
    sites = finder.sites + ns_sites
    sites.sort(key=lambda s: (s.lineno or 0, s.col or 0))
    chosen = _choose(sites, batch_var, evidence, evaluating=evaluation is not None)
    if not chosen:
        if batch_var:
            return BatchFinding((), 0, "", _why_not_named(batch_var, finder, namespace))
        hint = f" ({finder.describe_misses()})" if finder.near_misses else ""
        if evidence:
            shapes = ", ".join(t.text() for t in evidence[:3])
            hint += f" (no number in it, or in what it reads, sizes the failing tensors: {shapes})"
        return BatchFinding((), 0, "", _NOT_FOUND.replace(":", hint + ":", 1))
    loaders = {
        s.name: _held_value(held[s.name]) if s.name in held else ns[s.name]
        for s in chosen
        if s.kind == "dataloader"
    }
    main = _main(chosen)
    iterated = (
        main.kind != "dataloader"
        or _base_name(main.name) in _iterated(tree)
        or main.name == batch_var
    )
    history = history_of(ns)
    origins = {}
    for s in chosen:
        if s.lineno is not None or s.name in held:
            continue
        var, key = (
            (configs[s.name][0], configs[s.name][1]) if s.kind == "config" else (s.name, None)
        )
        where = origin(
            history,
            var,
            key or ("batch_size" if s.kind == "dataloader" else None),
            s.value,
            own_line=evaluation is not None and is_eval_name(s.name),
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
        {s.name: held[s.name] for s in chosen if s.name in held},
        evaluation if any(is_eval_name(s.name) for s in chosen) else None,
    )


def _held_value(entry: tuple[str, object, str, object]) -> object:
    _var, key, how, holder = entry
    if how == "attr":
        return inspect.getattr_static(holder, str(key))
    return holder[key]  # type: ignore[index]


def _why_not_named(name: str, finder: _Finder, namespace: Mapping[str, object] | None) -> str:
    if finder.near_misses:
        in_cell = finder.describe_misses()
    else:
        in_cell = f"this cell assigns no int literal to {name}"
    if namespace is None or name not in namespace:
        in_ns = f"the namespace has no {name}"
    else:
        obj = namespace[name]
        kind = safe.type_name(type(obj))
        in_ns = f"the global {name} is a {kind}, not an int > 1 or a DataLoader"
    return f"batch variable {name!r} not found: {in_cell}, and {in_ns}"

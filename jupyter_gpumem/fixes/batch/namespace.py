"""Batch sizes that live outside the cell: in a config, a DataLoader, or an earlier cell.

- a config the cell (or a notebook function it calls) reads: ``args.batch_size`` (an argparse or
  simple namespace), ``cfg["batch_size"]`` (a dict), a dataclass field; changed on a copy bound to
  the same name, so the transaction's rollback puts the original back;
- where a value was set, for "make it permanent": the latest cell of the history (``In``) that
  assigns the name, and the line in it that carries the number
  (``In [3], line 2: train_loader = DataLoader(ds, batch_size=144)``).
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import re
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from jupyter_gpumem.cells import source as cellsource

_BATCH_NAME = re.compile(r"(^|_)(batch_?size|bs|bsz|micro_?batch(_size)?)$", re.IGNORECASE)
_MAX_KEYS = 200


def is_batch_name(name: str) -> bool:
    """``batch_size``, ``bs``, ``train_bsz``, ``per_device_train_batch_size``, ``micro_batch``..."""
    return bool(_BATCH_NAME.search(name))


def config_items(obj: object) -> Iterator[tuple[str, int, bool]]:
    """(key, value, is_item) of the batch-named int settings of a config object."""
    items: list[tuple[Any, Any]]
    is_item = isinstance(obj, dict)
    try:
        if is_item:
            assert isinstance(obj, dict)
            items = list(obj.items())[:_MAX_KEYS]
        elif isinstance(obj, (argparse.Namespace, types.SimpleNamespace)):
            items = list(vars(obj).items())[:_MAX_KEYS]
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            items = [(f.name, getattr(obj, f.name, None)) for f in dataclasses.fields(obj)]
        else:
            return
    except Exception:  # a user object may raise anything
        return
    for key, value in items:
        if isinstance(key, str) and type(value) is int and value >= 1 and is_batch_name(key):
            yield key, value, is_item


def config_name(var: str, key: str, is_item: bool) -> str:
    return f"{var}[{key!r}]" if is_item else f"{var}.{key}"


def with_setting(obj: object, key: str, value: int, is_item: bool) -> object:
    """A copy of the config with ``key`` set to ``value``."""
    if is_item:
        assert isinstance(obj, dict)
        new = dict(obj)
        new[key] = value
        return new
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        try:
            return dataclasses.replace(obj, **{key: value})
        except (TypeError, ValueError):  # init=False fields: copy and set
            pass
    new_obj = copy.copy(obj)
    object.__setattr__(new_obj, key, value)
    return new_obj


# -- where a value was set --------------------------------------------------------------------


def _assigns(tree: ast.AST, name: str) -> list[ast.stmt]:
    found: list[ast.stmt] = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for t in targets:
            for el in t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]:
                base = el
                while isinstance(base, (ast.Attribute, ast.Subscript)):
                    base = base.value
                if isinstance(base, ast.Name) and base.id == name:
                    found.append(node)  # type: ignore[arg-type]
    return found


def origin(
    history: Sequence[str] | None,
    var: str,
    key: str | None,
    value: int,
    skip_last: bool = True,
    own_line: bool = False,
) -> str | None:
    """``In [3], line 2: <the line>``: the latest cell that set ``var`` (and the line with the
    number ``value``, or with ``key`` in it, when the statement spans several lines).
    ``own_line``: the line that makes ``var`` itself, never an earlier setting it shares with
    others (an evaluation loader built from the training ``batch_size``)."""
    if not history:
        return None
    cells = list(history)
    last = len(cells) - 1 if skip_last else len(cells)
    number = re.compile(rf"(?<![\w.]){value}(?![\w.])")
    key_words = {key, key.replace("_", "-")} if key else set()
    for n in range(last - 1, 0, -1):
        src = cells[n]
        if not isinstance(src, str) or var not in src:
            continue
        tree = cellsource.read(src).tree
        if tree is None:
            continue
        stmts = _assigns(tree, var)
        if not stmts:
            continue
        lines = src.splitlines()
        # the number, a line naming the key, else the assignment; earlier lines of the same cell
        # too (argparse: `add_argument('--batch-size', default=64)` lines before `args = ...`)
        last_line = max((s.end_lineno or s.lineno) for s in stmts)
        window = range(1, last_line + 1)
        for want in (
            lambda t: not own_line and number.search(t) and any(k in t for k in key_words),
            lambda t: number.search(t) and var in t,
            lambda t: any(k in t for k in key_words) if key_words else False,
        ):
            hit = [i for i in window if want(lines[i - 1])]
            if hit:
                i = hit[-1]
                return f"In [{n}], line {i}: {lines[i - 1].strip()}"
        s = stmts[-1]
        return f"In [{n}], line {s.lineno}: {lines[s.lineno - 1].strip()}"
    return None


def history_of(namespace: Mapping[str, object]) -> Sequence[str] | None:
    """IPython's input history (``In``), if the namespace has it."""
    hist = namespace.get("In")
    return hist if isinstance(hist, list) else None

"""The batch sizes written in a cell: assignments, keywords, tensor factories' leading
dimensions, ``[x] * n`` and numbers passed to notebook functions."""

from __future__ import annotations

import ast
import builtins

from jupyter_gpumem.cells import source as cellsource
from jupyter_gpumem.cells.source import dotted as _dotted
from jupyter_gpumem.fixes.batch.namespace import is_batch_name
from jupyter_gpumem.fixes.batch.sites import (
    _FACTORIES,
    _TORCH_MODULES,
    BatchSite,
    _char_cols,
    _int_value,
)

# -- finding ------------------------------------------------------------------------------


class _Finder:
    def __init__(self, tree: ast.Module, lines: list[str], skip: set[int]) -> None:
        self.tree, self.lines, self.skip = tree, lines, skip
        self.sites: list[BatchSite] = []
        self.near_misses: list[str] = []
        self.weights: set[int] = set()  # ids of factory calls that make weights
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _callee(node) == "Parameter":
                self.weights.update(id(a) for a in node.args)

    def site(self, kind: str, name: str, lit: ast.expr, value: int) -> None:
        lineno = lit.lineno
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
        return getattr(node, "lineno", 0)

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

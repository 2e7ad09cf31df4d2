"""Was the cell evaluating when it ran out of memory? Then only the evaluation batch changes.

An OOM in evaluation must not shrink the training batch (the Hugging Face Trainer's
``auto_find_batch_size`` does, transformers issue 32215): the evaluation batch has no learning rate
tied to it, and the training batch fitted. Read from the failure without running user code:

- the notebook function it failed in is named for evaluation (``test()``, ``evaluate()``,
  ``validate()``, pytorch/examples' names);
- the failing loop runs under ``torch.no_grad()``, ``torch.inference_mode()`` or
  ``torch.set_grad_enabled(False)``, or after ``model.eval()`` with no ``.train()`` between;
- the failing loop iterates an evaluation loader (``for x in val_loader``), or a container of
  loaders at a key that held ``"val"`` when it failed (``dataloaders[phase]``, torchvision's
  fine-tuning tutorial).
"""

from __future__ import annotations

import ast
import linecache
import re
from typing import TYPE_CHECKING

from jupyter_gpumem.cells import source as cellsource
from jupyter_gpumem.fixes.batch.sites import is_eval_name

if TYPE_CHECKING:
    from jupyter_gpumem.cells.failure import FailedCell

__all__ = ["evaluation_reason"]

_NO_GRAD = re.compile(
    r"\b(no_grad|inference_mode)\s*\(|set_grad_enabled\s*\(\s*(False|0)\s*\)|\.eval\s*\(\s*\)"
)
_TRAIN = re.compile(r"\.train\s*\(\s*(True)?\s*\)|set_grad_enabled\s*\(\s*True\s*\)")


def evaluation_reason(failed: FailedCell) -> str | None:
    """Why the failure was in evaluation (``in `test()```), or None where it was not, or
    nothing says so."""
    for qualname, _line in reversed(failed.frames):
        if is_eval_name(qualname.rsplit(".", 1)[-1]):
            return f"in `{qualname}()`"
    loop = failed.loop
    if loop is None:
        return None
    tree = _tree_of(loop.filename)
    if tree is None:
        return None
    node = _loop_at(tree, loop.lineno)
    if node is None:
        return None
    iterated = ast.unparse(node.iter)
    names = {n.id for n in ast.walk(node.iter) if isinstance(n, ast.Name)}
    plain = dict(failed.plain_values or {})
    for values in getattr(failed, "frame_values", ()):  # a loop in a function: its own locals
        plain.update(values)
    keys = [
        plain.get(n.slice.id)
        for n in ast.walk(node.iter)
        if isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Name)
    ]
    if any(is_eval_name(n) for n in names) or any(
        isinstance(k, str) and is_eval_name(k) for k in keys
    ):
        return f"in a loop over `{iterated}`"
    return _no_grad_before(tree, node)


def _tree_of(filename: str) -> ast.Module | None:
    text = "".join(linecache.getlines(filename))
    if not text:
        return None
    return cellsource.read(text).tree


def _loop_at(tree: ast.Module, lineno: int) -> ast.For | ast.AsyncFor | None:
    for node in ast.walk(tree):
        if isinstance(node, (ast.For, ast.AsyncFor)) and node.lineno == lineno:
            return node
    return None


def _no_grad_before(tree: ast.Module, loop: ast.AST) -> str | None:
    """``under `torch.no_grad()``` when a ``with`` around the loop turns gradients off; ``after
    `model.eval()``` when a statement on the way to the loop calls ``.eval()`` with no
    ``.train()`` after it. A call inside an ``if`` says nothing (torchvision's tutorial calls
    ``model.train()`` or ``model.eval()`` by phase): only the straight path counts."""
    mode = None
    for block in _path(tree, loop):
        for item in getattr(block, "items", ()):
            text = ast.unparse(item.context_expr)
            if _NO_GRAD.search(text):
                return f"under `{text}`"
        for stmt in _before(block, loop):
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
                text = ast.unparse(stmt.value)
                if re.search(r"\.eval\(\)$", text):
                    mode = text
                elif _TRAIN.search(text):
                    mode = None
    return f"after `{mode}`" if mode else None


def _path(tree: ast.AST, target: ast.AST) -> list[ast.AST]:
    """The nodes from ``tree`` down to ``target``'s parent, outermost first."""
    path: list[ast.AST] = []
    node: ast.AST | None = tree
    while node is not None and node is not target:
        path.append(node)
        node = next(
            (c for c in ast.iter_child_nodes(node) if _contains(c, target) or c is target), None
        )
    return path


def _before(block: ast.AST, target: ast.AST) -> list[ast.stmt]:
    """The statements of ``block``'s body that come before the one holding ``target``."""
    body = getattr(block, "body", None)
    if not isinstance(body, list):
        return []
    line = getattr(target, "lineno", 0)
    return [s for s in body if isinstance(s, ast.stmt) and (s.end_lineno or s.lineno) < line]


def _contains(outer: ast.AST, inner: ast.AST) -> bool:
    start, end = getattr(outer, "lineno", 0), getattr(outer, "end_lineno", 0) or 0
    return outer is not inner and start <= getattr(inner, "lineno", -1) <= end

"""What a batch size is and where it sits: the sites found in a cell or its namespace, the
finding, and the cell's one reading (shared by finding, changing and accumulating)."""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from jupyter_gpumem.cells import source as cellsource

_EVAL_NAME = re.compile(
    r"(^|[_\W])(eval|evaluate|val|valid|validate|validation|test|infer|inference|predict)([_\W]|$)",
    re.I,
)


def is_eval_name(name: str) -> bool:
    """``test_loader``, ``dataloaders['val']``, ``trainer.eval_loader``, ``evaluate``."""
    return bool(_EVAL_NAME.search(name))


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
    # DataLoaders kept in a container or an object: site name -> (variable, key, how, holder),
    # ``how`` "item" (a dict or list entry) or "attr" (an attribute)
    entries: Mapping[str, tuple[str, object, str, object]] = field(
        default_factory=dict, compare=False, repr=False
    )
    # why the failure was in evaluation ("in `test()`"), when it was: only that batch changes
    evaluation: str | None = None


@dataclass(frozen=True)
class AccumulationPlan:
    """The cell rewritten to keep the effective batch with gradient accumulation."""

    source: str
    steps: int
    effective_batch: int
    explanation: str


# -- parsing ------------------------------------------------------------------------------


_split_lines = cellsource.lines_with_ends


def _parse(source: str) -> tuple[ast.Module | None, set[int], str | None]:
    """(tree, lines not to touch, why not): the cell's one reading, whose tree is numbered as
    the cell's lines and is shared (read, never changed, here)."""
    reading = cellsource.read(source)
    return reading.tree, set(reading.changed), reading.why


def _char_cols(line: str, start: int, end: int) -> tuple[int, int]:
    raw = line.encode()
    return len(raw[:start].decode(errors="replace")), len(raw[:end].decode(errors="replace"))


def _int_value(node: ast.AST | None) -> int | None:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    return None

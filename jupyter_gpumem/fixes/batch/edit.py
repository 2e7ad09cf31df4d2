"""Changing the batch size: edits spliced into the cell's own text, DataLoaders rebuilt, config
settings replaced, and "make it permanent" in words."""

from __future__ import annotations

import re
from typing import Any

from jupyter_gpumem.fixes.batch.namespace import copy_with, with_setting
from jupyter_gpumem.fixes.batch.sites import _NOT_FOUND, BatchFinding, _split_lines

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
        if s.kind == "dataloader" and s.name in finding.entries:
            var, key, how, holder = finding.entries[s.name]
            new_loader = rebuild_loader(finding.loaders[s.name], new_value)
            updates[var] = _with_entry(updates.get(var, holder), key, how, new_loader)
        elif s.kind == "dataloader":
            updates[s.name] = rebuild_loader(finding.loaders[s.name], new_value)
        elif s.kind == "config":
            var, key, is_item, obj = finding.configs[s.name]
            updates[var] = with_setting(updates.get(var, obj), key, new_value, is_item)
        else:
            updates[s.name] = new_value
    return new_source, updates


def _with_entry(holder: object, key: object, how: str, value: object) -> object:
    """A copy of the dict, list, tuple or object with one entry set: bound to the same name, so
    the transaction's rollback puts the original back, and nothing else holding the original
    sees a loader it did not ask for. Made without running the holder's code (no ``items()`` of a
    dict subclass, no ``__getattr__``, ``__copy__`` or ``__setstate__``): ``ValueError`` where an
    object cannot be copied so."""
    if isinstance(holder, dict):
        new = dict(dict.items(holder))
        new[key] = value
        return new
    if isinstance(holder, (list, tuple)) and isinstance(key, int):
        items = list(list.__iter__(holder) if isinstance(holder, list) else tuple.__iter__(holder))
        items[key] = value
        if isinstance(holder, list):
            return items
        maker = getattr(type(holder), "_make", None)  # a namedtuple: its fields kept
        return maker(items) if callable(maker) else type(holder)(items)
    return copy_with(holder, str(key), value)


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
    # a line that builds a loader from the setting (`batch_size=opt.batchSize`) follows the line
    # that sets it: only the line with the number changes
    written = {w for w in finding.origins.values() if _writes(w, finding.value)}
    for s in finding.sites:
        if s.lineno is not None:
            continue
        where = finding.origins.get(s.name)
        if where is not None and written and where not in written:
            continue
        if where is not None:
            if where not in done:
                parts.append(_change_origin(where, s.value, new_value))
            done.add(where)
        elif s.kind == "dataloader" and s.name in finding.entries:
            parts.append(
                f"set {s.name} = DataLoader({s.name}.dataset, batch_size={new_value}, ...) "
                "where it is made (only this one)"
            )
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


def _writes(where: str, value: int) -> bool:
    """The origin line ``In [3], line 2: ...`` carries the number ``value`` once."""
    text = where.partition(": ")[2]
    return len(re.findall(rf"(?<![\w.]){value}(?![\w.])", text)) == 1


def _change_origin(where: str, old: int, new: int) -> str:
    """``In [3], line 2: ...(batch_size=2048)`` -> ``change In [3], line 2 to: ...(batch_size=144)``."""
    head, _, text = where.partition(": ")
    number = re.compile(rf"(?<![\w.]){old}(?![\w.])")
    if len(number.findall(text)) == 1:
        return f"change {head} to: {number.sub(str(new), text)}"
    return f"in {head} ({text}), make the batch {new}"

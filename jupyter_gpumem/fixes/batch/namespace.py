"""Batch sizes that live outside the cell: in a config, a DataLoader, or an earlier cell.

- a config the cell (or a notebook function it calls) reads: ``args.batch_size`` (an argparse or
  simple namespace), ``cfg["batch_size"]`` (a dict), a dataclass field; changed on a copy bound to
  the same name, so the transaction's rollback puts the original back. Read and copied as
  ``rescue.safe`` reads the user's objects: no property, ``__getattr__``, ``items()``, ``__init__``
  or ``__copy__`` of theirs runs, except a dataclass's own ``__post_init__`` (the copy is its
  ``dataclasses.replace``, so what it derives from the batch follows);
- where a value was set, for "make it permanent": the latest cell of the history (``In``) that
  assigns the name, and the line in it that carries the number
  (``In [3], line 2: train_loader = DataLoader(ds, batch_size=144)``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import types
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from itertools import islice
from typing import Any, cast

from jupyter_gpumem.cells import source as cellsource
from jupyter_gpumem.rescue import safe

_BATCH_NAME = re.compile(r"(^|_)(batch_?size|bs|bsz|micro_?batch(_size)?)$", re.IGNORECASE)
_MAX_KEYS = 200


def is_batch_name(name: str) -> bool:
    """``batch_size``, ``bs``, ``train_bsz``, ``per_device_train_batch_size``, ``micro_batch``..."""
    return bool(_BATCH_NAME.search(name))


def config_items(obj: object) -> Iterator[tuple[str, int, bool]]:
    """(key, value, is_item) of the batch-named int settings of a config object: a dict (its
    entries read as ``dict`` stores them, never a subclass's own ``items()``), an argparse or
    simple namespace, or a dataclass (their attributes read from the instance dictionary and
    slots, never through a property or ``__getattr__``). Only settings a copy can change
    without running the object's code (``with_setting``)."""
    tp = type(obj)
    if safe.is_a(tp, dict):
        for key, value in islice(dict.items(cast(dict, obj)), _MAX_KEYS):
            if (setting := _setting(key, value)) is not None:
                yield *setting, True
        return
    fields = safe.class_attr(tp, "__dataclass_fields__")
    if not _is_dataclass(tp) and not any(safe.is_a(tp, c) for c in _NAMESPACES):
        return
    attrs = _attributes(obj)
    if attrs is None:
        return
    names = list(fields) if type(fields) is dict else list(attrs)
    for key in names[:_MAX_KEYS]:
        setting = _setting(key, attrs.get(key))
        if setting is not None and _settable(tp, setting[0], attrs):
            yield *setting, False


_NAMESPACES = (argparse.Namespace, types.SimpleNamespace)


def _setting(key: object, value: object) -> tuple[str, int] | None:
    """(key, value) where it is a batch-named int setting."""
    if type(key) is str and type(value) is int and value >= 1 and is_batch_name(key):
        return key, value
    return None


def _attributes(obj: object) -> dict[str, Any] | None:
    """The instance's own attributes (dictionary and slots), read through C descriptors."""
    tp = type(obj)
    d = safe.instance_dict(obj)
    attrs = dict(dict.items(d)) if d is not None else {}
    attrs.update(safe.slot_values(obj, safe.slot_descriptors(tp)))
    return attrs if d is not None or attrs else None


def _settable(tp: type, key: str, attrs: dict[str, Any]) -> bool:
    """A copy can be made and ``key`` set on it without running the class's code: the class is
    made by a C ``__new__`` (``object``'s, a builtin's), and ``key`` is a plain attribute (in the
    instance dictionary, not shadowed by a property or other data descriptor) or a slot."""
    if _c_new(tp) is None or key not in attrs:
        return False
    if any(name == key for name, _desc in safe.slot_descriptors(tp)):
        return True
    on_class = safe.class_attr(tp, key)
    return on_class is safe.MISSING or safe.class_attr(type(on_class), "__set__") is safe.MISSING


def _c_new(tp: type) -> Any:
    """The class's ``__new__`` where it is C code (``object.__new__``, ``SimpleNamespace``'s), else
    None (a ``__new__`` written in Python is the class's own code)."""
    new = safe.class_attr(tp, "__new__")
    return new if type(new) is types.BuiltinFunctionType else None


def config_name(var: str, key: str, is_item: bool) -> str:
    return f"{var}[{key!r}]" if is_item else f"{var}.{key}"


def with_setting(obj: object, key: str, value: int, is_item: bool) -> object:
    """A copy of the config with ``key`` set to ``value``, made without running its code (no
    ``__init__``, ``__copy__``, ``__setattr__``, property or ``items()`` of the object's): an
    instance of the same class whose entries and attributes are the original's. A dataclass
    with a ``__post_init__`` is the exception: ``dataclasses.replace``, so that what it derives
    follows. ``ValueError`` where no copy can be made (``config_items`` offers no such key)."""
    if is_item:
        return _dict_with(cast(dict, obj), key, value)
    tp = type(obj)
    if _is_dataclass(tp) and safe.class_attr(tp, "__post_init__") is not safe.MISSING:
        # what it derives from its fields (steps per epoch from the batch) follows the new
        # value: its own ``replace``, which runs ``__init__`` and ``__post_init__``, as the
        # user's ``dataclasses.replace(cfg, batch_size=...)`` would
        try:
            return dataclasses.replace(obj, **{key: value})  # type: ignore[type-var]
        except (TypeError, ValueError):  # an init=False field: set on a copy
            pass
    return copy_with(obj, key, value)


def _is_dataclass(tp: type) -> bool:
    return type(safe.class_attr(tp, "__dataclass_fields__")) is dict


def _dict_with(d: dict[Any, Any], key: str, value: object) -> dict[Any, Any]:
    """A copy of the dict with one entry set: of the same class where a C ``__new__`` makes it
    (its attributes copied too), else a plain dict."""
    tp = type(d)
    new_fn = _c_new(tp) if tp is not dict else None
    new: dict[Any, Any] = new_fn(tp) if new_fn is not None else {}
    items, setitem = list(dict.items(d)), dict.__setitem__
    if isinstance(d, OrderedDict) and isinstance(new, OrderedDict):
        # the C methods of OrderedDict keep its own order (dict's would leave it empty to list())
        items, setitem = list(OrderedDict.items(d)), OrderedDict.__setitem__
    for k, v in items:
        setitem(new, k, v)
    setitem(new, key, value)
    if isinstance(d, defaultdict) and isinstance(new, defaultdict):
        factory = defaultdict.__dict__["default_factory"]  # a C member: no user code
        factory.__set__(new, factory.__get__(d))
    attrs, target = safe.instance_dict(d), safe.instance_dict(new)
    if attrs is not None and target is not None:
        target.update(attrs)
    return new


def copy_with(obj: object, key: str, value: object) -> object:
    """A shallow copy of ``obj`` with its attribute ``key`` set to ``value``, made without running
    the object's code; ``ValueError`` where that cannot be done."""
    tp = type(obj)
    attrs = _attributes(obj)
    new_fn = _c_new(tp)
    if attrs is None or new_fn is None or not _settable(tp, key, attrs):
        raise ValueError(f"{key} cannot be changed on a copy without running its class's code")
    new = new_fn(tp)
    slots = safe.slot_descriptors(tp)
    d, target = safe.instance_dict(obj), safe.instance_dict(new)
    if d is not None:
        if target is None:
            raise ValueError(f"a copy of {safe.type_name(tp)} has no attributes of its own")
        dict.update(target, d)
    safe.put_slots(new, slots, safe.slot_values(obj, slots))
    slot = dict(slots).get(key)
    if slot is not None:
        slot.__set__(new, value)
    elif target is not None:
        target[key] = value
    return new


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
    return hist if type(hist) is list else None

"""The kinds of object a fix's snapshot meets, told from their type alone, and where the notebook
keeps state besides its namespace (its own modules, the logging handlers).

A kind says how an object is copied and put back (``copies``) and what the walk looks into next
(``reach``). It is read from the type's MRO (``safe.is_a``), never from the object: no
``isinstance`` (it asks ``obj.__class__``), no ABC's ``__subclasshook__``.
"""

from __future__ import annotations

import _io
import collections
import functools
import io
import os
import random
import sys
import types
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

from jupyter_gpumem.backends import torch_state
from jupyter_gpumem.rescue import safe

(
    SKIP, WALK, LIST, DICT, SET, DEQUE, BYTEARRAY, OBJECT, CLASS, FUNCTION, PARTIAL, METHOD,
    TENSOR, MODEL, OPTIMIZER, TORCH_STATE, RNG, NDARRAY, FILE, GENERATOR, ITERATOR, EXTERNAL,
    OPAQUE, BUILTIN_METHOD,
) = range(24)  # fmt: skip
# the host's own objects (the shell behind `get_ipython`, its history) and ours are not the notebook's
HOSTS = ("IPython", "ipykernel", "traitlets", "zmq", "jupyter_client", "jupyter_gpumem", "_pytest")
CONTAINERS = (LIST, DICT, SET, DEQUE, BYTEARRAY)
PLAIN = (
    str, bytes, int, float, complex, bool, type(None), range, slice, type(Ellipsis),
    types.ModuleType, types.CodeType,
    types.MappingProxyType, memoryview,
    weakref.ReferenceType, weakref.ProxyType, weakref.CallableProxyType,
)  # fmt: skip
GENERATORS = (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)
# external state, by (module, class): what a re-run does through them stays done
EXTERNAL_TYPES = {
    ("socket", "socket"): "a socket",
    ("sqlite3", "Connection"): "an SQLite connection",
    ("sqlite3", "Cursor"): "an SQLite cursor",
    ("threading", "Thread"): "a thread",
    ("subprocess", "Popen"): "a process",
    ("multiprocessing.pool", "Pool"): "a process pool",
}
ITERATE = ((list, list.__iter__), (tuple, tuple.__iter__), (set, set.__iter__),
            (frozenset, frozenset.__iter__), (collections.deque, collections.deque.__iter__))  # fmt: skip

# the files whose size and position can be put back (a library's file-like object cannot)
FILE_TYPES = (
    io.TextIOWrapper,
    io.BufferedWriter,
    io.BufferedRandom,
    io.FileIO,
    io.StringIO,
    io.BytesIO,
)


def classify(tp: type) -> int:
    """The kind of a type's objects, read from its MRO (nothing of the class runs)."""
    if issubclass(tp, PLAIN) or safe.type_module(tp).split(".")[0] in HOSTS:
        return SKIP
    if tp is types.BuiltinMethodType:
        return BUILTIN_METHOD
    k = _torch_kind(tp) or _numpy_kind(tp) or container_kind(tp)
    if k:
        return k
    if safe.is_a(tp, random.Random):
        return RNG
    return object_kind(tp)


def _torch_kind(tp: type) -> int:
    torch = sys.modules.get("torch")
    if torch is None:
        return 0
    for base, k in (
        (torch.Tensor, TENSOR),
        (torch.nn.Module, MODEL),
        (torch.optim.Optimizer, OPTIMIZER),
        (torch.Generator, RNG),
    ):
        if safe.is_a(tp, base):
            return k
    if safe.type_module(tp).startswith("torch.") and torch_state.has_plain_state_type(tp):
        return TORCH_STATE
    return 0


def _numpy_kind(tp: type) -> int:
    np = sys.modules.get("numpy")
    if np is None:
        return 0
    if safe.is_a(tp, np.ndarray):
        return NDARRAY
    rnd = sys.modules.get("numpy.random")  # not imported just to ask
    if rnd is not None and (safe.is_a(tp, rnd.Generator) or safe.is_a(tp, rnd.RandomState)):
        return RNG
    return 0


def container_kind(tp: type) -> int:
    for base, k in (
        (dict, DICT),
        (list, LIST),
        (set, SET),
        (collections.deque, DEQUE),
        (bytearray, BYTEARRAY),
        (tuple, WALK),
        (frozenset, WALK),
    ):
        if safe.is_a(tp, base):
            return k
    return 0


def object_kind(tp: type) -> int:
    for base, k in (
        (type, CLASS),
        (types.FunctionType, FUNCTION),
        (types.MethodType, METHOD),
        (functools.partial, PARTIAL),
        (_io._IOBase, FILE),
    ):
        if safe.is_a(tp, base):
            return k
    if issubclass(tp, GENERATORS):
        return GENERATOR
    if any(
        safe.type_module(c) == m and safe.type_name(c) == n
        for c in safe.mro(tp)
        for m, n in EXTERNAL_TYPES
    ):
        return EXTERNAL
    if safe.class_attr(tp, "__next__") is not safe.MISSING:
        restorable = safe.class_attr(tp, "__setstate__") is not safe.MISSING
        return ITERATOR if restorable and safe.type_module(tp) == "builtins" else EXTERNAL
    return OBJECT


def iterate(obj: Any) -> Iterable[Any]:
    for base, iterator in ITERATE:
        if safe.is_a(type(obj), base):
            return list(iterator(obj))
    return ()


def container_bytes(obj: Any, k: int) -> int:
    """The host memory a shallow copy of the container takes (its own size, as the C type counts)."""
    base: Any = {LIST: list, DICT: dict, SET: set, DEQUE: collections.deque, BYTEARRAY: bytearray}
    return int(base[k].__sizeof__(obj))


def code_names(code: types.CodeType) -> set[str]:
    """The global (and attribute) names a function's code and its nested code read."""
    names: set[str] = set()
    stack = [code]
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        stack += [k for k in c.co_consts if isinstance(k, types.CodeType)]
    return names


# ---- the notebook's own modules, logging --------------------------------------------------------


def local_modules(ns: dict[str, Any] | None = None) -> list[types.ModuleType]:
    """Modules the notebook imported from its own folder (the kernel's working directory), not
    from an installed package: their attributes are the notebook's state too. With ``ns``, only
    those the namespace refers to (``import helpers``, ``from helpers import log``)."""
    here = os.getcwd() + os.sep
    wanted = _referred_modules(ns) if ns is not None else None
    prefixes = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})
    found = []
    for name, module in list(sys.modules.items()):
        if name == "__main__" or name.split(".")[0] == "jupyter_gpumem":
            continue
        if wanted is not None and name not in wanted:
            continue
        d = safe.instance_dict(module) if type(module) is types.ModuleType else None
        path = d.get("__file__") if d is not None else None
        if not isinstance(path, str) or not path.startswith(here):
            continue
        if path.startswith(prefixes) or "site-packages" in path or "dist-packages" in path:
            continue
        found.append(module)
    return found


def _referred_modules(ns: dict[str, Any]) -> set[str]:
    """The modules the namespace's values are, or come from (read by type, nothing run)."""
    found = set()
    for v in list(dict.values(ns)):
        tp = type(v)
        if tp is types.ModuleType:
            d = safe.instance_dict(v) or {}
            found.add(d.get("__name__"))
        elif tp is types.FunctionType:
            found.add(types.FunctionType.__dict__["__module__"].__get__(v))
        elif safe.is_a(tp, type):
            found.add(safe.type_module(v))
    return {m for m in found if isinstance(m, str)}


def logging_handlers() -> Iterator[Any]:
    """The handlers of every logger (their streams: files a rehearsal writes to), read by type."""
    logging = sys.modules.get("logging")
    if logging is None:
        return
    d = safe.instance_dict(logging) or {}
    root = d.get("root")
    manager = (safe.instance_dict(root) or {}).get("manager") if root is not None else None
    loggers = [root, *dict.values((safe.instance_dict(manager) or {}).get("loggerDict", {}))]
    for logger in loggers:
        handlers = (
            (safe.instance_dict(logger) or {}).get("handlers") if logger is not None else None
        )
        if type(handlers) is list:
            yield from handlers

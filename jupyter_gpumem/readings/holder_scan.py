"""Reading the user's objects without running their code: the holders scan's only way in.

Anything reached through Python-level attribute access can run the user's code: an overridden
``values()`` or ``parameters()``, a ``__dict__`` or ``__class__`` property, ``__getattr__``,
``__iter__`` or ``__len__`` of a subclass, even ``isinstance`` (it falls back to ``obj.__class__``)
and a metaclass's ``__hash__`` (a type used as a dict key). That code may print, raise, sleep for
seconds or fetch a dataset. So this module reads only through C:

- types by ``type(obj)`` and ``issubclass`` against known classes, cached by ``id(type)``;
- builtin containers and their subclasses through the base class's unbound C methods
  (``dict.values(d)``, ``list.__iter__(xs)``), never the subclass's own;
- other objects through their instance ``__dict__``, taken with the C ``__dict__`` descriptor of
  the first class that has one (never a ``__dict__`` property), else ``gc.get_referents``;
- models and optimizers through their ``_parameters``, ``_buffers``, ``_modules`` and ``state``
  dicts, tensors through ``torch._C.TensorBase``'s own descriptors.

What cannot be read that way (a tensor subclass with its own ``untyped_storage``) is skipped and
counted, as is anything that raises anyway: one object never costs the whole diagnosis.
"""

from __future__ import annotations

import gc
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, islice
from types import (
    BuiltinFunctionType,
    FunctionType,
    GetSetDescriptorType,
    MethodType,
    ModuleType,
)
from typing import Any

from jupyter_gpumem.backends import MemoryBackend, active

MAX_ITEMS = 1000  # entries looked at per container / object: bounded even for a list of 1e6 items
CLOCK_EVERY = 256  # items between two reads of the clock inside one container or model
MAX_REASONS = 3  # skipped objects named in HolderSet.skipped_reasons

_SKIP_TYPES = (
    str, bytes, bytearray, memoryview, int, float, complex, bool, type(None), type, range, slice,
    FunctionType, BuiltinFunctionType, MethodType, ModuleType,
    # a weak reference keeps nothing alive, and a dead proxy raises on any use
    weakref.ReferenceType, weakref.ProxyType, weakref.CallableProxyType,
)  # fmt: skip
# the base classes whose C iterator reads a subclass's storage without its own __iter__
_ITERATORS: tuple[tuple[type, Callable[[Any], Iterable[Any]]], ...] = (
    (dict, dict.values),
    (list, list.__iter__),
    (tuple, tuple.__iter__),
    (set, set.__iter__),
    (frozenset, frozenset.__iter__),
    (deque, deque.__iter__),
)
# a tensor subclass that redefines one of these would run its code when its storage is read
_TENSOR_READS = ("untyped_storage", "device", "data_ptr", "grad", "shape", "dtype", "numel")

_TYPE_DICT = type.__dict__["__dict__"]  # a class's own namespace, whatever its metaclass says
_TYPE_MRO = type.__dict__["__mro__"]
_TYPE_NAME = type.__dict__["__name__"]
_MISSING = object()

_SKIP, _DICT, _ITERABLE, _OBJECT, _TENSOR, _MODEL, _OPTIMIZER, _ALIEN = range(1, 9)
_HOLDS = _TENSOR  # kinds from here on hold GPU memory themselves; all kinds are truthy


def type_name(tp: type) -> str:
    return str(_TYPE_NAME.__get__(tp, type))


def _class_attr(tp: type, name: str) -> Any:
    """``name`` as the class defines it, descriptors not called (``inspect.getattr_static``'s
    walk, without its ``isinstance`` and metaclass lookups)."""
    for cls in _TYPE_MRO.__get__(tp, type):
        ns = _TYPE_DICT.__get__(cls, type)
        if name in ns:
            return ns[name]
    return _MISSING


class Scan:
    """One walk: counts each GPU storage once, classifies each type once.

    A namespace of 100k objects holds a few dozen types, so the classification runs per type,
    not per object. ``deadline`` stops looking into containers and objects; ``hard_deadline``
    stops everything (what was not read is counted in ``cut_short``).
    """

    def __init__(
        self, torch: Any, budget_s: float, hard_s: float, backend: MemoryBackend | None = None
    ) -> None:
        now = time.perf_counter()
        self.deadline = now + budget_s
        self.hard_deadline = now + max(hard_s, budget_s)
        self.late = False  # past the deadline: set by expired(), so the clock is read no more
        self.cut_short = 0
        self.skipped = 0
        self.reasons: list[str] = []
        # the class of every optimizer met, with state or not (Adam's appears at its first step)
        self.optimizer_types: list[str] = []
        self.storage_of = (backend or active()).storage_of  # called for every tensor: bound once
        self.seen: set[tuple[str, int]] = set()
        self.kinds: dict[
            int, int
        ] = {}  # id(type): kind; ids, since a metaclass may define __hash__
        self._iterators: dict[int, Callable[[Any], Iterable[Any]]] = {}
        self._dict_getters: dict[int, Any] = {}
        self._types: list[type] = []  # keeps the ids above meaning the same types
        self.tensor_cls, self.module_cls = torch.Tensor, torch.nn.Module
        self.optimizer_cls = torch.optim.Optimizer
        tensor_base = getattr(torch._C, "TensorBase", None) or torch._C._TensorBase  # < 2.2
        base = _TYPE_DICT.__get__(tensor_base, type)
        self._grad, self._shape, self._dtype = base["grad"], base["shape"], base["dtype"]
        self._numel = base["numel"]

    # -- bookkeeping -------------------------------------------------------------------------

    def expired(self) -> bool:
        if not self.late:
            self.late = time.perf_counter() > self.deadline
        return self.late

    def skip(self, name: str, reason: str) -> None:
        self.skipped += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(f"{name}: {reason}")

    def kind(self, obj: Any) -> int:
        tp = type(obj)
        return self.kinds.get(id(tp)) or self._classify(tp)

    def _classify(self, tp: type) -> int:
        if issubclass(tp, self.tensor_cls):
            k = _TENSOR if self._plain_tensor(tp) else _ALIEN
        elif issubclass(tp, self.module_cls):
            k = _MODEL
        elif issubclass(tp, self.optimizer_cls):
            k = _OPTIMIZER
        elif issubclass(tp, _SKIP_TYPES):
            k = _SKIP
        else:
            k = _OBJECT
            for base, iterator in _ITERATORS:
                if issubclass(tp, base):
                    k = _DICT if base is dict else _ITERABLE
                    self._iterators[id(tp)] = iterator
                    break
        self.kinds[id(tp)] = k
        self._types.append(tp)
        return k

    def _plain_tensor(self, tp: type) -> bool:
        for cls in _TYPE_MRO.__get__(tp, type):
            if cls is self.tensor_cls:
                return True
            ns = _TYPE_DICT.__get__(cls, type)
            if any(name in ns for name in _TENSOR_READS):
                return False
        return True

    # -- reading -----------------------------------------------------------------------------

    def instance_dict(self, obj: Any) -> dict[str, Any] | None:
        """``obj.__dict__`` through the C descriptor; None where the class replaced it."""
        tp = type(obj)
        getter = self._dict_getters.get(id(tp), _MISSING)
        if getter is _MISSING:
            getter = _class_attr(tp, "__dict__")
            if type(getter) is not GetSetDescriptorType:  # a property, or no dict at all
                getter = None
            self._dict_getters[id(tp)] = getter
            self._types.append(tp)
        if getter is None:
            return None
        d = getter.__get__(obj, tp)
        return d if type(d) is dict else None

    def _field(self, obj: Any, name: str) -> Any:
        d = self.instance_dict(obj)
        return dict.get(d, name) if d is not None else None

    def values(self, obj: Any) -> Iterator[Any]:
        """What a container or object refers to, one level deep, without its code."""
        iterator = self._iterators.get(id(type(obj)))
        if iterator is not None:
            return iter(iterator(obj))
        d = self.instance_dict(obj)
        if d is not None:
            return iter(dict.values(d))
        # no usable __dict__ (slots, C types, a __dict__ property): what the object references,
        # with an instance dict among them looked into
        return chain.from_iterable(
            dict.values(r) if type(r) is dict else (r,) for r in gc.get_referents(obj)
        )

    def take(self, t: Any) -> tuple[int, str]:
        info = self.storage_of(t)
        if info is None:
            return 0, ""
        key, nbytes, device = info
        if key in self.seen:
            return 0, device
        self.seen.add(key)
        return nbytes, device

    def module_tensors(self, module: Any) -> Iterator[tuple[str, Any]]:
        """("parameter" | "gradient" | "buffer", tensor) of a model and its submodules."""
        stack, seen = [module], {id(module)}
        while stack:
            m = stack.pop()
            for field, role in (("_parameters", "parameter"), ("_buffers", "buffer")):
                tensors = self._field(m, field)
                if not issubclass(type(tensors), dict):
                    continue
                for t in dict.values(tensors):
                    k = self.kind(t)
                    if k == _TENSOR:
                        yield role, t
                        grad = self._grad.__get__(t) if role == "parameter" else None
                        if grad is not None and self.kind(grad) == _TENSOR:
                            yield "gradient", grad
                    elif k == _ALIEN:
                        yield "alien", t
            subs = self._field(m, "_modules")
            if issubclass(type(subs), dict):
                for sub in dict.values(subs):
                    if self.kind(sub) == _MODEL and id(sub) not in seen:
                        seen.add(id(sub))
                        stack.append(sub)

    def optimizer_tensors(self, opt: Any) -> Iterator[Any]:
        state = self._field(opt, "state")
        if not issubclass(type(state), dict):
            return
        for per_param in islice(dict.values(state), MAX_ITEMS * 10):
            if issubclass(type(per_param), dict):
                for v in dict.values(per_param):
                    if self.kind(v) == _TENSOR:
                        yield v

    # -- holders -----------------------------------------------------------------------------

    def module(self, name: str, module: Any) -> dict[str, Any]:
        """Bytes of a model by role, plus its device."""
        out: dict[str, Any] = {"parameter": 0, "gradient": 0, "buffer": 0, "device": ""}
        for i, (role, t) in enumerate(self.module_tensors(module)):
            if i % CLOCK_EVERY == CLOCK_EVERY - 1 and time.perf_counter() > self.hard_deadline:
                self.cut_short += 1
                break
            if role == "alien":
                self.skip(name, f"a {type_name(type(t))} tensor, which redefines how it is read")
                continue
            n, dev = self.take(t)
            out[role] += n
            out["device"] = out["device"] or dev
        return out

    def optimizer(self, opt: Any) -> tuple[int, str]:
        total, device = 0, ""
        for i, t in enumerate(self.optimizer_tensors(opt)):
            if i % CLOCK_EVERY == CLOCK_EVERY - 1 and time.perf_counter() > self.hard_deadline:
                self.cut_short += 1
                break
            n, dev = self.take(t)
            total += n
            device = device or dev
        return total, device

    def contents(self, obj: Any) -> list[Any] | None:
        """The tensors, models and optimizers a container or object holds one level deep; None
        when out of time. The clock is read every ``CLOCK_EVERY`` items."""
        if self.late or self.expired():
            self.cut_short += 1
            return None
        kinds, classify = self.kinds, self._classify
        it = self.values(obj)
        found: list[Any] = []
        for _ in range(0, MAX_ITEMS, CLOCK_EVERY):
            chunk = list(islice(it, CLOCK_EVERY))
            found += [v for v in chunk if (kinds.get(id(type(v))) or classify(type(v))) >= _HOLDS]
            if len(chunk) < CLOCK_EVERY:
                break
            if self.expired():
                self.cut_short += 1  # what was found so far still counts
                break
        return found

    def describe_tensor(self, t: Any) -> str:
        shape = tuple(self._shape.__get__(t))
        return f"{shape} {str(self._dtype.__get__(t)).replace('torch.', '')}"

    def parameter_count(self, module: Any) -> int:
        return sum(self._numel(t) for role, t in self.module_tensors(module) if role == "parameter")

    def optimizer_entries(self, opt: Any) -> int:
        state = self._field(opt, "state")
        return dict.__len__(state) if issubclass(type(state), dict) else 0

"""Reading and writing the user's objects without running their code: the transaction's only way in.

``getattr(obj, "state_dict")`` runs a ``__getattr__``, a property, a metaclass; ``isinstance``
falls back to ``obj.__class__``; ``d.items()`` runs a dict subclass's own ``items``. Any of them
may raise, recurse for seconds or sleep. So the snapshot reads through C only, as the holders
scan does (``readings.holder_scan``): types by ``type(obj)`` and their ``__mro__``, instance
dictionaries through the C ``__dict__`` descriptor of the class that has one, ``__slots__``
through their member descriptors, containers through the base class's unbound C methods
(``dict.items(d)``, ``list.__iter__(xs)``). Writing back goes the same way (the instance
dictionary itself, ``type.__setattr__``), so a rollback runs no ``__setattr__`` of the user's.
"""

from __future__ import annotations

import time
from types import GetSetDescriptorType, MemberDescriptorType
from typing import Any

_TYPE_DICT = type.__dict__["__dict__"]  # a class's own namespace, whatever its metaclass says
_TYPE_MRO = type.__dict__["__mro__"]
_TYPE_NAME = type.__dict__["__name__"]
MISSING = object()


def mro(tp: type) -> tuple[type, ...]:
    return tuple(_TYPE_MRO.__get__(tp, type))


def class_dict(tp: type) -> Any:
    """The class's own namespace (a mappingproxy), without its metaclass's ``__dict__``."""
    return _TYPE_DICT.__get__(tp, type)


def type_name(tp: type) -> str:
    return str(_TYPE_NAME.__get__(tp, type))


_TYPE_MODULE = type.__dict__["__module__"]


def type_module(tp: type) -> str:
    """The class's module, as ``type`` itself reads it (a C type's from its name: ``builtins``)."""
    try:
        module = _TYPE_MODULE.__get__(tp, type)
    except Exception:
        return ""
    return module if isinstance(module, str) else ""


def is_a(tp: type, base: type | None) -> bool:
    """``issubclass`` by the MRO: no ``__subclasscheck__`` of an ABC or a metaclass runs."""
    return base is not None and base in mro(tp)


def class_attr(tp: type, name: str) -> Any:
    """``name`` as the classes define it (descriptors not called), or MISSING."""
    for cls in mro(tp):
        ns = class_dict(cls)
        if name in ns:
            return ns[name]
    return MISSING


def instance_dict(obj: Any) -> dict[str, Any] | None:
    """``obj.__dict__`` through the C descriptor; None where the class replaced it or has none."""
    tp = type(obj)
    getter = class_attr(tp, "__dict__")
    if type(getter) not in (GetSetDescriptorType, MemberDescriptorType):
        return None
    try:
        d = getter.__get__(obj, tp)
    except Exception:
        return None
    return d if type(d) is dict else None


def slot_descriptors(tp: type) -> list[tuple[str, Any]]:
    """(name, member descriptor) of every ``__slots__`` entry along the MRO."""
    found = []
    for cls in mro(tp):
        ns = class_dict(cls)
        slots = ns.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            desc = ns.get(name) if isinstance(name, str) else None
            if type(desc) is MemberDescriptorType:
                found.append((name, desc))
    return found


def slot_values(obj: Any, slots: list[tuple[str, Any]]) -> dict[str, Any]:
    """The slots that are set."""
    out = {}
    for name, desc in slots:
        try:
            out[name] = desc.__get__(obj, type(obj))
        except AttributeError:
            continue
    return out


def put_slots(obj: Any, slots: list[tuple[str, Any]], saved: dict[str, Any]) -> None:
    for name, desc in slots:
        current = slot_values(obj, [(name, desc)]).get(name, MISSING)
        value = saved.get(name, MISSING)
        if current is value:
            continue
        if value is MISSING:
            desc.__delete__(obj)
        else:
            desc.__set__(obj, value)


def put_dict(d: dict[str, Any], saved: dict[str, Any]) -> bool:
    """Make ``d`` hold ``saved``'s entries again (by identity); True if it had changed."""
    if len(d) == len(saved) and all(dict.get(d, k, MISSING) is v for k, v in saved.items()):
        return False
    dict.clear(d)
    dict.update(d, saved)
    return True


class Budget:
    """A walk's limits: a deadline, and what was skipped (counted, a few named)."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.perf_counter() + seconds
        self.late = False
        self.skipped = 0
        self.reasons: list[str] = []

    def expired(self) -> bool:
        if not self.late:
            self.late = time.perf_counter() > self.deadline
        return self.late

    def skip(self, where: str, exc: BaseException) -> None:
        self.skipped += 1
        if len(self.reasons) < 3:
            self.reasons.append(f"`{where}` could not be read ({type(exc).__name__})")

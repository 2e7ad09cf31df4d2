"""One saved copy per kind of object the snapshot reaches, and putting it back.

Each copy is taken and put back by type (``safe``): containers through their base class's C
methods, objects through their own ``__dict__`` and slot descriptors, classes with
``type.__setattr__``, closure cells by ``cell_contents``; random generators by their state; files
by their size and position (truncated and sought back: what a rehearsal wrote through a file the
notebook holds open is gone again); NumPy arrays in place (``np.copyto``). ``restore`` returns a
sentence for what could not be put back, else None. Models, optimizers and tensors are
``backends.torch_state``'s.
"""

from __future__ import annotations

import collections
import io
import os
import random
import stat
import sys
import types
from dataclasses import dataclass
from typing import Any

from jupyter_gpumem.rescue import kinds as r
from jupyter_gpumem.rescue import safe

_MISSING = safe.MISSING


class Saved:
    """A copy of one object; ``restore`` puts it back and returns what it could not."""

    where = ""

    def restore(self) -> str | None:
        raise NotImplementedError


@dataclass
class Container(Saved):
    obj: Any
    kind: int
    content: Any

    def restore(self) -> str | None:
        put_container(self.obj, self.kind, self.content)
        return None


def copy_container(obj: Any, kind: int) -> Container:
    if kind == r.DICT:
        return Container(obj, kind, list(dict.items(obj)))
    if kind == r.BYTEARRAY:
        return Container(obj, kind, bytes(obj))
    return Container(obj, kind, list(r.iterate(obj)))


def put_container(obj: Any, kind: int, saved: Any) -> None:
    """Back to ``saved`` through the base class's C methods; untouched when nothing changed."""
    if kind == r.DICT:
        current = list(dict.items(obj))
        if len(current) == len(saved) and all(
            k is k2 and v is v2 for (k, v), (k2, v2) in zip(current, saved, strict=True)
        ):
            return  # (values compared by identity: tensors have no plain ==)
        base = collections.OrderedDict if safe.is_a(type(obj), collections.OrderedDict) else dict
        base.clear(obj)
        for k, v in saved:
            base.__setitem__(obj, k, v)
    elif kind == r.LIST:
        list.__setitem__(obj, slice(None), saved)
    elif kind == r.SET:
        set.clear(obj)
        set.update(obj, saved)
    elif kind == r.DEQUE:
        collections.deque.clear(obj)
        collections.deque.extend(obj, saved)
    elif kind == r.BYTEARRAY:
        bytearray.__setitem__(obj, slice(None), saved)


@dataclass
class Object(Saved):
    """An object's own attributes (its ``__dict__`` and ``__slots__``), and a function's closure."""

    obj: Any
    attrs: dict[str, Any] | None
    slots: list[tuple[str, Any]]
    slot_values: dict[str, Any]
    cells: list[tuple[Any, Any]]

    def restore(self) -> str | None:
        if self.attrs is not None:
            d = safe.instance_dict(self.obj)
            if d is not None:
                safe.put_dict(d, self.attrs)
        safe.put_slots(self.obj, self.slots, self.slot_values)
        for cell, value in self.cells:
            if value is _MISSING:
                continue
            current = _cell_value(cell)
            if current is not value:
                cell.cell_contents = value
        return None


def copy_object(obj: Any, kind: int) -> Object:
    d = safe.instance_dict(obj)
    slots = safe.slot_descriptors(type(obj))
    cells: list[tuple[Any, Any]] = []
    if kind == r.FUNCTION:
        closure = types.FunctionType.__dict__["__closure__"].__get__(obj) or ()
        cells = [(c, _cell_value(c)) for c in closure]
    return Object(
        obj, dict(d) if d is not None else None, slots, safe.slot_values(obj, slots), cells
    )


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:
        return _MISSING


@dataclass
class Class(Saved):
    """A notebook class's attributes (a counter kept on the class, a registry)."""

    cls: type
    attrs: dict[str, Any]

    def restore(self) -> str | None:
        current = dict(safe.class_dict(self.cls))
        for k in [k for k in current if k not in self.attrs]:
            type.__delattr__(self.cls, k)
        for k, v in self.attrs.items():
            if current.get(k, _MISSING) is not v and not k.startswith("__"):
                type.__setattr__(self.cls, k, v)
        return None


@dataclass
class Module(Saved):
    """The attributes of a module the notebook imported from its own folder."""

    module: types.ModuleType
    attrs: dict[str, Any]

    def restore(self) -> str | None:
        d = safe.instance_dict(self.module)
        if d is None:
            return None
        for k in [k for k in d if k not in self.attrs and not k.startswith("__")]:
            del d[k]
        for k, v in self.attrs.items():
            if d.get(k, _MISSING) is not v:
                d[k] = v
        return None


def copy_module_attrs(module: types.ModuleType) -> Module:
    d = safe.instance_dict(module) or {}
    return Module(module, {k: v for k, v in d.items() if not k.startswith("__")})


@dataclass
class Rng(Saved):
    """A random generator object: ``random.Random``, NumPy's ``Generator``/``RandomState``,
    ``torch.Generator``."""

    obj: Any
    state: Any
    how: str

    def restore(self) -> str | None:
        obj, how = self.obj, self.how
        if how == "random":
            random.Random.setstate(obj, self.state)
        elif how == "numpy-generator":
            type(obj).bit_generator.__get__(obj).state = self.state
        elif how == "numpy-randomstate":
            sys.modules["numpy"].random.RandomState.set_state(obj, self.state)
        else:
            sys.modules["torch"].Generator.set_state(obj, self.state)
        return None


def copy_rng(obj: Any) -> Rng:
    tp = type(obj)
    if safe.is_a(tp, random.Random):
        return Rng(obj, random.Random.getstate(obj), "random")
    np = sys.modules.get("numpy")
    if np is not None and safe.is_a(tp, np.random.Generator):
        return Rng(obj, np.random.Generator.bit_generator.__get__(obj).state, "numpy-generator")
    if np is not None and safe.is_a(tp, np.random.RandomState):
        return Rng(obj, np.random.RandomState.get_state(obj), "numpy-randomstate")
    torch = sys.modules["torch"]
    return Rng(obj, torch.Generator.get_state(obj), "torch")


@dataclass
class Array(Saved):
    """A NumPy array, written back in place."""

    obj: Any
    data: Any

    def restore(self) -> str | None:
        np = sys.modules["numpy"]
        if np.ndarray.shape.__get__(self.obj) != np.ndarray.shape.__get__(self.data):
            return f"`{self.where}` (a NumPy array) changed shape and keeps the re-run's values"
        np.copyto(self.obj, self.data)
        return None


def copy_array(obj: Any) -> Array:
    return Array(obj, sys.modules["numpy"].ndarray.copy(obj))


# ---- files ------------------------------------------------------------------------------------

_STANDARD = ("stdout", "stderr", "stdin", "__stdout__", "__stderr__", "__stdin__")
_FILE_TYPES = (io.TextIOWrapper, io.BufferedWriter, io.BufferedRandom, io.FileIO)


@dataclass
class File(Saved):
    """An open file the notebook writes to: its size and position, put back."""

    obj: Any
    size: int
    position: int

    def restore(self) -> str | None:
        f = self.obj
        if f.closed:
            return None  # closed by the re-run: what was written stays
        f.flush()
        fd = f.fileno()
        if os.fstat(fd).st_size != self.size:
            os.ftruncate(fd, self.size)
        f.seek(self.position)
        return None


@dataclass
class Memory(Saved):
    """An in-memory file (``io.StringIO``, ``io.BytesIO``): its content and position."""

    obj: Any
    content: Any
    position: int

    def restore(self) -> str | None:
        f = self.obj
        if f.closed:
            return None
        if f.getvalue() != self.content:
            f.seek(0)
            f.truncate()
            f.write(self.content)
        f.seek(self.position)
        return None


def copy_file(obj: Any, where: str) -> Saved | None:
    """The file's size and position (a regular file, opened for writing), or None: nothing to
    put back (read-only, closed, a terminal, the kernel's own streams)."""
    if any(obj is getattr(sys, name, None) for name in _STANDARD):
        return None
    tp = type(obj)
    if tp in (io.StringIO, io.BytesIO):
        return None if obj.closed else Memory(obj, obj.getvalue(), obj.tell())
    if tp not in _FILE_TYPES or obj.closed or not obj.writable():
        return None
    fd = obj.fileno()
    if fd in (0, 1, 2) or not stat.S_ISREG(os.fstat(fd).st_mode):
        return None
    obj.flush()
    return File(obj, os.fstat(fd).st_size, obj.tell())


# ---- iterators and generators ---------------------------------------------------------------


@dataclass
class Iterator(Saved):
    """A builtin iterator with a state to set (``iter(list)``, ``iter(range)``)."""

    obj: Any
    state: Any

    def restore(self) -> str | None:
        if self.state is _MISSING:
            return None
        type(self.obj).__setstate__(self.obj, self.state)
        return None


def copy_iterator(obj: Any) -> Iterator:
    reduced: Any = type(obj).__reduce__(obj)  # type: ignore[call-arg]
    return Iterator(obj, reduced[2] if len(reduced) > 2 else _MISSING)


@dataclass
class Generator(Saved):
    """A generator cannot be put back: only whether a re-run advanced it is known."""

    obj: Any
    mark: Any

    def restore(self) -> str | None:
        if generator_mark(self.obj) == self.mark:
            return None
        return f"`{self.where}` (a generator) was advanced by the re-run and cannot be put back"


def generator_mark(gen: Any) -> Any:
    """Where the generator stands: its frame's instruction and its locals (by identity), or
    None once it is finished."""
    frame = getattr(gen, "gi_frame", None) or getattr(gen, "cr_frame", None)
    if frame is None:
        return None
    return frame.f_lasti, tuple(id(v) for v in frame.f_locals.values())

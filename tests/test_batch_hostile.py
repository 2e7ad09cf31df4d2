"""Reduce batch reads and copies the notebook's objects without running their code: a property
that raises, a ``__getattr__`` that sleeps, a dict subclass with its own ``items()``, a config
whose ``__setattr__`` or ``__copy__`` would run, all in the namespace of a cell
that runs out of memory. ``%gpumem retry batch`` calls none of them and shows no traceback.

The hostile classes live in this module, not in the notebook, so what they record is out of
reach of the fix's rollback: a call made by the fix stays counted."""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import pytest

torch = pytest.importorskip("torch")

CALLS: list[str] = []


class Lazy:
    """``__getattr__`` answers anything, slowly, and a ``__dict__`` that raises."""

    def __getattr__(self, name: str) -> Any:
        CALLS.append(f"Lazy.__getattr__({name})")
        time.sleep(0.5)
        return 64

    @property  # type: ignore[misc]
    def __dict__(self) -> Any:
        CALLS.append("Lazy.__dict__")
        raise RuntimeError("no dict for you")

    @property  # type: ignore[misc]
    def __class__(self) -> Any:
        CALLS.append("Lazy.__class__")
        raise RuntimeError("no class for you")


class Settings(dict):  # type: ignore[type-arg]
    """A dict config whose own methods record and raise."""

    def _called(self, name: str) -> Any:
        CALLS.append(f"Settings.{name}")
        raise RuntimeError(f"Settings.{name} was called")

    def items(self) -> Any:
        return self._called("items")

    def values(self) -> Any:
        return self._called("values")

    def keys(self) -> Any:
        return self._called("keys")

    def __iter__(self) -> Any:
        return self._called("__iter__")

    def copy(self) -> Any:
        return self._called("copy")

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self._called("__reduce_ex__")


class Args(argparse.Namespace):
    """An argparse namespace with a property that raises and a recording ``__getattr__``."""

    @property
    def boom(self) -> Any:
        CALLS.append("Args.boom")
        raise RuntimeError("boom")

    def __getattr__(self, name: str) -> Any:
        CALLS.append(f"Args.__getattr__({name})")
        raise AttributeError(name)

    def __copy__(self) -> Any:
        CALLS.append("Args.__copy__")
        raise RuntimeError("no copies")


@dataclasses.dataclass
class Config:
    batch_size: int = 80
    lr: float = 0.1

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(Config, "armed", False):
            CALLS.append(f"Config.__setattr__({name})")
        object.__setattr__(self, name, value)

    def __copy__(self) -> Any:
        CALLS.append("Config.__copy__")
        raise RuntimeError("no copies")

    @property
    def boom(self) -> Any:
        CALLS.append("Config.boom")
        raise RuntimeError("boom")


@dataclasses.dataclass
class Derived:
    """A dataclass that derives a setting from the batch: its copy is its own ``replace``."""

    batch_size: int = 80
    steps: int = dataclasses.field(init=False, default=0)

    def __post_init__(self) -> None:
        self.steps = 960 // self.batch_size


def _retry(shell: Any, run: Any, namespace: dict[str, Any], cell: str) -> str:
    shell.run_cell("%gpumem simulate 64MiB", store_history=True)
    shell.run_cell("import torch", store_history=True)
    shell.user_ns.update(namespace)
    assert not shell.run_cell(cell, store_history=True).success
    CALLS.clear()
    Config.armed = True  # type: ignore[attr-defined]  # from here, its __setattr__ records
    started = time.perf_counter()
    try:
        out = run(shell, "%gpumem retry batch").text
    finally:
        Config.armed = False  # type: ignore[attr-defined]
    assert time.perf_counter() - started < 30
    assert "Traceback" not in out and "could not" not in out, out
    assert "Fits at batch" in out, out
    return out


ALLOC = "x = torch.empty({} << 20, dtype=torch.uint8, device='cuda')\n"


def test_a_dict_subclass_config_is_changed_without_its_methods(shell: Any, run: Any) -> None:
    """Was: `cfg.items()` called (its RuntimeError swallowed: no batch found)."""
    cfg = Settings(batch_size=80, lr=0.1)
    cfg.note = "kept"  # type: ignore[attr-defined]
    _retry(shell, run, {"cfg": cfg}, ALLOC.format("cfg['batch_size']"))
    assert CALLS == []
    new = shell.user_ns["cfg"]
    assert type(new) is Settings and new is not cfg, "a copy of the same class"
    assert dict.__getitem__(new, "batch_size") < 80 and dict.__getitem__(new, "lr") == 0.1
    assert new.note == "kept"
    assert dict.__getitem__(cfg, "batch_size") == 80, "the original is not changed"


def test_ordered_and_default_dict_configs_keep_what_they_are(shell: Any, run: Any) -> None:
    """An OrderedDict config keeps its order (was: the copy listed no keys: `list(cfg)` [],
    `dict(**cfg)` {}), a defaultdict its default_factory (was: None). Found by review."""
    from collections import OrderedDict, defaultdict

    cfg = OrderedDict(lr=0.1, batch_size=80)
    cfg.move_to_end("lr")
    _retry(shell, run, {"cfg": cfg}, ALLOC.format("cfg['batch_size']"))
    new = shell.user_ns["cfg"]
    assert type(new) is OrderedDict and list(new) == ["batch_size", "lr"]
    assert dict(**new) == {"batch_size": new["batch_size"], "lr": 0.1} and new["batch_size"] < 80
    shell.run_cell("%gpumem simulate off", store_history=True)
    dd: defaultdict[str, Any] = defaultdict(lambda: "unset", batch_size=80)
    _retry(shell, run, {"dd": dd}, ALLOC.format("dd['batch_size']"))
    new_dd = shell.user_ns["dd"]
    assert type(new_dd) is defaultdict and new_dd["missing"] == "unset"
    assert new_dd["batch_size"] < 80


def test_a_namespace_config_with_a_hostile_property(shell: Any, run: Any) -> None:
    """Was: `vars(args)` and `copy.copy(args)` (its ``__copy__`` raised: the fix failed)."""
    args = Args(batch_size=80, epochs=3)
    _retry(shell, run, {"args": args}, ALLOC.format("args.batch_size"))
    assert CALLS == []
    new = shell.user_ns["args"]
    assert type(new) is Args and vars(new)["epochs"] == 3 and vars(new)["batch_size"] < 80


def test_a_dataclass_config_is_copied_without_its_code(shell: Any, run: Any) -> None:
    """Was: `dataclasses.replace`, which runs ``__init__`` and the class's ``__setattr__``."""
    conf = Config()
    _retry(shell, run, {"conf": conf}, ALLOC.format("conf.batch_size"))
    assert CALLS == []
    new = shell.user_ns["conf"]
    assert type(new) is Config and new.batch_size < 80 and new.lr == 0.1


def test_a_dataclass_that_derives_from_the_batch_keeps_deriving(shell: Any, run: Any) -> None:
    """Its ``__post_init__`` runs for the copy (``dataclasses.replace``), as the user's own
    ``replace`` would: the steps it derives follow the new batch."""
    _retry(shell, run, {"conf": Derived()}, ALLOC.format("conf.batch_size"))
    new = shell.user_ns["conf"]
    assert new.batch_size < 80 and new.steps == 960 // new.batch_size


def test_hostile_objects_beside_a_plain_batch(shell: Any, run: Any) -> None:
    """Objects the cell names but that hold no batch: read as they are, never asked."""
    hostile = {"lazy": Lazy(), "cfg": Settings(lr=0.1), "args": Args(epochs=2)}
    cell = "batch_size = 80\n_ = (lazy, cfg, args)\n" + ALLOC.format("batch_size")
    _retry(shell, run, hostile, cell)
    assert CALLS == []
    assert shell.user_ns["batch_size"] < 80
    assert shell.user_ns["lazy"] is hostile["lazy"]


class Trainer:
    """An object that keeps the DataLoader the cell iterates, with a recording ``__getattr__``."""

    def __init__(self, loader: Any) -> None:
        self.train_loader = loader

    def __getattr__(self, name: str) -> Any:
        CALLS.append(f"Trainer.__getattr__({name})")
        raise AttributeError(name)


def test_a_loader_kept_by_a_hostile_object(shell: Any, run: Any) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    trainer = Trainer(DataLoader(TensorDataset(torch.zeros(400, 1)), batch_size=80))
    cell = "for (b,) in trainer.train_loader:\n    " + ALLOC.format("b.shape[0]")
    _retry(shell, run, {"trainer": trainer}, cell)
    assert shell.user_ns["trainer"].train_loader.batch_size < 80
    assert CALLS == []

"""The holders scan against a hostile namespace, in a real InteractiveShell on the simulated GPU.

Every object here runs code (prints, raises, sleeps) when touched through Python: an overridden
method, a property, ``__getattr__``. The scan reads objects without running their code, so the OOM
is still diagnosed, the GPU tensors are still named (those inside the hostile objects too), nothing
is printed by the user's code, and it stays within its time budget.
"""

from __future__ import annotations

from typing import Any

import pytest

import jupyter_gpumem

RAN = "USER CODE RAN"
OOM = "x = torch.randn(64, 2 << 20, device='cuda')"  # 512 MiB on a 160 MiB card

SETUP = f"""\
import time, weakref
import torch
def _ran(what):
    print("{RAN}:", what)
gpu_x = torch.zeros(4, 2**20, device="cuda")  # 16 MiB, the variable every diagnosis must name
"""

# name -> (cell defining `hostile`, a GPU tensor the scan finds inside it: its variable name or None)
HOSTILE: dict[str, tuple[str, str | None]] = {
    "dead weakref.proxy": (
        "class Gone: pass\n_g = Gone()\nhostile = weakref.proxy(_g)\ndel _g\n",
        None,
    ),
    "__class__ property raises": (
        "class H:\n"
        "    def __init__(self): self.t = torch.zeros(2**20, device='cuda')\n"
        "    @property\n"
        "    def __class__(self): _ran('__class__'); raise RuntimeError('no class')\n"
        "hostile = H()\n",
        "hostile",
    ),
    "__dict__ property raises": (
        "class H:\n"
        "    def __init__(self): self.t = torch.zeros(2**20, device='cuda')\n"
        "    @property\n"
        "    def __dict__(self): _ran('__dict__'); raise RuntimeError('no dict')\n"
        "hostile = H()\n",
        "hostile",
    ),
    "list subclass whose __iter__ raises": (
        "class L(list):\n"
        "    def __iter__(self): _ran('__iter__'); raise RuntimeError('no iter')\n"
        "    def __len__(self): _ran('__len__'); return 0\n"
        "    def __getitem__(self, i): _ran('__getitem__'); raise IndexError(i)\n"
        "hostile = L([torch.zeros(2**20, device='cuda'), 1, 'a'])\n",
        "hostile",
    ),
    "__getattribute__ raises": (
        "class H:\n"
        "    def __init__(self): self.t = torch.zeros(2**20, device='cuda')\n"
        "    def __getattribute__(self, name): _ran(name); raise RuntimeError(name)\n"
        "hostile = H()\n",
        "hostile",
    ),
    "__getattr__ answers everything": (
        "class H:\n"
        "    def __init__(self): self.t = torch.zeros(2**20, device='cuda')\n"
        "    def __getattr__(self, name): _ran(name); return 0\n"
        "    def __len__(self): _ran('__len__'); return 0\n"
        "hostile = H()\n",
        "hostile",
    ),
    "dict subclass with its own values() and items()": (
        "class D(dict):\n"
        "    def values(self): _ran('values'); raise RuntimeError('values')\n"
        "    def items(self): _ran('items'); raise RuntimeError('items')\n"
        "    def __iter__(self): _ran('__iter__'); raise RuntimeError('iter')\n"
        "    def __getitem__(self, k): _ran('__getitem__'); raise KeyError(k)\n"
        "hostile = D(t=torch.zeros(2**20, device='cuda'))\n",
        "hostile",
    ),
    "nn.Module with its own parameters() and __getattr__": (
        "class M(torch.nn.Linear):\n"
        "    def parameters(self, recurse=True):\n"
        "        _ran('parameters'); return super().parameters(recurse)\n"
        "    def buffers(self, recurse=True):\n"
        "        _ran('buffers'); return super().buffers(recurse)\n"
        "    def __getattr__(self, name): _ran(name); return super().__getattr__(name)\n"
        "hostile = M(1024, 256).to('cuda')\n",
        "hostile",
    ),
    "metaclass whose __hash__ raises": (
        "class Meta(type):\n"
        "    def __hash__(cls): _ran('__hash__'); raise RuntimeError('hash')\n"
        "    def __eq__(cls, other): _ran('__eq__'); raise RuntimeError('eq')\n"
        "class H(metaclass=Meta):\n"
        "    def __init__(self): self.t = torch.zeros(2**20, device='cuda')\n"
        "hostile = H()\n",
        "hostile",
    ),
}


def _oom(shell: Any, run: Any, setup: str) -> tuple[Any, str]:
    """Run setup, then the OOM cell; the FailedCell and everything printed while it failed."""
    shell.run_cell("%gpumem simulate 160MiB")
    assert shell.run_cell(SETUP + setup).success
    seen = run(shell, OOM, store_history=False)
    assert type(seen.error).__name__ == "OutOfMemoryError"
    return jupyter_gpumem.last_failure(shell), seen.text


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_a_hostile_object_neither_breaks_the_diagnosis_nor_runs(
    shell: Any, run: Any, kind: str
) -> None:
    setup, inside = HOSTILE[kind]
    failed, out = _oom(shell, run, setup)
    assert "could not build the diagnosis" not in out
    assert RAN not in out, "the scan ran the object's own code"
    assert "Where the memory went" in out
    held = failed.diagnosis.holders
    names = {h.name for h in held.holders}
    assert "gpu_x" in names
    if inside is not None:  # read without its code: the tensor inside it is found, not skipped
        assert inside in names
        assert held.skipped == 0


def test_a_tensor_subclass_with_its_own_storage_method_is_skipped_and_counted(
    shell: Any, run: Any
) -> None:
    failed, out = _oom(
        shell,
        run,
        "class T(torch.Tensor):\n"
        "    def untyped_storage(self): _ran('untyped_storage'); raise RuntimeError('s')\n"
        "hostile = torch.zeros(2**20, device='cuda').as_subclass(T)\n",
    )
    assert RAN not in out
    assert "Where the memory went" in out
    held = failed.diagnosis.holders
    assert "gpu_x" in {h.name for h in held.holders}
    assert held.skipped == 1
    assert held.skipped_reasons and held.skipped_reasons[0].startswith("hostile")


def test_all_hostile_objects_at_once_with_a_thousand_more(shell: Any, run: Any) -> None:
    setup = "".join(
        s.replace("hostile =", f"hostile_{i} =") for i, (s, _) in enumerate(HOSTILE.values())
    )
    setup += "for _i in range(1000):\n    globals()[f'v{_i}'] = [_i, {'a': _i}]\n"
    failed, out = _oom(shell, run, setup)
    assert RAN not in out
    assert "Where the memory went" in out
    names = {h.name for h in failed.diagnosis.holders.holders}
    assert "gpu_x" in names
    assert {f"hostile_{i}" for i, (_, inside) in enumerate(HOSTILE.values()) if inside} <= names


SLOW = {
    "Mapping with a slow __getitem__ (a lazy dataset)": (
        "from collections.abc import Mapping\n"
        "class Lazy(Mapping):\n"
        "    def __init__(self): self.keys_ = list(range(1000))\n"
        "    def __getitem__(self, k): time.sleep(0.05); _ran('__getitem__'); return k\n"
        "    def __iter__(self): return iter(self.keys_)\n"
        "    def __len__(self): return len(self.keys_)\n"
        "slow = Lazy()\n"
    ),
    "object with a slow __getattr__": (
        "class S:\n"
        "    def __getattr__(self, name): time.sleep(3); _ran(name); return 0\n"
        "slow = S()\n"
    ),
    "object with a slow __dict__": (
        "class S:\n"
        "    @property\n"
        "    def __dict__(self): time.sleep(3); _ran('__dict__'); return {}\n"
        "slow = S()\n"
    ),
}


@pytest.mark.parametrize("kind", list(SLOW))
def test_a_slow_object_does_not_hold_up_the_diagnosis(shell: Any, run: Any, kind: str) -> None:
    failed, out = _oom(shell, run, SLOW[kind])
    assert RAN not in out
    assert "Where the memory went" in out
    assert "gpu_x" in {h.name for h in failed.diagnosis.holders.holders}
    # a generous bound: the scan's budget is 50 ms; the benchmark has the real timings
    assert failed.elapsed_s < 2.0

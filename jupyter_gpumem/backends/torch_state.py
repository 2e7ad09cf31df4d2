"""Copies of torch state in host memory, and putting them back: what makes a rehearsal undoable.

A rehearsal (a probe of a fix) runs the user's training code for real, then everything it changed
is put back: parameters, buffers and ``.grad`` of models, optimizer state and hyper-parameters,
LR schedulers, AMP grad scalers, tensors, and the random number generators. The copies live in
host memory, never on the GPU, so they do not change what the probe measures; they are made once
per fix and restored after each probe (and after a final run that fails or is interrupted).

Restoring writes into the same tensor objects (``copy_`` under ``no_grad``), so every reference
the notebook holds (an optimizer's params, a view, a closure) sees the old values again. A tensor
the probe freed or moved off the GPU (``.grad`` set to None, optimizer state created lazily, the
Move to CPU fix) is rebuilt on the device it was on.
"""

from __future__ import annotations

import copy
import random
import sys
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from jupyter_gpumem.backends import simulated
from jupyter_gpumem.backends.torch_objects import (
    gpu_storage,
    is_module,
    is_optimizer,
    is_tensor,
    torch_module,
)


def _host_copy(t: Any) -> Any:
    """A detached copy in host memory; not counted by the simulated GPU."""
    with simulated.paused():
        return t.detach().to("cpu", copy=True)


def _nbytes(t: Any) -> int:
    try:
        return int(t.numel() * t.element_size())
    except Exception:
        return 0


def _on_gpu(t: Any) -> bool:
    return gpu_storage(t) is not None


def _rebuild(saved: Any, like_device: Any, on_gpu: bool) -> Any:
    """A new tensor with ``saved``'s values where the original lived (counted on the GPU)."""
    sim = simulated.current()
    if sim is not None:
        with simulated.paused():
            t = saved.clone()
        if on_gpu:
            sim.track(t, device=like_device)
        return t
    return saved.to(like_device, copy=True)


@dataclass
class _TensorCopy:
    ref: Any  # weakref to the tensor: a copy never keeps GPU memory alive
    data: Any  # host copy
    on_gpu: bool
    device: Any
    version: int
    ptr: int  # data_ptr: `p.data = other` changes it without a new version


def _ptr(t: Any) -> int:
    try:
        return int(t.data_ptr())
    except Exception:
        return -1


def _device_of(t: Any) -> Any:
    """Where the tensor lives: its device, or the simulated card that counts it ("cuda:1")."""
    sim = simulated.current()
    card = sim.holder_of(t) if sim is not None else None
    return t.device if card is None else f"cuda:{card.device_index}"


def _copy_tensor(t: Any) -> _TensorCopy:
    return _TensorCopy(
        weakref.ref(t), _host_copy(t), _on_gpu(t), _device_of(t), t._version, _ptr(t)
    )


def _put_back(c: _TensorCopy) -> Any:
    """Write the saved values into the same tensor; returns the tensor to keep (the same object,
    or a rebuilt one where the original was freed)."""
    torch = torch_module()
    t = c.ref()
    if t is None:
        return _rebuild(c.data, c.device, c.on_gpu)
    if c.on_gpu and not _on_gpu(t):
        # moved off the GPU (Move to CPU): back where it was
        sim = simulated.current()
        if sim is not None:
            sim.track(t, device=c.device)
        else:
            t.data = c.data.to(c.device, copy=True)
            return t
    # Always written back: a write through `.data` (EMA code: `p.data.mul_(...)`) does not
    # advance the version counter, so the counter cannot tell what is unchanged.
    if True:
        with torch.no_grad():
            if t.shape != c.data.shape:
                t.data = _rebuild(c.data, c.device, c.on_gpu)
            else:
                t.copy_(c.data)
    return t


# ---- models ------------------------------------------------------------------------------------


@dataclass
class _ModuleCopy:
    module: Any
    # per submodule: (module, training, params dict, buffers dict, children dict), shallow
    structure: list[tuple[Any, bool, dict[str, Any], dict[str, Any], dict[str, Any]]]
    params: dict[int, _TensorCopy]  # by id of the Parameter
    grads: dict[int, _TensorCopy | None]  # id of the Parameter -> its grad's copy (None: no grad)
    buffers: dict[int, _TensorCopy]
    bytes: int = 0


def copy_module(m: Any) -> _ModuleCopy:
    structure = []
    params: dict[int, _TensorCopy] = {}
    grads: dict[int, _TensorCopy | None] = {}
    buffers: dict[int, _TensorCopy] = {}
    nbytes = 0
    for sub in m.modules():
        structure.append(
            (sub, sub.training, dict(sub._parameters), dict(sub._buffers), dict(sub._modules))
        )
        for p in sub._parameters.values():
            if p is None or id(p) in params:
                continue
            params[id(p)] = _copy_tensor(p)
            nbytes += _nbytes(p)
            g = p.grad
            grads[id(p)] = _copy_tensor(g) if g is not None else None
            nbytes += _nbytes(g) if g is not None else 0
        for b in sub._buffers.values():
            if b is None or id(b) in buffers:
                continue
            buffers[id(b)] = _copy_tensor(b)
            nbytes += _nbytes(b)
    return _ModuleCopy(m, structure, params, grads, buffers, nbytes)


def restore_module(c: _ModuleCopy) -> None:
    torch = torch_module()
    for sub, training, ps, bs, ms in c.structure:
        sub.training = training
        for d, saved in ((sub._parameters, ps), (sub._buffers, bs), (sub._modules, ms)):
            # by identity: `!=` on dicts of tensors would compare tensors
            if list(d) != list(saved) or any(d[k] is not v for k, v in saved.items()):
                d.clear()
                d.update(saved)
    with torch.no_grad():
        for key, tc in c.params.items():
            p = tc.ref()
            if p is None:
                continue  # not in the model any more (the structure above put the old one back)
            _put_back(tc)
            g = c.grads[key]
            if g is None:
                p.grad = None
            elif p.grad is not None and p.grad is g.ref():
                _put_back(g)
            else:
                # the probe set it to None (zero_grad) or replaced it: the same values, rebuilt
                p.grad = _rebuild(g.data, g.device, g.on_gpu)
        for tc in c.buffers.values():
            _put_back(tc)


# ---- optimizers, schedulers, scalers -----------------------------------------------------------


def _copy_value(v: Any) -> tuple[Any, int]:
    if is_tensor(v):
        return _copy_tensor(v), _nbytes(v)
    return copy.deepcopy(v), 0


@dataclass
class _OptimizerCopy:
    opt: Any
    state: dict[Any, dict[str, Any]]  # param -> {key: _TensorCopy or value}
    groups: list[dict[str, Any]]  # shallow copies of param_groups (the params lists kept)
    attrs: dict[str, Any]  # plain attributes (step counters and flags)
    bytes: int = 0


def copy_optimizer(opt: Any) -> _OptimizerCopy:
    state: dict[Any, dict[str, Any]] = {}
    nbytes = 0
    for p, s in opt.state.items():
        entry = {}
        for k, v in s.items():
            entry[k], n = _copy_value(v)
            nbytes += n
        state[p] = entry
    groups = [dict(g) for g in opt.param_groups]
    attrs = {k: v for k, v in vars(opt).items() if isinstance(v, (int, float, bool, str))}
    return _OptimizerCopy(opt, state, groups, attrs, nbytes)


def restore_optimizer(c: _OptimizerCopy) -> None:
    torch = torch_module()
    opt = c.opt
    live = opt.state
    for p in [p for p in live if p not in c.state]:
        del live[p]  # state the probe created lazily (Adam's first step)
    with torch.no_grad():
        for p, entry in c.state.items():
            cur = live[p]
            for k in [k for k in cur if k not in entry]:
                del cur[k]
            for k, v in entry.items():
                if isinstance(v, _TensorCopy):
                    cur[k] = _put_back(v)  # the same object where it still exists
                else:
                    cur[k] = copy.deepcopy(v)
    for g, saved in zip(opt.param_groups, c.groups, strict=False):
        g.clear()
        g.update(saved)
    vars(opt).update(c.attrs)


@dataclass
class _StateDictCopy:
    """An object with state_dict / load_state_dict and no tensors in it: a scheduler, a scaler."""

    obj: Any
    state: dict[str, Any]


def has_plain_state(obj: Any) -> bool:
    if isinstance(obj, type) or is_module(obj) or is_optimizer(obj):
        return False
    if not (callable(getattr(obj, "state_dict", None)) and hasattr(obj, "load_state_dict")):
        return False
    mod = type(obj).__module__ or ""
    return mod.startswith("torch.")


def copy_state_dict(obj: Any) -> _StateDictCopy | None:
    try:
        state = obj.state_dict()
    except Exception:
        return None
    if any(is_tensor(v) for v in _walk(state)):
        return None
    return _StateDictCopy(obj, copy.deepcopy(state))


def restore_state_dict(c: _StateDictCopy) -> None:
    c.obj.load_state_dict(copy.deepcopy(c.state))


def _walk(v: Any, depth: int = 0) -> Iterable[Any]:
    yield v
    if depth > 4:
        return
    if isinstance(v, dict):
        for x in v.values():
            yield from _walk(x, depth + 1)
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _walk(x, depth + 1)


# ---- random number generators ------------------------------------------------------------------


@dataclass
class RngState:
    """torch (CPU and every CUDA device), Python's ``random`` and NumPy's global generator."""

    python: Any = None
    torch_cpu: Any = None
    torch_cuda: list[Any] | None = None
    numpy: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_rng() -> RngState:
    """O(1): a few KiB copied. Taken before every cell, so a re-run starts where the cell did."""
    state = RngState(python=random.getstate())
    torch = torch_module()
    if torch is not None:
        try:
            state.torch_cpu = torch.get_rng_state()
            if simulated.current() is None and torch.cuda.is_initialized():
                state.torch_cuda = torch.cuda.get_rng_state_all()
        except Exception:
            pass
    np = sys.modules.get("numpy")
    if np is not None:
        try:
            state.numpy = np.random.get_state()
        except Exception:
            pass
    return state


def restore_rng(state: RngState) -> None:
    random.setstate(state.python)
    torch = torch_module()
    if torch is not None and state.torch_cpu is not None:
        torch.set_rng_state(state.torch_cpu)
        if state.torch_cuda is not None:
            try:
                torch.cuda.set_rng_state_all(state.torch_cuda)
            except Exception:
                pass
    np = sys.modules.get("numpy")
    if np is not None and state.numpy is not None:
        np.random.set_state(state.numpy)


# ---- tensors -----------------------------------------------------------------------------------


def copy_tensor(t: Any) -> _TensorCopy:
    return _copy_tensor(t)


def restore_tensor_if_alive(c: _TensorCopy) -> None:
    t = c.ref()
    if t is None:
        return
    torch = torch_module()
    with torch.no_grad():
        _put_back(c)


def restore_tensor(c: _TensorCopy) -> Any:
    """The tensor with its saved values: the same object, or rebuilt if it was freed."""
    torch = torch_module()
    with torch.no_grad():
        return _put_back(c)


def tensor_version(t: Any) -> int:
    return int(t._version)


def tensor_bytes(t: Any) -> int:
    return _nbytes(t)


def on_gpu(t: Any) -> bool:
    return _on_gpu(t)

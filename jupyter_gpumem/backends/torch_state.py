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

Models and optimizers are read through their own dictionaries (``_modules``, ``_parameters``,
``_buffers``, ``state``, ``param_groups``) taken with the C ``__dict__`` descriptor, never through
a method a subclass may override (``parameters()``, ``modules()``): copying runs no user code.
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
from jupyter_gpumem.backends.base import active
from jupyter_gpumem.backends.torch_objects import is_tensor, torch_module


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
    return active().storage_of(t) is not None


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
    requires_grad: bool = False  # a leaf that requires grad: rebuilt as one


def _device_of(t: Any) -> Any:
    """Where the tensor lives: its device, or the simulated card that counts it ("cuda:1")."""
    sim = simulated.current()
    card = sim.holder_of(t) if sim is not None else None
    return t.device if card is None else f"cuda:{card.device_index}"


def _copy_tensor(t: Any) -> _TensorCopy:
    return _TensorCopy(
        weakref.ref(t),
        _host_copy(t),
        _on_gpu(t),
        _device_of(t),
        bool(t.requires_grad and t.is_leaf),
    )


def _put_back(c: _TensorCopy) -> Any:
    """Write the saved values into the same tensor; returns the tensor to keep (the same object,
    or a rebuilt one where the original was freed)."""
    torch = torch_module()
    t = c.ref()
    if t is None:
        rebuilt = _rebuild(c.data, c.device, c.on_gpu)
        return rebuilt.requires_grad_(True) if c.requires_grad else rebuilt
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
    with torch.no_grad():
        if t.shape != c.data.shape:
            t.data = _rebuild(c.data, c.device, c.on_gpu)
        else:
            t.copy_(c.data)
    return t


# ---- reading models and optimizers by their own dictionaries ----------------------------------


def _instance_dict(obj: Any, cls: type) -> dict[str, Any]:
    """``obj.__dict__`` through ``cls``'s C descriptor (``cls`` a torch base class of ``obj``)."""
    getter = type.__dict__["__dict__"].__get__(cls, type).get("__dict__")
    if getter is None:
        return {}
    try:
        d = getter.__get__(obj, type(obj))
    except Exception:
        return {}
    return d if type(d) is dict else {}


def _own(obj: Any, cls: type, key: str) -> dict[Any, Any]:
    """A dictionary the object keeps (``_parameters``), or an empty one."""
    v = dict.get(_instance_dict(obj, cls), key)
    return v if isinstance(v, dict) else {}


def submodules(m: Any) -> list[Any]:
    """``m`` and every module below it, each once, through ``_modules`` (``modules()`` unrun)."""
    module_cls = torch_module().nn.Module
    found, seen, todo = [], set(), [m]
    while todo:
        sub = todo.pop()
        if sub is None or id(sub) in seen:
            continue
        seen.add(id(sub))
        found.append(sub)
        todo.extend(reversed(list(dict.values(_own(sub, module_cls, "_modules")))))
    return found


def module_tensors(m: Any) -> tuple[list[Any], list[Any]]:
    """(parameters, buffers) of ``m`` and its submodules, each once."""
    module_cls = torch_module().nn.Module
    params: dict[int, Any] = {}
    buffers: dict[int, Any] = {}
    for sub in submodules(m):
        for p in dict.values(_own(sub, module_cls, "_parameters")):
            if p is not None:
                params.setdefault(id(p), p)
        for b in dict.values(_own(sub, module_cls, "_buffers")):
            if b is not None:
                buffers.setdefault(id(b), b)
    return list(params.values()), list(buffers.values())


def module_bytes(m: Any) -> int:
    """Host memory a copy of the model takes: parameters, their gradients, buffers."""
    params, buffers = module_tensors(m)
    grads = [p.grad for p in params if p.grad is not None]
    return sum(_nbytes(t) for t in (*params, *grads, *buffers))


def module_on_gpu(m: Any) -> bool:
    params, buffers = module_tensors(m)
    return any(_on_gpu(t) for t in (*params, *buffers))


def _optimizer_state(opt: Any) -> dict[Any, Any]:
    return _own(opt, torch_module().optim.Optimizer, "state")


def optimizer_bytes(opt: Any) -> int:
    return sum(
        _nbytes(v)
        for s in dict.values(_optimizer_state(opt))
        if isinstance(s, dict)
        for v in dict.values(s)
        if is_tensor(v)
    )


def optimizer_has_state(opt: Any) -> bool:
    return bool(len(_optimizer_state(opt)))


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
    module_cls = torch_module().nn.Module
    structure = []
    params: dict[int, _TensorCopy] = {}
    grads: dict[int, _TensorCopy | None] = {}
    buffers: dict[int, _TensorCopy] = {}
    nbytes = 0
    for sub in submodules(m):
        own = [dict(_own(sub, module_cls, k)) for k in ("_parameters", "_buffers", "_modules")]
        training = bool(dict.get(_instance_dict(sub, module_cls), "training", True))
        structure.append((sub, training, own[0], own[1], own[2]))
        for p in own[0].values():
            if p is None or id(p) in params:
                continue
            params[id(p)] = _copy_tensor(p)
            nbytes += _nbytes(p)
            g = p.grad
            grads[id(p)] = _copy_tensor(g) if g is not None else None
            nbytes += _nbytes(g) if g is not None else 0
        for b in own[1].values():
            if b is None or id(b) in buffers:
                continue
            buffers[id(b)] = _copy_tensor(b)
            nbytes += _nbytes(b)
    return _ModuleCopy(m, structure, params, grads, buffers, nbytes)


def drop_replaced_grads(c: _ModuleCopy) -> None:
    """Let go of every gradient ``restore_module`` will not keep as it is (a probe's, or one
    that must be rebuilt): their memory is free before any is rebuilt."""
    for key, tc in c.params.items():
        p = tc.ref()
        if p is None:
            continue
        g = c.grads[key]
        if g is None or p.grad is None or p.grad is not g.ref():
            p.grad = None


def restore_module(c: _ModuleCopy) -> None:
    torch = torch_module()
    module_cls = torch.nn.Module
    for sub, training, ps, bs, ms in c.structure:
        dict.__setitem__(_instance_dict(sub, module_cls), "training", training)
        own = [_own(sub, module_cls, k) for k in ("_parameters", "_buffers", "_modules")]
        for d, saved in ((own[0], ps), (own[1], bs), (own[2], ms)):
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
    own = _instance_dict(opt, torch_module().optim.Optimizer)
    for p, s in dict.items(_optimizer_state(opt)):
        entry = {}
        for k, v in s.items():
            entry[k], n = _copy_value(v)
            nbytes += n
        state[p] = entry
    groups = [dict(g) for g in own.get("param_groups", ())]
    attrs = {k: v for k, v in own.items() if type(v) in (int, float, bool, str)}
    return _OptimizerCopy(opt, state, groups, attrs, nbytes)


def restore_optimizer(c: _OptimizerCopy) -> None:
    torch = torch_module()
    opt = c.opt
    live = _optimizer_state(opt)
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
    own = _instance_dict(opt, torch.optim.Optimizer)
    for g, saved in zip(own.get("param_groups", ()), c.groups, strict=False):
        g.clear()
        g.update(saved)
    own.update(c.attrs)


@dataclass
class _StateDictCopy:
    """An object with state_dict / load_state_dict and no tensors in it: a scheduler, a scaler."""

    obj: Any
    state: dict[str, Any]


def has_plain_state_type(tp: type) -> bool:
    """A torch class with ``state_dict`` and ``load_state_dict`` (a scheduler, a scaler), read
    from the classes' own dictionaries; models and optimizers have their own copies."""
    torch = torch_module()
    mro = type.__dict__["__mro__"].__get__(tp, type)
    if torch is None or type in mro or torch.nn.Module in mro or torch.optim.Optimizer in mro:
        return False
    defined = set()
    for cls in mro:
        defined.update(type.__dict__["__dict__"].__get__(cls, type))
    return {"state_dict", "load_state_dict"} <= defined


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


@dataclass
class Evicted:
    """A failed run's leftover tensor while a fix runs: the same object, its GPU storage swapped
    for an empty one (so the re-run has the room), its values and gradient in host memory."""

    tensor: Any
    data: Any
    device: Any
    on_gpu: bool
    grad: _TensorCopy | None
    detached: bool  # it had an autograd graph, let go with the activations it held


def evict_tensor(t: Any) -> Evicted | _TensorCopy:
    """Free what the tensor holds on the GPU and keep the object, or (a view, which cannot be
    detached in place) its host copy, rebuilt as a new tensor."""
    torch = torch_module()
    grad = t.grad if t.is_leaf else None
    saved = Evicted(
        t, _host_copy(t), _device_of(t), _on_gpu(t), None if grad is None else _copy_tensor(grad),
        t.grad_fn is not None,
    )  # fmt: skip
    try:
        with torch.no_grad():
            if saved.detached:
                t.detach_()  # the graph (the failed run's activations) goes now
            with simulated.paused():  # a host placeholder: nothing of it on the card
                t.data = torch.empty(0, dtype=t.dtype, device="cpu")
            if grad is not None:
                t.grad = None
    except RuntimeError:
        return _copy_tensor(t)
    return saved


def restore_evicted(e: Evicted | _TensorCopy) -> Any:
    """The evicted tensor back with its values (and gradient): the same object where it could
    be kept."""
    if isinstance(e, _TensorCopy):
        return restore_tensor(e)
    torch = torch_module()
    t = e.tensor
    with torch.no_grad():
        t.data = _rebuild(e.data, e.device, e.on_gpu)
        if e.grad is not None:
            t.grad = _rebuild(e.grad.data, e.grad.device, e.grad.on_gpu)
    return t


def release_cached() -> None:
    """Give the allocator's free cached blocks back (``torch.cuda.empty_cache()``), where CUDA
    (or the simulated card, which answers for it) is in use: never starts CUDA."""
    torch = torch_module()
    if torch is None:
        return
    try:
        if simulated.current() is not None or torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:
        pass


def bn_and_grads(m: Any) -> tuple[bool, bool]:
    """(BatchNorm statistics kept while training, gradients present): what a failed run's
    forward and backward passes leave in a model before it runs out."""
    params, _ = module_tensors(m)
    module_cls = torch_module().nn.Module
    training = any(
        dict.get(_instance_dict(sub, module_cls), "training", False)
        and "num_batches_tracked" in _own(sub, module_cls, "_buffers")
        for sub in submodules(m)
    )
    return training, any(p.grad is not None for p in params)


def tensor_version(t: Any) -> int:
    return int(t._version)


def tensor_bytes(t: Any) -> int:
    return _nbytes(t)


def on_gpu(t: Any) -> bool:
    return _on_gpu(t)

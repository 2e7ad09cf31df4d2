"""torch, read without importing it: what a Python object is and holds.

torch is never imported to find out whether it is in use: if the user has not imported it, nothing
here runs. Readings of the card go through the active backend (``backends.active()``), never
through here.
"""

from __future__ import annotations

import contextlib
import sys
import types
import weakref
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, cast

from jupyter_gpumem.backends.base import StorageInfo, active

if TYPE_CHECKING:
    pass


def torch_module() -> Any:
    """torch if the user has imported it, else None."""
    return sys.modules.get("torch")


def cuda_ready() -> bool:
    """A CUDA context exists in this process (so reading it costs no new context)."""
    torch = torch_module()
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_initialized())
    except Exception:
        return False


# ---- what a Python object holds on the GPU ------------------------------------------------------


def is_tensor(obj: object) -> bool:
    torch = torch_module()
    return torch is not None and isinstance(obj, torch.Tensor)


def is_module(obj: object) -> bool:
    torch = torch_module()
    return torch is not None and isinstance(obj, torch.nn.Module)


def is_optimizer(obj: object) -> bool:
    torch = torch_module()
    return torch is not None and isinstance(obj, torch.optim.Optimizer)


def no_torch_function() -> Any:
    """A context where tensor methods skip torch function modes (the simulated GPU's redirect):
    reading 100k tensors' storages must not go through Python for each call."""
    torch = torch_module()
    disable = getattr(getattr(torch, "_C", None), "DisableTorchFunction", None)
    return disable() if disable is not None else contextlib.nullcontext()


def compiled_original(obj: Any) -> Any:
    """What ``torch.compile`` wrapped: the model of an ``OptimizedModule``, the function of a
    compiled function; None for anything else. Read without running the object's code."""
    if "torch._dynamo" not in sys.modules:
        return None  # nothing was compiled in this process
    tp = type(obj)
    if tp.__name__ == "OptimizedModule" and tp.__module__.startswith("torch._dynamo"):
        modules = vars(obj).get("_modules") or {}
        return modules.get("_orig_mod")
    if issubclass(tp, types.FunctionType):  # not isinstance: that reads a proxy's __class__
        return vars(obj).get("_torchdynamo_orig_callable")
    return None


def compiled_names(ns: dict[str, Any], names: Iterable[str]) -> list[str]:
    """The names among ``names`` bound to something ``torch.compile`` made."""
    return sorted(n for n in names if compiled_original(ns.get(n)) is not None)


def read_by_compiled(ns: dict[str, Any], names: Iterable[str]) -> set[str]:
    """The notebook's globals read by the functions that the compiled functions among ``names``
    wrap: a compiled ``train_step`` reads the optimizer through code its wrapper does not show."""
    found: set[str] = set()
    for n in names:
        original = compiled_original(ns.get(n))
        code = getattr(original, "__code__", None)
        stack = [code] if isinstance(code, types.CodeType) else []
        while stack:
            c = stack.pop()
            found.update(k for k in c.co_names if k in ns)
            stack += [k for k in c.co_consts if isinstance(k, types.CodeType)]
    return found


def forget_compiled(optimizers: Iterable[Any]) -> bool:
    """After a run that compiled was rolled back: drop what dynamo compiled (every code object's
    cache: the next call compiles again, and no compiled code reads the globals the rollback took
    out of the namespace) and the optimizer state that a compiled ``optimizer.step`` holds on its
    graph until the optimizer dies (dynamo's ``OptimizerVariable.create_finalizer``): a rolled-back
    rehearsal's Adam state otherwise stays allocated. False where nothing was compiled."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:
        return False
    targets = {id(o) for o in optimizers}
    registry = getattr(weakref.finalize, "_registry", {})  # CPython's, since 3.4
    for finalizer, info in list(registry.items()):
        func = getattr(info, "func", None)
        if "clear_static_tensor_refs" not in getattr(func, "__qualname__", ""):
            continue
        ref = getattr(info, "weakref", None)
        if ref is not None and id(ref()) in targets:
            finalizer()  # runs once, then detaches
    dynamo.reset_code_caches()
    return True


def compiled_graphs() -> int | None:
    """How many graphs dynamo has compiled in this process (recompiles included), or None where
    nothing was compiled; the difference around a run is what the run compiled."""
    dynamo_utils = sys.modules.get("torch._dynamo.utils")
    counters = getattr(dynamo_utils, "counters", None)
    if counters is None:
        return None
    try:
        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return None


def eager_compiled() -> AbstractContextManager[Any]:
    """A block where ``torch.compile``d code runs eagerly (``torch.compiler.set_stance``, torch
    2.6 on): a re-run on the CPU does not compile again what was compiled for the GPU."""
    torch = torch_module()
    stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    if stance is None or "torch._dynamo" not in sys.modules:
        return contextlib.nullcontext()
    try:
        return cast("AbstractContextManager[Any]", stance("force_eager"))
    except Exception:
        return contextlib.nullcontext()


def autocast_factory(device_index: int | None = None) -> tuple[Any, str]:
    """A factory of ``torch.autocast`` contexts for the re-run, and the dtype's name.

    bf16 where device ``device_index`` (the one that ran out; None: the current one) has it in
    hardware (no GradScaler needed), else fp16.
    """
    torch = torch_module()
    if torch is None:
        raise RuntimeError("torch is not imported")
    device_type = active().autocast_device_type()
    dtype = torch.bfloat16 if active().supports_bf16(device_index) else torch.float16

    def factory() -> Any:
        return torch.autocast(device_type=device_type, dtype=dtype)

    return factory, "bfloat16" if dtype is torch.bfloat16 else "float16"


def move_objects(
    obj: Any,
    storage_of: Callable[[Any], StorageInfo | None],
    to_host: Callable[[Any], Any],
) -> tuple[Any, int]:
    """Move a GPU tensor, model or optimizer to the CPU; returns (object, bytes moved).

    Models, optimizers and parameters move in place (the same object, so that an optimizer still
    steps the model's parameters): parameters, gradients, buffers, optimizer state, and the
    parameters of an optimizer's groups. Any other tensor comes back as ``to_host`` gives it. The
    backends supply what is on the GPU and how one tensor leaves it.
    """
    move = _HostMove(storage_of, to_host)
    torch = torch_module()
    if torch is not None and isinstance(obj, torch.nn.Parameter):
        move.parameter(obj)
        return obj, move.moved
    if is_tensor(obj):
        return move.tensor(obj), move.moved
    if is_module(obj):
        move.module(obj)
    elif is_optimizer(obj):
        move.optimizer(obj)
    return obj, move.moved


class _HostMove:
    def __init__(
        self, storage_of: Callable[[Any], StorageInfo | None], to_host: Callable[[Any], Any]
    ) -> None:
        self.storage_of, self.to_host = storage_of, to_host
        self.moved = 0

    def tensor(self, t: Any) -> Any:
        info = self.storage_of(t)
        if info is None:
            return t
        self.moved += info[1]
        return self.to_host(t)

    def parameter(self, p: Any) -> None:
        p.data = self.tensor(p.data)
        if p.grad is not None:
            p.grad = self.tensor(p.grad)

    def module(self, model: Any) -> None:
        for p in model.parameters():
            self.parameter(p)
        for mod in model.modules():
            for name, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[name] = self.tensor(b)

    def optimizer(self, opt: Any) -> None:
        for group in opt.param_groups:
            for p in group["params"]:
                self.parameter(p)
        for state in opt.state.values():
            for k, v in list(state.items()):
                if is_tensor(v):
                    state[k] = self.tensor(v)


def parameter_dtypes(module: Any) -> set[str]:
    """The dtypes of a model's floating-point parameters, as ``str(dtype)`` (``torch.float64``);
    read from its parameters' own dicts, nothing of the model's class runs."""
    found: set[str] = set()
    stack, seen = [module], 0
    while stack and seen < 10_000:
        m = stack.pop()
        seen += 1
        d = getattr(m, "__dict__", {})
        for p in (d.get("_parameters") or {}).values():
            if p is not None and getattr(p, "is_floating_point", lambda: False)():
                found.add(str(p.dtype))
        stack.extend(c for c in (d.get("_modules") or {}).values() if c is not None)
    return found

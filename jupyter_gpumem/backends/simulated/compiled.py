"""``torch.compile`` on the simulated GPU: dynamo compiles as it would on CUDA, and what the
compiled graphs allocate counts on the card.

Dynamo skips every frame while a torch dispatch mode is on the stack unless the mode says it
``ignore_compile_internals()`` (``torch/_dynamo/convert_frame.py``, ``ConvertFrame.__call__``:
``any_torch_dispatch_mode_on_stack()``); the counting mode says so once this module is ready for
it (``prepare``). Then, while a simulation runs:

- dynamo traces with the modes off (``_disable_current_modes``) and the redirecting function mode
  traced as the call it wraps (``cuda_to_cpu``: ``torch.compiler.is_compiling()``); it guards,
  breaks graphs and recompiles (a new batch size, then a dynamic batch dimension: its automatic
  dynamic shapes) as on CUDA, and ``torch._dynamo.utils.counters`` counts the graphs;
- every graph compiled is handed to the backend here (``torch._dynamo.config
  .debug_backend_override``, whatever backend the ``torch.compile`` call named), which runs the
  captured graph op by op under the modes: each op's new storages count on the card of the
  graph's inputs, as the eager code's would. The memory of a compiled step is the memory of its
  graphs run eagerly, dynamo's own savings included (a value dead after a graph break is dropped:
  nanoGPT's ``logits`` before ``backward``, 12% of its peak); Inductor's fusion, which on CUDA
  usually needs less still, is not modelled;
- optimizer state that dynamo makes while it traces (``OptimizerVariable`` runs ``_init_group``
  with the modes off, so ``exp_avg`` and the like are born on the host) counts on the card of the
  parameters when a graph holding it first runs, or when an eager op reads it next to the card's
  tensors (a fused optimizer: ``gpu.SimulatedGPU._adopt_compiled_state``), as the eager first
  ``step()`` counts it.

Graphs compiled during the simulation are guarded on its function mode: after ``stop`` they
compile again for the real device, and graphs compiled before ``start`` compile again here.
A torch without these hooks (``supported()``) keeps the former behaviour: compiled code runs
eagerly under the simulation (``prepare`` answers False).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import threading
from collections.abc import Callable
from typing import Any

from jupyter_gpumem.backends.base import active
from jupyter_gpumem.backends.simulated.gpu import SimulatedGPU

BACKEND = "jupyter_gpumem_simulated"
_OVERRIDE = f">=0:{BACKEND}"  # every graph (frame id >= 0) compiles with BACKEND

_lock = threading.RLock()
_ready: bool | None = None  # None: not tried yet; False: this torch lacks what it takes
_saved: dict[str, tuple[Any, Any]] = {}  # dynamo setting -> (ours, the user's) while ours is set


def prepare() -> bool:
    """Called by the counting mode when dynamo asks it (before each frame it converts) and when
    the mode is entered: make compiled code compile under the running simulation. False (dynamo
    then skips every frame and compiled code runs eagerly) where this torch lacks the hooks.

    The answer is the same every time: torch reads it once when the mode is entered too, and a
    guard compiled while it said otherwise fails on every call (dynamo's C++ guards check it)."""
    if not supported():
        return False
    if "torch._dynamo" in sys.modules:  # never import dynamo for this (2-6 s): nothing compiles
        with _lock:
            if _install():
                _set_override()
            else:  # the backend could not be put in place: compiled code runs eagerly, counted
                _set_config("disable", True)
    return True


@functools.cache
def supported() -> bool:
    """This torch has what compiling under the simulation takes, read without importing dynamo:
    dispatch modes that let dynamo compile under them, and a backend override for every graph."""
    try:
        from torch.utils._python_dispatch import TorchDispatchMode

        if not hasattr(TorchDispatchMode, "ignore_compile_internals"):
            return False
        spec = importlib.util.find_spec("torch._dynamo.config")
        origin = spec.origin if spec is not None else None
        if origin is None:
            return False
        with open(origin, encoding="utf-8") as f:
            return "debug_backend_override" in f.read()
    except Exception:
        return False


def restore() -> None:
    """The simulation ended: dynamo's settings back as the user had them."""
    with _lock:
        config: Any = sys.modules.get("torch._dynamo.config")
        for name, (ours, theirs) in list(_saved.items()):
            if config is not None and getattr(config, name, None) == ours:
                setattr(config, name, theirs)
        _saved.clear()


def _set_override() -> None:
    _set_config("debug_backend_override", _OVERRIDE)


def _set_config(name: str, value: Any) -> None:
    """Set one of dynamo's settings while the simulation runs (``restore`` puts it back)."""
    config: Any = sys.modules["torch._dynamo.config"]
    current = getattr(config, name)
    if current != value:
        _saved.setdefault(name, (value, current))
        setattr(config, name, value)


def _install() -> bool:
    """Register the backend and keep dynamo out of the function mode's own frames, once."""
    global _ready
    if _ready is not None:
        return _ready
    _ready = False
    try:
        import torch._dynamo
        import torch._dynamo.config as config
        from torch._dynamo.eval_frame import (
            FrameAction,
            FrameExecStrategy,
            set_code_exec_strategy,
        )

        if not isinstance(getattr(config, "debug_backend_override", None), str):
            return False
        from jupyter_gpumem.backends.cuda_to_cpu import cuda_to_cpu_mode_class

        # the mode's __torch_function__ runs as a frame of its own in the eager parts of a
        # compiled function (after a graph break): dynamo must not compile it (nor what it
        # calls) there; it still traces it inline, where it is the call it wraps
        code = cuda_to_cpu_mode_class().__torch_function__.__code__
        set_code_exec_strategy(code, FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP))
        torch._dynamo.register_backend(_on_card, name=BACKEND)
    except Exception:
        return False
    _ready = True
    return True


def _static_state(gm: Any, tensor: type) -> list[Any]:
    """The host tensors a graph holds that dynamo marked static: optimizer state it made while
    tracing (``mark_static_address`` on ``optimizer.state``), which on CUDA is on the card."""
    from torch._dynamo.utils import get_static_address_type

    held = [*gm.buffers(), *(v for v in vars(gm).values() if isinstance(v, tensor))]
    return [t for t in held if t.dim() > 0 and get_static_address_type(t) is not None]


def _card_of(sim: Any, tensors: Any, tensor: type) -> int:
    for t in tensors:
        if isinstance(t, tensor):
            index = sim.index_of(t)
            if index is not None:
                return int(index)
    return int(sim.current_device())


def _on_card(gm: Any, example_inputs: Any) -> Callable[..., Any]:
    """The backend: the graph as dynamo captured it, run op by op under the simulation's modes,
    what it makes from nothing on the card of its inputs."""
    import torch

    tensor = torch.Tensor
    state = _static_state(gm, tensor)
    forward = gm.forward

    def run(*args: Any) -> Any:
        __tracebackhide__ = True  # IPython hides this frame: torch's error is the user's
        sim = active()  # the running simulation selects itself, and deselects itself as it stops
        if not isinstance(sim, SimulatedGPU):
            return forward(*args)
        index = _card_of(sim, (*args, *gm.parameters(), *gm.buffers()), tensor)
        if state:
            waiting = [t for t in state if sim.index_of(t) is None]
            if waiting:
                sim.track(*waiting, device=index)  # torch's OOM where it does not fit
            state.clear()
        with sim.placement.within(index):
            return forward(*args)

    return run

"""Allocation history with Python stacks: torch's own on CUDA, a recorder on the simulated GPU.

On CUDA, ``torch.cuda.memory._record_memory_history`` keeps a stack for every live block and a ring
buffer of alloc/free events; ``_snapshot()`` reads them. On the simulated GPU, :class:`Recorder`
does the same for each counted storage (``simulated.record_history``): a short stack walked with
``sys._getframe`` (no source lines read), kept until the storage dies, and events in a ring buffer
of ``max_entries``, written as the pickle PyTorch's memory viewer opens.

The model module an allocation came from (``layer4.1.conv2``) is tracked with global
``nn.Module`` forward hooks (``_trace_modules.py``: a per-thread stack of the modules whose forward
is running); on CUDA it travels with the allocation as the allocator's user metadata where torch
has it (``_set_memory_metadata``). The hooks cost a few microseconds per module call:
``modules=False`` leaves them out.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from collections.abc import Container
from typing import Any, NamedTuple

from jupyter_gpumem.backends import _trace_modules, simulated
from jupyter_gpumem.backends._trace_modules import ModuleToken, current_module, token
from jupyter_gpumem.backends.allocator import rounded

Frame = tuple[str, int, str]  # (filename, line, function), as torch's snapshot has them

_MAX_FRAMES = 64  # a walk stops at the first notebook frame; this bounds it elsewhere
_HERE = os.path.dirname(os.path.abspath(__file__))
_OWN_FILES = frozenset(
    [
        os.path.join(_HERE, name)
        for name in ("cuda_to_cpu.py", "alloc_history.py", "_trace_modules.py")
    ]
    + [
        os.path.join(_HERE, "simulated", name)
        for name in ("card.py", "counting.py", "gpu.py", "lifecycle.py", "cuda_api.py")
    ]
)
_BASE_ADDRESS = 0x7F0000000000  # simulated addresses: made up, never reused, 512-aligned


class Allocation(NamedTuple):
    """One live allocation (a storage on the simulated GPU, a block on CUDA)."""

    nbytes: int
    frames: tuple[Frame, ...]  # innermost first; empty when allocated before tracing started
    module: ModuleToken | None


# ---- the simulated GPU's recorder ---------------------------------------------------------------


def _block_size(nbytes: int) -> int:
    """The block the caching allocator gives a request (``round_size`` under torch's default
    settings: 512-byte granularity); the snapshot puts each live block's real address and size
    in its place."""
    return rounded(nbytes)


class Recorder:
    """Stacks of the live storages and a ring buffer of events, for one tracing session.

    Called by the simulated GPU under its lock: ``alloc`` for each batch of new storages, ``free``
    when one dies, ``oom`` when an allocation fails.
    """

    def __init__(self, max_entries: int, stop_files: Container[str] = (), modules: bool = True):
        # (action, addr, size, frames, time_us, device[, device_free])
        self.events: collections.deque[tuple[Any, ...]] = collections.deque(maxlen=max_entries)
        self.records: dict[int, tuple[int, tuple[Frame, ...], ModuleToken | None]] = {}
        self.stop_files = stop_files
        self.modules = modules
        self._stacks: dict[tuple[Frame, ...], tuple[Frame, ...]] = {}  # one copy of each stack
        self._next = _BASE_ADDRESS

    def _stack(self) -> tuple[Frame, ...]:
        frame: Any = sys._getframe(4)  # past _stack, alloc or oom, _commit or _fail, _count
        own, stop = _OWN_FILES, self.stop_files
        frames: list[Frame] = []
        while frame is not None and len(frames) < _MAX_FRAMES:
            code = frame.f_code
            filename = code.co_filename
            if filename not in own:
                frames.append((filename, frame.f_lineno, code.co_name))
                if filename in stop or filename.startswith("<ipython-input-"):
                    break
            frame = frame.f_back
        stack = tuple(frames)
        return self._stacks.setdefault(stack, stack)

    def _claim(self, nbytes: int) -> int:
        addr = self._next
        self._next += max(_block_size(nbytes), 512)
        return addr

    def alloc(self, new: dict[int, tuple[Any, int]], device: int = 0) -> None:
        frames = self._stack()
        module = current_module() if self.modules else None
        now = time.time_ns() // 1000
        records, append = self.records, self.events.append
        for key, (_storage, nbytes) in new.items():
            addr = self._claim(nbytes)
            records[key] = (addr, frames, module)
            size = _block_size(nbytes)
            append(("segment_alloc", addr, size, frames, now, device))
            append(("alloc", addr, size, frames, now, device))

    def free(self, key: int, nbytes: int, device: int = 0) -> None:
        record = self.records.pop(key, None)
        if record is None:
            return
        addr, size, now, append = (
            record[0],
            _block_size(nbytes),
            time.time_ns() // 1000,
            self.events.append,
        )
        append(("free_requested", addr, size, (), now, device))
        append(("free_completed", addr, size, (), now, device))
        append(("segment_free", addr, size, (), now, device))

    def oom(self, size: int, device_free: int, device: int = 0) -> None:
        now = time.time_ns() // 1000
        self.events.append(("oom", 0, size, self._stack(), now, device, device_free))


def _frame_dicts(frames: tuple[Frame, ...]) -> list[dict[str, Any]]:
    return [{"filename": f, "line": line, "name": name} for f, line, name in frames]


def simulated_snapshot(sim: simulated.SimulatedGPU, recorder: Recorder | None) -> dict[str, Any]:
    """``torch.cuda.memory._snapshot()``'s format for the simulated cards.

    The segments and blocks are the cards' own (their caching allocator's, ``memory_snapshot``),
    each live block given the stack that allocated its storage; the events are the recorder's,
    with the addresses and sizes of the blocks still live, so that the trace and the segments
    agree where the memory viewer joins them.
    """
    recorder = recorder if recorder is not None else Recorder(1)
    segments: list[dict[str, Any]] = []
    # (device, the recorder's address) -> (the live block's address, size)
    real: dict[tuple[int, int], tuple[int, int]] = {}
    for card in sim.devices:
        frames_at: dict[int, list[dict[str, Any]]] = {}
        for key, block in _live_blocks(card):
            record = recorder.records.get(key)
            if record is not None:
                frames_at[block.ptr] = _frame_dicts(record[1])
                real[(card.device_index, record[0])] = (block.ptr, block.size)
        for segment in card.memory_snapshot():
            for b in segment.get("blocks", ()):
                if b.get("state") == "active_allocated":
                    b["frames"] = frames_at.get(b["address"], [])
                    # the segment's stack: its first live block's (the cudaMalloc's is not kept)
                    segment["frames"] = segment.get("frames") or b["frames"]
            segments.append(segment)
    traces: list[list[dict[str, Any]]] = [[] for _ in sim.devices]
    for event in recorder.events:  # each card's events in its own trace, as torch keeps them
        if 0 <= event[5] < len(traces):
            traces[event[5]].append(_trace_entry(event, real.get((event[5], event[1]))))
    return {"segments": segments, "device_traces": traces, "allocator_settings": {}}


def _live_blocks(card: Any) -> list[tuple[int, Any]]:
    """(storage key, allocator block) of each storage counted on the card."""
    refs = list(getattr(card, "_live", {}).items())
    return [(key, ref.block) for key, ref in refs if getattr(ref, "block", None) is not None]


def _trace_entry(event: tuple[Any, ...], block: tuple[int, int] | None) -> dict[str, Any]:
    addr, size = block if block is not None else (event[1], event[2])
    entry = {
        "action": event[0],
        "addr": addr,
        "size": size,
        "stream": 0,
        "frames": _frame_dicts(event[3]),
        "time_us": event[4],
    }
    if event[0] == "oom":
        entry["device_free"] = event[6]
        del entry["addr"]
    return entry


# ---- tracing on and off ---------------------------------------------------------------------------

_lock = threading.Lock()
_recorder: Recorder | None = None
_cuda = False
_active = False


def start(max_entries: int, *, stop_files: Container[str] = (), modules: bool = True) -> None:
    """Record allocations with their stacks from now on (CUDA where there is a GPU, the simulated
    GPU always). ``stop_files``: files whose frames end a walk (the notebook's cells)."""
    global _recorder, _cuda, _active
    import torch

    with _lock:
        _stop_locked(torch)
        _recorder = Recorder(max_entries, stop_files, modules)
        simulated.record_history(_recorder)
        set_metadata = None
        if torch.cuda.is_available() and simulated.current() is None:
            memory = torch.cuda.memory
            try:
                memory._record_memory_history(max_entries=max_entries, stacks="python")
            except TypeError:  # older signature
                memory._record_memory_history(max_entries=max_entries)
            _cuda = True
            set_metadata = getattr(memory, "_set_memory_metadata", None)
        if modules:
            _trace_modules.add_hooks(torch, set_metadata)
        _active = True


def stop() -> None:
    """Stop recording and forget what was recorded. Safe to call again."""
    with _lock:
        _stop_locked(sys.modules.get("torch"))


def _stop_locked(torch: Any) -> None:
    global _recorder, _cuda, _active
    _trace_modules.remove_hooks()
    if _recorder is not None:
        simulated.record_history(None)
    if _cuda and torch is not None:
        try:
            torch.cuda.memory._record_memory_history(None)
        except Exception:
            pass
    _recorder, _cuda, _active = None, False, False
    _trace_modules.forget_models()


def active() -> bool:
    return _active


def traced_model(model_id: int) -> Any:
    """The model (outermost module) whose id a :class:`ModuleToken` starts with, while it is
    alive; None once it is gone (the id may since be another object's)."""
    return _trace_modules.module_root((model_id, ""))


def live_allocations(device: int | None = None) -> list[Allocation]:
    """What is allocated now on ``device`` (None: on every device), each with the stack that
    allocated it ([] when tracing is off)."""
    if not _active:
        return []
    sim = simulated.current()
    if sim is not None:
        recorder = _recorder
        records = recorder.records if recorder is not None else {}
        out = []
        cards = sim.devices if device is None else (sim.card(device),)
        for key, nbytes in (s for card in cards for s in card.live_storages()):
            record = records.get(key)
            if record is None:
                out.append(Allocation(nbytes, (), None))
            else:
                out.append(Allocation(nbytes, record[1], record[2]))
        return out
    if _cuda:
        return _cuda_allocations(device)
    return []


def _cuda_allocations(device: int | None) -> list[Allocation]:
    """The live blocks of torch's snapshot on ``device`` (None: every device's), with their
    stacks and the module each came from."""
    torch = sys.modules["torch"]
    try:
        snap = torch.cuda.memory._snapshot()
    except Exception:
        return []
    meta_at: dict[tuple[int, int], Any] = {}  # (device, address) -> the allocation's metadata
    for index, trace in enumerate(snap.get("device_traces") or ()):
        if device is not None and index != device:
            continue
        for entry in trace:
            if entry.get("action") == "alloc" and "user_metadata" in entry:
                meta_at[(index, entry.get("addr", -1))] = entry["user_metadata"]
    out = []
    for seg in snap.get("segments", ()):
        on = seg.get("device", 0)
        if device is not None and on != device:
            continue
        addr = seg.get("address", 0)
        for block in seg.get("blocks", ()):
            if block.get("state") == "active_allocated":
                frames = tuple(
                    (str(f.get("filename", "")), int(f.get("line", 0)), str(f.get("name", "")))
                    for f in block.get("frames", ())
                )
                meta = block.get("user_metadata", meta_at.get((on, addr)))
                nbytes = int(block.get("requested_size", block.get("size", 0)))
                out.append(Allocation(nbytes, frames, token(meta)))
            addr += int(block.get("size", 0))
    return out


def snapshot() -> dict[str, Any]:
    """``torch.cuda.memory._snapshot()`` (segments with their blocks' stacks, and the event history),
    or the same for the simulated card; the pickle of it is what https://pytorch.org/memory_viz
    opens."""
    sim = simulated.current()
    if sim is not None:
        return simulated_snapshot(sim, _recorder)
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU here: use `%gpumem simulate SIZE` to rehearse a small card")
    return dict(torch.cuda.memory._snapshot())

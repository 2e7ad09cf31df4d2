"""The rule about the caching allocator: fragmentation, measured before it is named, and advice
that knows the settings the allocator runs with.

Measured (``AllocatorState.blocks``, from the snapshot's segments): what is reserved but
unallocated in free blocks too small for the request, in the request's pool. Not measured (no
segments to read): the message's "reserved but unallocated", said as an upper bound.

The advice changes something or is not given: never ``expandable_segments:True`` when it is on
(PyTorch's own message repeats it, pytorch issue 173049), nothing about it under the
``cudaMallocAsync`` backend, which does not use it; a new setting keeps the user's others, and says
that the allocator read the variable once, when CUDA started.
"""

from __future__ import annotations

from jupyter_gpumem.diagnosis.facts import Facts, _closes
from jupyter_gpumem.diagnosis.model import Cause
from jupyter_gpumem.readings.allocator_state import AllocatorState, FreeBlocks
from jupyter_gpumem.units import format_bytes as fmt

_EXPANDABLE = "expandable_segments:True"
_RUNTIME = "torch.cuda.memory._set_allocator_settings('expandable_segments:True')"


def settings_advice(a: AllocatorState | None) -> str:
    """What to change in the allocator's settings against fragmentation, or why nothing."""
    if a is None:
        return (
            f"If it is not set yet, set PYTORCH_CUDA_ALLOC_CONF={_EXPANDABLE} before torch "
            "starts (restart the kernel)."
        )
    if a.conf is None:
        return f"PYTORCH_CUDA_ALLOC_CONF is refused by torch ({a.conf_error}): fix it first."
    conf = a.conf
    if not conf.native:
        return (
            f"The {conf.backend} backend pools memory itself; expandable_segments does not apply "
            "to it. Clear cache returns its unused pool to the driver."
        )
    if conf.expandable_segments:
        where = "the allocator runs with" if a.from_allocator else "PYTORCH_CUDA_ALLOC_CONF sets"
        return (
            f"{_EXPANDABLE} is already on ({where} it): no allocator setting frees these blocks; "
            "free the tensors between them or make the cell smaller."
        )
    if a.restart_pending:
        return (
            f"PYTORCH_CUDA_ALLOC_CONF now sets {_EXPANDABLE}, but the allocator read its settings "
            "when CUDA started, before that: restart the kernel for it to apply."
        )
    value = _with_expandable(a.env_conf.text if a.env_conf is not None else "")
    if a.cuda_started:
        return (
            f"Set PYTORCH_CUDA_ALLOC_CONF={value} and restart the kernel: the allocator read "
            f"its settings once, when CUDA started (in this session, `{_RUNTIME}` applies it to "
            "segments allocated from now on)."
        )
    return f"Set PYTORCH_CUDA_ALLOC_CONF={value} before the first CUDA allocation."


def _with_expandable(text: str) -> str:
    """The user's setting with expandable segments on, the rest of it kept as written."""
    kept = [t.strip() for t in text.split(",") if t.strip()]
    kept = [t for t in kept if t.split(":")[0].strip() != "expandable_segments"]
    return ",".join([*kept, _EXPANDABLE])


def fragmentation(f: Facts) -> Cause | None:
    req = f.requested_bytes
    a = f.allocator
    if not req:
        return None
    if a is not None and a.blocks is not None:
        return _measured(f, a, a.blocks, req)
    unalloc = f.report.reserved_unallocated_bytes
    if unalloc is None and f.reserved_bytes is not None and f.allocated_bytes is not None:
        unalloc = f.reserved_bytes - f.allocated_bytes
    if not unalloc or not (unalloc >= req or unalloc >= f.big):
        return None
    closes = _closes(unalloc, f)
    evidence = (
        f"{fmt(unalloc)} is reserved by PyTorch but unallocated"
        + (f", more than the {fmt(req)} requested" if unalloc >= req else "")
        + ": the free blocks are too small or scattered (not measured: the allocator's blocks "
        "could not be read)."
    )
    if closes is False:
        evidence += f" Returning it gives {fmt(unalloc)} of the {fmt(f.short)} missing."
    return Cause(
        "fragmentation",
        "Memory is fragmented",
        evidence,
        f"Clear cache returns the free blocks to the driver. {settings_advice(a)}",
        float(unalloc),
        unalloc,
        closes,
    )


def _measured(f: Facts, a: AllocatorState, b: FreeBlocks, req: int) -> Cause | None:
    """Fragmentation from the blocks themselves: named only where blocks too small for the
    request hold a share worth naming."""
    frag = b.too_small_bytes
    if not frag or not (frag >= req or frag >= f.big):
        return None
    closes = _closes(frag, f)
    evidence = (
        f"{fmt(frag)} of the {fmt(b.unallocated_bytes)} reserved but unallocated sits in "
        f"{b.too_small_blocks} free block{'s' if b.too_small_blocks != 1 else ''} of the "
        f"{b.pool} pool too small for the {fmt(req)} request (the largest is "
        f"{fmt(b.largest_bytes)})."
    )
    if closes is False:
        evidence += f" Usable, it would give {fmt(frag)} of the {fmt(f.short)} missing."
    if b.releasable_bytes:
        clear = f"Clear cache returns {fmt(b.releasable_bytes)} held in segments with no tensor."
    else:
        clear = "Clear cache cannot return them: every such block shares a segment with tensors."
    return Cause(
        "fragmentation",
        "Memory is fragmented",
        evidence,
        f"{clear} {settings_advice(a)}",
        float(frag),
        frag,
        closes,
    )

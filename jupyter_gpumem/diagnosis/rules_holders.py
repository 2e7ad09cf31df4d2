"""The rules about who holds the memory and where else it could go: variables from earlier cells,
old values a cell rebuilds, other processes, another GPU with room, IPython's output cache, what
the failure pinned, and the cell's own working set (fragmentation: ``rules_allocator``).

Each names the holders and the bytes, and says whether its action frees enough to close the gap
(:func:`~jupyter_gpumem.diagnosis.facts._closes`), which is what the ranking reads.
"""

from __future__ import annotations

from jupyter_gpumem.diagnosis.facts import Facts, _closes, _names
from jupyter_gpumem.diagnosis.model import Cause
from jupyter_gpumem.readings.snapshot import KERNEL
from jupyter_gpumem.units import format_bytes as fmt


def old_variables(f: Facts) -> Cause | None:
    unused = [h for h in f.unused if h.total_bytes >= f.big]
    if not unused:
        return None
    held = sum(h.total_bytes for h in unused)
    return Cause(
        "old_variables",
        "Variables from earlier cells hold memory",
        (
            f"`{unused[0].name}` holds {fmt(held)} on the GPU; this cell does not use it."
            if len(unused) == 1
            else f"{_names(unused)} ({fmt(held)} in all) stay on the GPU; this cell does not "
            "use them."
        ),
        f"Delete what you no longer need (`del {unused[0].name}`) and re-run, or use Clear cache, "
        "which offers them one by one.",
        float(held),
        held,
        _closes(held, f),
    )


def recreated_variables(f: Facts) -> Cause | None:
    stale = [h for h in f.recreated if h.total_bytes >= f.big]
    if not stale:
        return None
    held = sum(h.total_bytes for h in stale)
    one = len(stale) == 1
    return Cause(
        "recreated_variables",
        "Old values of variables this cell rebuilds",
        f"{_names(stale)} from an earlier run {'stays' if one else 'stay'} allocated while this "
        f"cell builds {'a new one' if one else 'new ones'}: {fmt(held)} needed twice.",
        f"`del {', '.join(h.name for h in stale[:3])}` before re-running, or Clear cache (it drops "
        "them, since this cell recreates them).",
        float(held),
        held,
        _closes(held, f),
    )


def other_processes(f: Facts) -> Cause | None:
    big_others = [p for p in f.other_processes if p.used_bytes >= f.big]
    if not big_others:
        return None
    who = ", ".join(
        f"pid {p.pid}{f' ({p.description})' if p.description else ''} {fmt(p.used_bytes)}"
        for p in big_others[:3]
    )
    named = [p for p in big_others if "the kernel of notebook" in p.description]
    kernels = [p for p in big_others if p.description == KERNEL]  # read from /proc: no notebook
    kernel = any("notebook kernel" in p.description for p in big_others)
    if named:
        action = (
            f"Shut down {named[0].description.split(' (')[0]} if you are done with it: "
            f"`%gpumem shutdown {named[0].pid}` (it asks first), then re-run."
        )
    elif kernels:
        action = (
            "Shut down the other notebook's kernel if you are done with it: `%gpumem shutdown "
            f"{kernels[0].pid}` names its notebook and asks first, then re-run."
        )
    elif kernel:
        action = "Shut down the other notebook's kernel (Kernel > Shut Down Kernel) and re-run."
    else:
        action = "Stop those processes or move to a free GPU (CUDA_VISIBLE_DEVICES)."
    return Cause(
        "other_processes",
        "Other processes use the GPU",
        f"{who}: {fmt(f.others_bytes)} this process cannot use.",
        action,
        float(f.others_bytes),
        f.others_bytes,
        _closes(f.others_bytes, f),
    )


def other_gpu(f: Facts) -> Cause | None:
    """Another visible GPU has room for everything this one holds for the process and the
    request: moving the work there makes the cell fit without changing it."""
    snap, req = f.snapshot, f.requested_bytes
    if snap is None or req is None or f.report.backend == "CPU" or len(snap.all_devices) < 2:
        return None
    need = (f.allocated_bytes or 0) + req
    best, room = None, 0
    for other in snap.all_devices:
        if other.device_index == snap.device_index or other.free_bytes is None:
            continue
        free = other.free_bytes
        if other.allowed_bytes is not None:
            free = min(free, max(other.allowed_bytes - (other.reserved_bytes or 0), 0))
        if free > room:
            best, room = other, free
    if best is None:
        return None
    k = best.device_index
    own = f.cell_bytes + req  # what this cell itself needs, leaving earlier cells' memory be
    if room < need:
        if room < own or not f.resident_bytes:
            return _tensor_elsewhere(f, k, room) if room >= req else None
        return Cause(
            "other_gpu",
            f"GPU {k} has room for this cell's work",
            f"GPU {k} has {fmt(room)} free; this cell allocated {fmt(f.cell_bytes)} and asked "
            f"for {fmt(req)} more ({fmt(own)} together), while the {fmt(f.resident_bytes)} "
            f"earlier cells hold stays on GPU {snap.device_index}.",
            f"Run this cell's work on GPU {k}: make its model and tensors with "
            f"`device='cuda:{k}'` (or `.to('cuda:{k}')`), inputs included.",
            float(own),
            room,
            True,
        )
    models = [h for h in f.holders.holders if h.kind == "model" and h.where == "variable"]
    name = models[0].name if models else "model"
    return Cause(
        "other_gpu",
        f"GPU {k} has room",
        f"GPU {k} has {fmt(room)} free; this cell needs about {fmt(need)} there "
        f"({fmt(f.allocated_bytes or 0)} allocated on GPU {snap.device_index} plus the "
        f"{fmt(req)} it asked for).",
        f"GPU {k} has {fmt(room)} free: `{name}.to('cuda:{k}')` (and its inputs), or "
        f'`device_map="auto"` for a Hugging Face model.',
        float(need),
        room,
        True,
    )


def _tensor_elsewhere(f: Facts, k: int, room: int) -> Cause:
    """The cell's work does not fit GPU ``k`` whole, but the tensor that did not fit does: put
    that one there (the rest stays), and move what it is combined with."""
    here = f.snapshot.device_index if f.snapshot is not None else 0
    req = f.requested_bytes or 0
    return Cause(
        "other_gpu",
        f"GPU {k} has room for the tensor that did not fit",
        f"The allocation that failed ({fmt(req)}) fits on GPU {k}, which has {fmt(room)} free; "
        f"this cell's work as a whole ({fmt(f.cell_bytes + req)}) does not.",
        f"Make that tensor on GPU {k}: `device='cuda:{k}'` where the failing line creates it "
        f"(or `.to('cuda:{k}')`), and move what it is combined with there too (an op mixing "
        f"cuda:{here} and cuda:{k} tensors raises); the rest stays on GPU {here}.",
        float(req),
        room,
        True,
    )


def output_cache(f: Facts) -> Cause | None:
    if f.cache_bytes < f.big:
        return None
    return Cause(
        "output_cache",
        "The output cache holds tensors",
        f"IPython's output cache (`Out`, `_`) holds {fmt(f.cache_bytes)} of cell results.",
        "Clear cache can drop it (`%reset -f out` does the same).",
        float(f.cache_bytes),
        f.cache_bytes,
        _closes(f.cache_bytes, f),
    )


def pinned_by_failure(f: Facts) -> Cause | None:
    if not f.frames_bytes:
        return None
    if f.released and f.freed_bytes is not None:
        return Cause(
            "pinned_by_failure",
            "The failure pinned memory",
            f"The failed call's locals held {fmt(f.frames_bytes)}, and kept alive what they "
            f"reference (saved activations, the autograd graph): {fmt(f.freed_bytes)} was freed "
            "after the failure.",
            "Nothing to do: that memory is already back.",
            0.0,
            0,
            None,
            tier=3,
        )
    return Cause(
        "pinned_by_failure",
        "The failure pinned memory",
        f"The failed call's locals hold {fmt(f.frames_bytes)} until they are freed.",
        "Run `%gpumem release` to get it back: their tensors move to host memory, and `%debug` "
        "still shows them.",
        float(f.frames_bytes),
        f.frames_bytes,
        None,  # it was needed by the failing run itself: freeing it does not make the cell fit
    )


def working_set(f: Facts) -> Cause | None:
    req = f.requested_bytes
    if req is None or f.report.backend == "CPU":
        return None
    ws = f.cell_bytes + req
    held = f" (on top of {fmt(f.resident_bytes)} held before it ran)" if f.resident_bytes else ""
    short = f": {fmt(f.short)} more than there was room for" if f.short else ""
    batch = f" The batch: {f.batch}." if f.batch else ""
    return Cause(
        "working_set",
        "The cell's own working set is too big",
        f"This cell had allocated {fmt(f.cell_bytes)}{held} when it asked for {fmt(req)} more"
        f"{short}.{batch}",
        "Reduce the batch size, enable autocast (bf16) or move the work to the CPU: the fix "
        "buttons (or `%gpumem retry`) predict what each saves.",
        float(ws),
        ws,
        # a smaller batch shrinks what the cell allocates: enough if the cell's part covers it
        _closes(ws, f),
    )

"""The causes of an OOM, as a table of rules: each says whether it applies, with its evidence in
numbers, one action, what that action would free, and whether that is enough.

Ranking (:func:`rank`): first what no fix can get around (a single allocation larger than the
card, a host-memory failure, a probable but unproven OOM); then the causes whose action closes the
gap, largest saving first; then those whose action helps but is not enough; last what needs
nothing (memory the failure pinned, already given back). A cause is never ranked first on its size
alone when its action cannot make the cell fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .units import format_bytes as fmt

if TYPE_CHECKING:
    from .diagnosis import Diagnosis
    from .holders import Holder

CauseKey = Literal[
    "probable",
    "library",
    "host_memory",
    "request_exceeds_card",
    "model_states_exceed_card",
    "process_cap",
    "old_variables",
    "recreated_variables",
    "other_processes",
    "other_gpu",
    "fragmentation",
    "output_cache",
    "pinned_by_failure",
    "working_set",
    "unknown",
]
# 0: no fix here gets around it; 1: its action closes the gap; 2: helps, not enough (or cannot
# tell); 3: nothing to do
Tier = Literal[0, 1, 2, 3]

_SIGNIFICANT = 0.05  # a holder or process under 5% of the card is not a cause on its own
_MiB = 1 << 20
# The CUDA caching allocator asks the driver for whole segments: 2 MiB for requests up to 1 MiB,
# 20 MiB for requests up to 10 MiB. An OOM message names the segment, not the tensor.
_SEGMENTS = {2 * _MiB: 1 * _MiB, 20 * _MiB: 10 * _MiB}


@dataclass(frozen=True)
class Cause:
    key: CauseKey
    title: str
    evidence: str  # the numbers
    action: str  # one concrete thing to do
    weight: float  # bytes of the shortfall it explains (for ranking within a tier)
    saving_bytes: int | None = None  # what the action would free
    closes_gap: bool | None = None  # that saving covers the shortfall (None: cannot tell)
    tier: Tier = 2
    cell: str = ""  # a ready cell the user may insert (never run for them)

    @property
    def needs_nothing(self) -> bool:
        return self.tier == 3


@dataclass(frozen=True)
class Facts:
    """What the rules read, computed once."""

    d: Diagnosis
    frames_bytes: int  # held by the failed frames at the failure
    cache_bytes: int  # IPython's output cache
    others_bytes: int  # other processes on the card
    big: int  # the size below which a single holder is not a cause
    short: int  # bytes the allocation lacked (0 when unknown)
    resident_bytes: int  # held by variables that existed before the cell ran
    cell_bytes: int  # allocated by the cell itself when it failed
    # the number that sized the failing tensors and where it lives, when Reduce batch found it
    # ("`test_loader.batch_size` = 1000 sizes `data` (1000, 1, 28, 28)")
    batch: str = ""


Rule = Callable[[Facts], "Cause | None"]


def _closes(saving: int | None, f: Facts) -> bool | None:
    if saving is None or not f.short:
        return None
    return saving >= f.short


def _names(holders: list[Holder], limit: int = 3) -> str:
    shown = ", ".join(f"`{h.name}` {fmt(h.total_bytes)}" for h in holders[:limit])
    more = len(holders) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def tensor_upper_bound(requested: int) -> int:
    """The largest tensor that can stand behind a request of this size (segments are rounded)."""
    return _SEGMENTS.get(requested, requested)


# ---- the rules ---------------------------------------------------------------------------------


def probable(f: Facts) -> Cause | None:
    r = f.d.report
    if not r.probable:
        return None
    return Cause(
        "probable",
        f"Probably out of memory ({r.status})",
        f"{r.status} is raised when a library cannot get workspace memory, and sometimes for "
        "other reasons.",
        "Run the cell again after Clear cache; if it still fails with more than half the card "
        "free, it is not a memory problem.",
        float("inf"),
        tier=0,
    )


def library(f: Facts) -> Cause | None:
    r = f.d.report
    if r.kind != "library" or r.probable:
        return None
    return Cause(
        "library",
        "A GPU library could not get its workspace",
        f"{r.status}: cuBLAS, cuDNN and cuFFT allocate their own workspace outside PyTorch's "
        "tensors, from what the allocator has left.",
        "Clear cache returns PyTorch's cached blocks so the library can get memory; if it still "
        "fails, reduce the batch size.",
        0.0,
    )


def host_memory(f: Facts) -> Cause | None:
    d = f.d
    if d.report.backend != "CPU":
        return None
    req = d.requested_bytes
    return Cause(
        "host_memory",
        "The machine's memory (RAM) ran out, not the GPU's",
        (f"The CPU allocator could not get {fmt(req)}." if req else d.report.message[:200]),
        "Hold less in host memory: a smaller batch, a dataset read lazily instead of loaded "
        "whole, `del` of large CPU arrays. Moving work to the CPU cannot help here.",
        float("inf"),
        tier=0,
    )


def request_exceeds_card(f: Facts) -> Cause | None:
    d = f.d
    req, cap = d.requested_bytes, d.capacity_bytes
    if d.report.backend == "CPU" or req is None or cap is None:
        return None
    if tensor_upper_bound(req) <= cap:
        return None  # a rounded segment larger than a small card: the tensor itself may fit
    whole = "the per-process cap" if d.allowed_bytes is not None else "the whole card"
    if f.batch:
        # the allocation is batch-sized: a smaller batch shrinks it, so this is not a dead end
        return Cause(
            "request_exceeds_card",
            "At this batch, one allocation is larger than the card",
            f"{f.batch}; at that size it tried to allocate {fmt(req)}, and {whole} is {fmt(cap)}.",
            "Reduce the batch (`%gpumem retry batch` finds the largest that fits); the "
            "allocation shrinks with it.",
            float("inf"),
            closes_gap=True,
            tier=1,
        )
    return Cause(
        "request_exceeds_card",
        "One allocation is larger than the card",
        f"Tried to allocate {fmt(req)}; {whole} is {fmt(cap)}.",
        "Check the tensor's shape (a wrong dimension, or a batch of everything at once); split "
        "the work into chunks. No fix here can make this single allocation fit.",
        float("inf"),
        tier=0,
    )


# Adam-family optimizers keep two fp32 moments per parameter; created at the first step.
_ADAM = ("Adam", "AdamW", "NAdam", "RAdam", "Adamax", "FusedAdam")
# The fraction of the card that must stay for activations, the CUDA context and workspaces.
_HEADROOM = 0.9
_LAUNCH_CELL = """\
# Train on several GPUs with FSDP (sharded weights, gradients and optimizer state), from a notebook.
# Put the training into a function that builds the model and optimizer inside it, then:
from accelerate import notebook_launcher, FullyShardedDataParallelPlugin, Accelerator

def training_function():
    accelerator = Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin())
    model, optimizer, loader = build()  # your code: the model, optimizer and DataLoader
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for batch in loader:
        loss = compute_loss(model, batch)  # your code
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

notebook_launcher(training_function, num_processes=NUM_GPUS)
"""


def model_states_exceed_card(f: Facts) -> Cause | None:
    """Weights + gradients + optimizer state alone leave no room for any batch: past one GPU."""
    d = f.d
    cap = d.capacity_bytes
    if cap is None or d.report.backend == "CPU":
        return None
    models = [h for h in d.holders.holders if h.kind == "model" and h.where == "variable"]
    if not models:
        return None
    weights = sum(h.parameters_bytes + h.buffers_bytes for h in models)
    params = sum(h.parameters_bytes for h in models)
    grads = max(sum(h.gradients_bytes for h in models), params if _trains(d) else 0)
    opts = [h for h in d.holders.holders if h.kind == "optimizer" and h.where == "variable"]
    state = sum(h.optimizer_state_bytes for h in opts)
    types = {h.detail.split(",")[0] for h in opts} | set(d.holders.optimizer_types)
    if types & set(_ADAM):
        state = max(state, 2 * params)  # Adam's moments appear at the first step
    states = weights + grads + state
    if states <= _HEADROOM * cap:
        return None
    per = ", ".join(f"{n} GPUs {fmt(states // n)} each" for n in (2, 4, 8))
    return Cause(
        "model_states_exceed_card",
        "The model's own states do not fit this card, whatever the batch",
        f"Weights {fmt(weights)} + gradients {fmt(grads)} + optimizer state {fmt(state)} = "
        f"{fmt(states)}, on a card of {fmt(cap)}: no batch size can make room.",
        "Past one GPU: shard weights, gradients and optimizer state with FSDP or DeepSpeed "
        f"ZeRO-3 through accelerate ((weights + gradients + optimizer state) / N: {per}, plus "
        "activations). On one GPU: LoRA (peft) trains a small adapter, so gradients and "
        f"optimizer state nearly vanish ({fmt(weights)} left); an 8-bit optimizer "
        f"(bitsandbytes) cuts Adam's state to a quarter ({fmt(state // 4)}); bf16 weights "
        f"halve them ({fmt(weights // 2)}). Activation checkpointing helps activations only.",
        float("inf"),
        tier=0,
        cell=_LAUNCH_CELL,
    )


def _trains(d: Diagnosis) -> bool:
    """Is this a training step (an optimizer in the namespace, with state or not yet)?"""
    return bool(d.holders.optimizer_types) or any(h.kind == "optimizer" for h in d.holders.holders)


def process_cap(f: Facts) -> Cause | None:
    d = f.d
    total = d.total_bytes
    if d.allowed_bytes is None or total is None or d.allowed_bytes >= total:
        return None
    saving = total - d.allowed_bytes
    return Cause(
        "process_cap",
        "A per-process memory cap is set",
        f"This process may use {fmt(d.allowed_bytes)} of the {fmt(total)} card.",
        "Lift it with `%gpumem limit off` (or `torch.cuda.set_per_process_memory_fraction(1.0)`) "
        "if the cap was a rehearsal.",
        float(min(saving, f.short or saving)),
        saving,
        _closes(saving, f),
    )


def old_variables(f: Facts) -> Cause | None:
    unused = [h for h in f.d.unused_variables() if h.total_bytes >= f.big]
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
    stale = [h for h in f.d.recreated_variables() if h.total_bytes >= f.big]
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
    big_others = [p for p in f.d.other_processes if p.used_bytes >= f.big]
    if not big_others:
        return None
    who = ", ".join(f"pid {p.pid} ({p.description}) {fmt(p.used_bytes)}" for p in big_others[:3])
    named = [p for p in big_others if "the kernel of notebook" in p.description]
    kernel = named or any("notebook kernel" in p.description for p in big_others)
    if named:
        action = (
            f"Shut down {named[0].description.split(' (')[0]} if you are done with it: "
            f"`%gpumem shutdown {named[0].pid}` (it asks first), then re-run."
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
    d = f.d
    snap, req = d.snapshot, d.requested_bytes
    if snap is None or req is None or d.report.backend == "CPU" or len(snap.all_devices) < 2:
        return None
    need = (d.allocated_bytes or 0) + req
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
        if not f.resident_bytes or room < own:
            return None
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
    models = [h for h in d.holders.holders if h.kind == "model" and h.where == "variable"]
    name = models[0].name if models else "model"
    return Cause(
        "other_gpu",
        f"GPU {k} has room",
        f"GPU {k} has {fmt(room)} free; this cell needs about {fmt(need)} there "
        f"({fmt(d.allocated_bytes or 0)} allocated on GPU {snap.device_index} plus the "
        f"{fmt(req)} it asked for).",
        f"GPU {k} has {fmt(room)} free: `{name}.to('cuda:{k}')` (and its inputs), or "
        f'`device_map="auto"` for a Hugging Face model.',
        float(need),
        room,
        True,
    )


def fragmentation(f: Facts) -> Cause | None:
    d = f.d
    req = d.requested_bytes
    unalloc = d.report.reserved_unallocated_bytes
    if unalloc is None and d.reserved_bytes is not None and d.allocated_bytes is not None:
        unalloc = d.reserved_bytes - d.allocated_bytes
    if not unalloc or not req or not (unalloc >= req or unalloc >= f.big):
        return None
    closes = _closes(unalloc, f)
    evidence = (
        f"{fmt(unalloc)} is reserved by PyTorch but unallocated"
        + (f", more than the {fmt(req)} requested" if unalloc >= req else "")
        + ": the free blocks are too small or scattered."
    )
    if closes is False:
        evidence += f" Returning it gives {fmt(unalloc)} of the {fmt(f.short)} missing."
    return Cause(
        "fragmentation",
        "Memory is fragmented",
        evidence,
        "Clear cache returns them to the driver; for good, set "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before torch starts (restart the "
        "kernel).",
        float(unalloc),
        unalloc,
        closes,
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
    d = f.d
    if not f.frames_bytes:
        return None
    if d.released and d.freed_bytes is not None:
        return Cause(
            "pinned_by_failure",
            "The failure pinned memory",
            f"The failed call's locals held {fmt(f.frames_bytes)}, and kept alive what they "
            f"reference (saved activations, the autograd graph): {fmt(d.freed_bytes)} was freed "
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
        "Run `%gpumem release` when done with `%debug` to get it back.",
        float(f.frames_bytes),
        f.frames_bytes,
        None,  # it was needed by the failing run itself: freeing it does not make the cell fit
    )


def working_set(f: Facts) -> Cause | None:
    d = f.d
    req = d.requested_bytes
    if req is None or d.report.backend == "CPU":
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
        "Reduce the batch size, enable autocast (bf16) or move the work to the CPU: the fixes "
        "below predict what each saves.",
        float(ws),
        ws,
        # a smaller batch shrinks what the cell allocates: enough if the cell's part covers it
        _closes(ws, f),
    )


RULES: tuple[Rule, ...] = (
    probable,
    library,
    host_memory,
    request_exceeds_card,
    model_states_exceed_card,
    process_cap,
    old_variables,
    recreated_variables,
    other_processes,
    other_gpu,
    fragmentation,
    output_cache,
    pinned_by_failure,
    working_set,
)


def rank(causes: list[Cause]) -> list[Cause]:
    """Blocking first, then what closes the gap (largest first), then what helps, then notes."""

    def tier(c: Cause) -> int:
        if c.tier in (0, 3):
            return c.tier
        return 1 if c.closes_gap else 2

    # within a tier, what costs nothing (delete, clear, lift a cap) before the working set,
    # whose remedies cost batch size or precision
    return sorted(causes, key=lambda c: (tier(c), c.key == "working_set", -c.weight))


def find_causes(f: Facts) -> list[Cause]:
    causes = [c for rule in RULES if (c := rule(f)) is not None]
    if not causes:
        causes.append(
            Cause(
                "unknown",
                "Out of memory",
                f.d.report.message[:300],
                "Clear cache and re-run; if it fails again, reduce the batch size.",
                0.0,
            )
        )
    return rank(causes)

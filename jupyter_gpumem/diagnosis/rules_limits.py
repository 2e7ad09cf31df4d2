"""The rules about the failure itself and the card's limits: a probable or a library OOM, host
memory, one allocation larger than the card, model states that no batch can fit, a per-process cap.

Most of these are tier 0: no fix here gets around them, so they are ranked first and say what
would (a smaller tensor, more GPUs, another precision).
"""

from __future__ import annotations

from jupyter_gpumem.diagnosis.facts import Facts, _closes, tensor_upper_bound
from jupyter_gpumem.diagnosis.model import Cause
from jupyter_gpumem.units import format_bytes as fmt


def probable(f: Facts) -> Cause | None:
    r = f.report
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
    r = f.report
    if r.kind != "library" or r.probable:
        return None
    blocks = f.allocator.blocks if f.allocator is not None else None
    action = (
        "Clear cache returns PyTorch's cached blocks so the library can get memory; if it still "
        "fails, reduce the batch size."
    )
    if blocks is not None and blocks.releasable_bytes:
        action = (
            f"Clear cache returns {fmt(blocks.releasable_bytes)} that PyTorch holds in segments "
            "with no tensor, for the library to use; if it still fails, reduce the batch size."
        )
    elif blocks is not None:
        action = (
            "PyTorch holds no segment without tensors, so Clear cache has nothing to return: "
            "free variables or reduce the batch size."
        )
    return Cause(
        "library",
        "A GPU library could not get its workspace",
        f"{r.status}: cuBLAS, cuDNN and cuFFT allocate their own workspace outside PyTorch's "
        "tensors, from what the allocator has left.",
        action,
        0.0,
        saving_bytes=blocks.releasable_bytes if blocks is not None else None,
    )


def host_memory(f: Facts) -> Cause | None:
    if f.report.backend != "CPU":
        return None
    req = f.requested_bytes
    return Cause(
        "host_memory",
        "The machine's memory (RAM) ran out, not the GPU's",
        (f"The CPU allocator could not get {fmt(req)}." if req else f.report.message[:200]),
        "Hold less in host memory: a smaller batch, a dataset read lazily instead of loaded "
        "whole, `del` of large CPU arrays. Moving work to the CPU cannot help here.",
        float("inf"),
        tier=0,
    )


def request_exceeds_card(f: Facts) -> Cause | None:
    req, cap = f.requested_bytes, f.capacity_bytes
    if f.report.backend == "CPU" or req is None or cap is None:
        return None
    if tensor_upper_bound(req) <= cap:
        return None  # a rounded segment larger than a small card: the tensor itself may fit
    whole = "the per-process cap" if f.allowed_bytes is not None else "the whole card"
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
    cap = f.capacity_bytes
    if cap is None or f.report.backend == "CPU":
        return None
    models = [h for h in f.holders.holders if h.kind == "model" and h.where == "variable"]
    if not models:
        return None
    weights = sum(h.parameters_bytes + h.buffers_bytes for h in models)
    params = sum(h.parameters_bytes for h in models)
    grads = max(sum(h.gradients_bytes for h in models), params if _trains(f) else 0)
    opts = [h for h in f.holders.holders if h.kind == "optimizer" and h.where == "variable"]
    state = sum(h.optimizer_state_bytes for h in opts)
    types = {h.detail.split(",")[0] for h in opts} | set(f.holders.optimizer_types)
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


def _trains(f: Facts) -> bool:
    """Is this a training step (an optimizer in the namespace, with state or not yet)?"""
    return bool(f.holders.optimizer_types) or any(h.kind == "optimizer" for h in f.holders.holders)


def process_cap(f: Facts) -> Cause | None:
    total = f.total_bytes
    if f.allowed_bytes is None or total is None or f.allowed_bytes >= total:
        return None
    saving = total - f.allowed_bytes
    return Cause(
        "process_cap",
        "A per-process memory cap is set",
        f"This process may use {fmt(f.allowed_bytes)} of the {fmt(total)} card.",
        "Lift it with `%gpumem limit off` (or `torch.cuda.set_per_process_memory_fraction(1.0)`) "
        "if the cap was a rehearsal.",
        float(min(saving, f.short or saving)),
        saving,
        _closes(saving, f),
    )

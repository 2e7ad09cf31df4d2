"""A fix's prediction from a record of the run: the run's ops (``backends/op_log.py``) replayed as
they would run under the fix, through the replay's model of the caching allocator.

Under ``torch.autocast`` (the rules of ``aten/src/ATen/autocast_mode.cpp``, read at the ops a
dispatch mode sees, below autograd):

- a matmul or convolution (``mm``, ``addmm``, ``bmm``, ``convolution``, attention) computes in
  the lower precision: its float32 inputs are cast (a copy at half their size), its output is half
  the size. A weight's copy (a leaf tensor that requires grad) is cached for the autocast block
  and made once; another input's copy lives as long as the input when autograd keeps it for the
  backward, else it dies with the op;
- the ops autocast runs in float32 (losses, ``log_softmax``; on CUDA also ``softmax``,
  ``layer_norm``, ``sum``, ...) read a float32 copy of a half-precision input and give float32;
- any other op gives half precision when the tensors it reads are half precision (type promotion:
  a float32 tensor among them makes it float32; a single number does not count);
- float64 is never cast, and the weights, their gradients (a weight's gradient comes out of the
  backward in half precision and is cast back: a short-lived half copy), and the optimizer's state
  stay float32.

So the prediction is not "half the activations": the casts add memory (why autocast can raise the
peak of a model whose weights dominate, transformers issue 29354). What the replay returns is the
reserved need of the recorded stretch (the peak a card just large enough would reach:
``blocks.BlockModel.need``) and its allocated peak, as the run was and under the fix.

A run recorded up to an OOM (the failed cell rehearsed) is replayed up to the allocation that
failed, sized from the OOM's message: the prediction is then the need at that point, which the
rest of the pass may exceed (``Prediction.partial``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from jupyter_gpumem.backends.op_log import OpEvent, OpInput, OpLog
from jupyter_gpumem.fixes.batch.blocks import BlockModel
from jupyter_gpumem.units import format_bytes

__all__ = [
    "ESTIMATE",
    "MEASURED",
    "REPLAYED",
    "Prediction",
    "basis_words",
    "need_words",
    "not_enough",
    "remember",
    "remembered",
    "replay_as_is",
    "replay_autocast",
    "scaled",
    "scaled_request",
]

# how a button's number was made, said beside it
ESTIMATE = "estimate"  # a rule of thumb: no recording of the cell yet
REPLAYED = "replayed"  # a recording of the cell replayed under the fix
MEASURED = "measured now"  # read from the allocator as it stands (Clear cache)

# ops autocast computes in the lower precision, as a dispatch mode sees them (linear and matmul
# arrive as addmm/mm/bmm; conv2d as convolution)
LOWER = frozenset(
    [
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "addbmm",
        "addmv",
        "addr",
        "mv",
        "dot",
        "vdot",
        "matmul",
        "linear",
        "convolution",
        "_convolution",
        "conv_tbc",
        "cudnn_convolution",
        "mkldnn_convolution",
        "convolution_overrideable",
        "prelu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_native_multi_head_attention",
        "_thnn_fused_lstm_cell",
        "_thnn_fused_gru_cell",
        "mkldnn_rnn_layer",
    ]
)
# ops autocast runs in float32 on every device (the losses; log_softmax: cross_entropy's)
FP32 = frozenset(
    [
        "_log_softmax",
        "nll_loss_forward",
        "nll_loss2d_forward",
        "mse_loss",
        "l1_loss",
        "smooth_l1_loss",
        "huber_loss",
        "binary_cross_entropy",
        "binary_cross_entropy_with_logits",
        "kl_div",
        "soft_margin_loss",
        "multilabel_margin_loss_forward",
        "multi_margin_loss",
        "poisson_nll_loss",
        "cosine_embedding_loss",
        "margin_ranking_loss",
        "hinge_embedding_loss",
        "triplet_margin_loss",
        "_ctc_loss",
        "_cdist_forward",
        "prod",
        "trace",
    ]
)
# and on CUDA (and the devices that follow its lists) these too
FP32_CUDA = frozenset(
    [
        "_softmax",
        "native_layer_norm",
        "native_group_norm",
        "sum",
        "cumsum",
        "cumprod",
        "exp",
        "expm1",
        "log",
        "log10",
        "log2",
        "log1p",
        "pow",
        "reciprocal",
        "rsqrt",
        "acos",
        "asin",
        "cosh",
        "erfinv",
        "sinh",
        "tan",
        "softplus",
        "norm",
        "linalg_vector_norm",
        "logsumexp",
        "upsample_nearest1d",
        "upsample_nearest2d",
        "upsample_nearest3d",
        "upsample_bilinear2d",
        "upsample_linear1d",
        "upsample_trilinear3d",
        "upsample_bicubic2d",
        "dist",
        "renorm",
    ]
)
# ops whose output dtype is what the code asked for, not the inputs' (".float()", ".to()")
_EXPLICIT = frozenset(["_to_copy", "to", "copy", "_copy_from_and_resize"])
_HALF = frozenset({"float16", "bfloat16"})
_FLOAT = frozenset({"float32", "float64", "float16", "bfloat16", "low"})


@dataclass(frozen=True)
class Prediction:
    """A replay's numbers: reserved need (the peak a card just large enough reaches) and
    allocated peak, as the run was and under the fix."""

    need_before: int
    need_after: int
    peak_before: int  # allocated
    peak_after: int
    partial: bool  # replayed up to an OOM: the rest of the pass is not in it
    casts: int = 0  # bytes of cast copies the fix adds (weights' and inputs' copies)
    recorded_at: int | None = None  # the batch the cell was recorded at, when not its own
    capacity: int | None = None  # what the process may use on the card, read at the recording
    batch: int | None = None  # the cell's own batch, the recording scaled to it

    @property
    def saving_bytes(self) -> int:
        """What the fix takes off the need; negative when it adds to it."""
        return self.need_before - self.need_after


class _Replay:
    """One pass over the log, writing sized events as ``SizeLog`` has them."""

    def __init__(self, log: OpLog, autocast: bool, device_type: str) -> None:
        self.log = log
        self.autocast = autocast
        self.fp32 = FP32 if device_type == "cpu" else FP32 | FP32_CUDA
        self.size: dict[int, int] = {}  # number -> bytes under the fix
        self.low: set[int] = set()  # numbers whose storage is half precision under the fix
        self.events: list[tuple[int, int]] = []
        self.next = log.storages  # numbers for the copies the fix adds
        self.cached: dict[int, int] = {}  # a weight's cast copy: weight -> copy
        self.follow: dict[int, list[int]] = {}  # an input -> its copies that die with it
        self.casts = 0
        self.lowered: set[int] = set()  # the outputs of the last op computed in half precision

    def dtype(self, i: OpInput) -> str:
        """The input's dtype under the fix: a weight read after its cast is its half copy."""
        low = i.storage in self.low or i.storage in self.cached
        return "low" if i.dtype == "float32" and low else i.dtype

    def alloc(self, nbytes: int) -> int:
        n = self.next
        self.next += 1
        self.size[n] = nbytes
        self.events.append((n, nbytes))
        return n

    def free(self, n: int) -> None:
        if n >= 0 and n in self.size:
            self.events.append((-1, n))
            del self.size[n]
        elif n < 0 and n in self.log.resident:
            self.events.append((-2, self.log.resident[n]))
        for copy in self.follow.pop(n, ()):
            self.free(copy)

    def source_bytes(self, i: OpInput) -> int:
        if i.storage < 0:
            return self.log.resident.get(i.storage, 0)
        return self.size.get(i.storage, 0)

    def cast(self, ev: OpEvent, i: OpInput, nbytes: int, transient: list[int]) -> None:
        """A copy of input ``i`` at ``nbytes``: a weight's cached, another's kept with it when
        autograd saves it, else dropped after the op."""
        if i.storage in self.log.params:
            if i.storage not in self.cached:
                self.cached[i.storage] = self.alloc(nbytes)
                self.casts += nbytes
            return
        copy = self.alloc(nbytes)
        self.casts += nbytes
        if ev.saved:
            self.follow.setdefault(i.storage, []).append(copy)
        else:
            transient.append(copy)

    def op(self, ev: OpEvent) -> None:
        self.bias(ev)
        floats = [i for i in ev.inputs if self.dtype(i) in _FLOAT]
        kind = self.kind(ev, floats)
        if kind == "lower":
            self.lowered = {n for n, _b, _d in ev.outputs}
        transient: list[int] = []
        if kind == "lower":
            for i in {i.storage: i for i in floats if self.dtype(i) == "float32"}.values():
                self.cast(ev, i, self.source_bytes(i) // 2, transient)
        elif kind == "fp32":
            for i in {i.storage: i for i in floats if self.dtype(i) == "low"}.values():
                self.cast(ev, i, self.source_bytes(i) * 2, transient)
        weights = ev.grad_of_param or (False,) * len(ev.outputs)
        for (n, nbytes, dtype), weight in zip(ev.outputs, weights, strict=False):
            halve = kind in ("lower", "follow") and dtype == "float32"
            if halve and weight and ev.backward:  # a weight's gradient: cast back to float32
                transient.append(self.alloc(nbytes // 2))
                halve = False
            self.size[n] = nbytes // 2 if halve else nbytes
            if halve:
                self.low.add(n)
            self.events.append((n, self.size[n]))
        for copy in transient:
            self.free(copy)

    def bias(self, ev: OpEvent) -> None:
        """``linear`` on a 3-D input reaches the dispatcher as ``mm`` then ``add`` of the bias;
        autocast cast the bias with the weight, before the split: its half copy is the add's."""
        if not self.autocast or ev.op not in ("add", "add_") or ev.backward:
            return
        storages = {i.storage for i in ev.inputs}
        if not storages & self.lowered:
            return
        for i in ev.inputs:
            param = i.storage in self.log.params and i.dtype == "float32"
            if param and i.storage not in self.cached:
                nbytes = self.log.resident.get(i.storage, 0) // 2
                self.cached[i.storage] = self.alloc(nbytes)
                self.casts += nbytes

    def kind(self, ev: OpEvent, floats: list[OpInput]) -> str:
        """How the fix runs the op: "lower", "fp32", "follow" (half in, half out), or "same"."""
        if not self.autocast or not floats or ev.op in _EXPLICIT:
            return "same"
        dtypes = {self.dtype(i) for i in floats}
        if "float64" in dtypes:
            return "same"  # autocast never casts float64, and an op with it stays float64
        if ev.op in LOWER and not ev.backward:
            return "lower"
        if ev.op in LOWER and "float32" in dtypes and dtypes & ({"low"} | _HALF):
            return "lower"  # a mixed backward matmul: the float32 side arrives cast
        if ev.op in self.fp32:
            return "fp32"
        tensors = [i for i in floats if not i.scalar] or floats
        if all(self.dtype(i) in _HALF or self.dtype(i) == "low" for i in tensors):
            return "follow" if any(self.dtype(i) == "low" for i in tensors) else "same"
        return "same"

    def run(self, failed_bytes: int | None) -> tuple[int, int]:
        for ev in self.log.events:
            if ev.op:
                self.op(ev)
            elif ev.outputs[0][2] == "resident":  # known by its size alone
                self.events.append((-2, ev.outputs[0][1]))
            else:
                self.free(ev.outputs[0][0])
        if self.log.failed is not None and failed_bytes:
            ev = self.log.failed
            floats = [i for i in ev.inputs if self.dtype(i) in _FLOAT]
            kind = self.kind(ev, floats)
            transient: list[int] = []
            if kind == "lower":
                for i in {i.storage: i for i in floats if self.dtype(i) == "float32"}.values():
                    self.cast(ev, i, self.source_bytes(i) // 2, transient)
            halve = kind in ("lower", "follow") and any(i.dtype == "float32" for i in floats)
            self.alloc(failed_bytes // 2 if halve else failed_bytes)
        return BlockModel.need(self.log.resident_sizes, self.events), self.allocated_peak()

    def allocated_peak(self) -> int:
        live = peak = sum(self.log.resident_sizes)
        sizes: dict[int, int] = {}
        for n, value in self.events:
            if n >= 0:
                sizes[n] = value
                live += value
                peak = max(peak, live)
            elif n == -1:
                live -= sizes.pop(value, 0)
            else:
                live -= value
        return peak


def _fixed(log: OpLog) -> set[int]:
    """The storages whose size does not follow the batch: the weights (``log.params``) and the
    residents of a weight's size (the optimizer's state from an earlier step); a weight's gradient
    (``grad_of_param``, or of a weight's size in the backward); what is made from these alone, no larger than they are
    (``zeros_like(weight)``: Adam's state, its ``sqrt``, a cast copy); what is made from nothing
    on the GPU at a weight's size. The rest derives from a storage that may follow the batch (the batch made in the cell, a slice of a
    dataset on the card) or is made from nothing (``randn(batch, ...)``)."""
    weights = {log.resident[n] for n in log.params if n in log.resident}
    fixed = {n for n, b in log.resident.items() if n in log.params or b in weights}
    size = dict(log.resident)
    for e in log.events:
        if not e.op:
            continue
        reads = {i.storage for i in e.inputs}
        largest = max((size.get(r, 0) for r in reads), default=0)
        grads = e.grad_of_param or (False,) * len(e.outputs)
        for (n, nbytes, _d), grad in zip(e.outputs, grads, strict=False):
            size[n] = nbytes
            # made from these alone and no larger than one of them: a ``repeat(1, batch, 1)``
            # of a weight (DETR's queries) is larger, and follows the batch
            made_from_fixed = bool(reads) and reads <= fixed and nbytes <= largest
            # a weight's gradient shaped otherwise (the sum that reduces a ``repeat``'s
            # gradient keeps its dims) is of the weight's size, in the backward
            grad = grad or (e.backward and nbytes in weights)
            if grad or made_from_fixed or (not reads and nbytes in weights):
                fixed.add(n)
    return fixed


def scaled(log: OpLog, at: int, to: int) -> OpLog:
    """``log``, recorded at batch ``at`` (a prime), as the same code at batch ``to``: a storage
    whose size ``at`` divides is ``at`` samples of a per-sample size, unless it is the weights',
    their gradients', the optimizer's state or made from these alone (``_fixed``: a 784x1024
    weight's gradient is divisible by 7 and does not follow the batch); any other size does not
    follow the batch either."""
    fixed = _fixed(log)

    def size(n: int, nbytes: int) -> int:
        per_sample = nbytes and nbytes % at == 0 and n not in fixed
        return nbytes * to // at if per_sample else nbytes

    events = [
        e._replace(outputs=tuple((n, size(n, b), d) for n, b, d in e.outputs)) if e.op else e
        for e in log.events
    ]
    return dataclasses.replace(log, events=events)


def scaled_request(log: OpLog, nbytes: int | None, at: int, to: int) -> int | None:
    """The allocation that ran out (``log.failed``, of ``nbytes`` at batch ``at``) at batch
    ``to``: scaled as ``scaled`` scales a storage, but for a weight's size in the backward (a
    gradient: its shape is not known for an op that did not finish) or an op that reads only
    what does not follow the batch (Adam's state being made)."""
    ev = log.failed
    if not nbytes or nbytes % at or ev is None:
        return nbytes
    fixed = _fixed(log)
    weights = {log.resident[n] for n in log.params if n in log.resident}
    reads = {i.storage for i in ev.inputs}
    if (reads and reads <= fixed) or (nbytes in weights and (ev.backward or not reads)):
        return nbytes
    return nbytes * to // at


def replay_as_is(log: OpLog, failed_bytes: int | None = None) -> tuple[int, int]:
    """The recorded run replayed unchanged: (reserved need, allocated peak)."""
    return _Replay(log, False, "cuda").run(failed_bytes)


def replay_autocast(log: OpLog, device_type: str, failed_bytes: int | None = None) -> Prediction:
    """The recorded run as it would run under ``torch.autocast(device_type)`` (bf16 and fp16
    take the same memory). ``failed_bytes``: the size of the allocation that ran out, when the
    log ends at an OOM."""
    need_before, peak_before = replay_as_is(log, failed_bytes)
    replay = _Replay(log, True, device_type)
    need_after, peak_after = replay.run(failed_bytes)
    partial = log.failed is not None
    return Prediction(need_before, need_after, peak_before, peak_after, partial, replay.casts)


def basis_words(p: Prediction) -> str:
    """How ``p`` was made, for the outcome."""
    head = "replayed from the cell's recorded ops"
    if p.recorded_at is not None:
        head += f" at batch {p.recorded_at}, scaled to {p.batch}"
    return head + (", up to where it ran out" if p.partial else "")


def need_words(p: Prediction) -> str:
    """The replay's need before and after, in one sentence, and "not enough" where the need
    under autocast is more than the card has."""
    before, after = format_bytes(p.need_before), format_bytes(p.need_after)
    text = f"The replay put the need at ~{after} under autocast against ~{before} as it was"
    if p.saving_bytes < 0:
        text += (
            f": not enough, the half-precision copies ({format_bytes(p.casts)} of casts) add "
            "more than the activations save"
        )
    elif not_enough(p):
        text += f": not enough, the card has {format_bytes(p.capacity)}"
    if p.partial:
        text += "; the rest of the pass, after where it ran out, may need more"
    return text + "."


def not_enough(p: Prediction) -> bool:
    """The replay says the need under the fix is more than the card has."""
    return p.capacity is not None and p.need_after > p.capacity


_REMEMBERED: OrderedDict[str, Prediction] = OrderedDict()
_KEEP = 32


def _key(source: str, scope: object) -> str:
    """One kernel's cell: ``scope`` is the loaded extension's own memory of its cells (a new
    load, another shell: another scope)."""
    return f"{id(scope)}:" + hashlib.sha1(source.strip().encode()).hexdigest()


def remember(source: str, scope: object, p: Prediction) -> None:
    """The prediction for the cell ``source``, for its buttons when it fails again."""
    key = _key(source, scope)
    _REMEMBERED[key] = p
    _REMEMBERED.move_to_end(key)
    while len(_REMEMBERED) > _KEEP:
        _REMEMBERED.popitem(last=False)


def remembered(source: str, scope: object) -> Prediction | None:
    """The prediction a recording of this cell gave, if one was made in this scope."""
    return _REMEMBERED.get(_key(source, scope))

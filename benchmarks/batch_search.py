"""Reduce batch against accelerate's ``find_executable_batch_size`` and toma, on simulated cards.

Ten notebook workloads (issue 8's seven, an LSTM, issue 20's one Adam step and padded sequences),
each from the same start on a fresh simulated GPU: a setup cell, then a training (or inference)
cell that runs out of memory at its batch. For each tool: the re-runs after the failing one, the
batch it settles on, that batch as a share of the largest batch that fits, whether the next steps
fit at it (the cell run again from the state the tool left, optimizer state and all; twice for a
cell without a loop) and whether the epoch finishes at it (where the workload has data: its whole
loader, longest batch included).

- jupyter_gpumem: the cell fails in a real ``InteractiveShell``; then ``%gpumem retry batch``'s
  code path (``rescue.apply_fix``), which finds the batch where the cell keeps it;
- accelerate: the cell's body as the decorated function (the batch set at its top), x0.9 per OOM;
- toma 1.1: the same function under ``toma.simple.batch`` (halves per OOM).

The cards (``--cards``): a plain 128 MiB card (no CUDA context), and the T4 and A100-40GB profiles
(``backends/simulated/profiles.py``) at 1/48 and 1/64 of their memory with their CUDA context in
full (the memory outside PyTorch that ``mem_get_info`` sees): the simulated card holds its tensors'
data in this machine's RAM and computes on its CPU, so a whole 14.56 GiB T4 filled by workloads
sized for it does not fit a shared 2-core machine. ``--expandable``: the plain card again with
``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (jupyter_gpumem and the largest batch only).

The largest batch that fits is found by bisection, each probe from a fresh card and a fresh setup,
and must fit the cell and the next steps; a tool's batch above it that passes the same check
raises it (the need is not monotonic in the batch, so the bisection's edge may be a lower one). The replay error: the need that jupyter_gpumem's replay
(its own allocator model, ``fixes/batch/blocks.py``) predicts at the batch settled on, against the
smallest card (to 1 MiB, less any context) the run fits on with the card's allocator settings.
Needs the ``bench`` extra (``pip install -e .[bench]``). ``--write`` replaces this benchmark's
section of ``docs/benchmarks.md``.

    python benchmarks/batch_search.py [--write] [--only NAME] [--cards plain,T4,A100-40GB]
        [--expandable] [--tools jupyter_gpumem,accelerate]

``--gpu`` (a CUDA machine): bert-large (24 layers, hidden 1024, seq 512, AdamW, built from a config:
no download) from batch 64 and resnet50 (224 px, SGD with momentum) from batch 512, on the real card
capped to 11.17 GiB with ``set_per_process_memory_fraction``; the same three tools, its own section.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 1 << 20
GiB = 1 << 30
# The plain card, large enough that the allocator's rounding (2 MiB blocks, 20 MiB segments for
# mid-sized tensors) is a few % of it, as on a real card, not the whole story.
CARD = 128 * MiB
# A profile's memory is divided by this (its CUDA context is not): a T4 of 310 MiB (160 MiB for
# PyTorch), an A100-40GB of 630 MiB (210 MiB), so the workloads below still run out at their start,
# one Adam step of the 512-2048-2048-10 MLP (84 MiB of weights, gradients and state) still runs at
# a small batch, and a run of them fits this machine's RAM and time.
PROFILE_SCALE = {"T4": 48, "A100-40GB": 64}
EXPANDABLE = "expandable_segments:True"
# --gpu: the seed scenario's card (findings §2)
GPU_CARD = int(11.17 * GiB)
_GPU = False  # set by --gpu: real CUDA, no simulation


@dataclass(frozen=True)
class Card:
    """A simulated card: its memory, its CUDA context, the profile it answers as, the allocator's
    settings (``PYTORCH_CUDA_ALLOC_CONF``, set in the environment while it runs)."""

    key: str
    total_bytes: int
    context_bytes: int = 0
    profile: str | None = None
    alloc_conf: str = ""

    @property
    def capacity_bytes(self) -> int:
        """What PyTorch may reserve: the card less its CUDA context."""
        return self.total_bytes - self.context_bytes

    @property
    def label(self) -> str:
        size = f"{self.total_bytes // MiB} MiB"
        if self.profile is None:
            text = f"plain {size}"
        else:
            text = (
                f"{self.profile} / {PROFILE_SCALE[self.profile]}: {size}, context"
                f" {self.context_bytes // MiB} MiB, {self.capacity_bytes // MiB} MiB for PyTorch"
            )
        return text + (f", `{self.alloc_conf}`" if self.alloc_conf else "")

    def start(self) -> Any:
        """A fresh simulation of this card (the settings read from the environment, as torch
        reads them: run it inside :meth:`settings`)."""
        from jupyter_gpumem.backends import simulated

        simulated.stop()
        gc.collect()
        sim = simulated.start(self.total_bytes, context_bytes=self.context_bytes)
        if self.profile is not None:
            for card in sim.devices:
                card.configure(profile=simulated.PROFILES[self.profile])
        return sim

    @contextlib.contextmanager
    def settings(self) -> Iterator[None]:
        """``PYTORCH_CUDA_ALLOC_CONF`` as this card's, for the process (the extension and the
        simulation read it from there)."""
        old = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
        if self.alloc_conf:
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = self.alloc_conf
        else:
            os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
            else:
                os.environ["PYTORCH_CUDA_ALLOC_CONF"] = old


def _profile_card(key: str) -> Card:
    from jupyter_gpumem.backends import simulated

    p = simulated.PROFILES[key]
    total = p.total_bytes // PROFILE_SCALE[key] // MiB * MiB
    return Card(key, total, p.context_bytes, key)


def cards(keys: list[str], expandable: bool) -> list[Card]:
    out = [Card("plain", CARD) if k == "plain" else _profile_card(k) for k in keys]
    return out + ([Card("plain", CARD, alloc_conf=EXPANDABLE)] if expandable else [])


_IMPORTS = """\
import argparse
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
"""
_MLP = """\
model = torch.nn.Sequential(
    torch.nn.Linear(64, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 10),
).cuda()
"""
_MLP_STEP = """\
for step in range(2):
    x = torch.randn({b}, 64, device="cuda")
    y = torch.randint(0, 10, ({b},), device="cuda")
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
"""
# The padded-sequence workload (issue 20): 4096 sequences of 16 to 64 tokens, four of 256 at
# 3000-3003, in order (no shuffle), so at any batch up to the start's 1024 the longest batch is not
# among the first two; the collate function pads each batch to its longest sequence.
_PADDED_SETUP = """\
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader
torch.manual_seed(0)
lengths = torch.randint(16, 65, (4096,))
lengths[3000:3004] = 256
labels = torch.randint(0, 10, (4096,))
data = [(torch.randint(1, 1000, (int(n),)), int(c)) for n, c in zip(lengths, labels)]
def pad(batch):
    seqs, ys = zip(*batch)
    return pad_sequence(seqs, batch_first=True), torch.tensor(ys)
model = torch.nn.Sequential(
    torch.nn.Embedding(1000, 64), torch.nn.Linear(64, 256), torch.nn.ReLU(),
    torch.nn.Linear(256, 10),
).cuda()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
loader = DataLoader(data, batch_size=1024, collate_fn=pad)
"""
_PADDED_CELL = """\
for tokens, y in loader:
    tokens, y = tokens.cuda(), y.cuda()
    loss = F.cross_entropy(model(tokens).mean(1), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
"""
# The DataLoader workload's whole epoch (its cell runs two steps of it)
_LOADER_EPOCH = """\
for x, y in train_loader:
    x, y = x.cuda(), y.cuda()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
"""
CELL_IS_EPOCH = "the cell"  # Workload.epoch: the cell is the whole epoch (its next run is one)


@dataclass(frozen=True)
class Workload:
    name: str
    start: int
    setup: str
    cell: str  # the cell as the user wrote it, failing at ``start``
    # (code run before the cell, the cell) at batch b: how the other tools (and the ground truth)
    # set the batch, as a user would in the function they decorate
    at: Callable[[int], tuple[str, str]]
    # one whole epoch over the workload's data, after ``at(b)``'s first part; None: no data (the
    # steps make their tensors, every step alike), CELL_IS_EPOCH: the cell loops over all of it
    epoch: str | None = None
    card_bytes: int = 0  # --gpu: the cap

    @property
    def loops(self) -> bool:
        return any(isinstance(n, (ast.For, ast.While)) for n in ast.walk(ast.parse(self.cell)))


def _literal(cell: str, start: int) -> Callable[[int], tuple[str, str]]:
    pattern = re.compile(rf"(?<![\w.]){start}(?![\w.])")
    return lambda b: ("", pattern.sub(str(b), cell, count=1))


def _workloads() -> list[Workload]:
    mlp_cell = "batch_size = 16384\n" + _MLP_STEP.replace("{b}", "batch_size")
    adam_setup = _IMPORTS + _MLP + "opt = torch.optim.Adam(model.parameters(), lr=1e-3)\n"
    sgd_setup = _IMPORTS + _MLP + "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
    conv_setup = (
        _IMPORTS
        + """\
model = torch.nn.Sequential(
    torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
    torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10),
).cuda()
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
"""
    )
    conv_cell = """\
batch = 4096
for step in range(2):
    imgs = torch.randn(batch, 3, 32, 32, device="cuda")
    labels = torch.randint(0, 10, (batch,), device="cuda")
    loss = F.cross_entropy(model(imgs), labels)
    opt.zero_grad()
    loss.backward()
    opt.step()
"""
    enc_setup = (
        _IMPORTS
        + """\
layer = torch.nn.TransformerEncoderLayer(64, 4, dim_feedforward=256, batch_first=True)
encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).cuda().eval()
"""
    )
    enc_cell = """\
with torch.no_grad():
    for step in range(2):
        tokens = torch.randn(4096, 32, 64, device="cuda")
        features = encoder(tokens).mean(1)
"""
    args_setup = (
        sgd_setup
        + """\
parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=16384)
parser.add_argument("--lr", type=float, default=0.1)
args = parser.parse_args([])
"""
    )
    cfg_setup = sgd_setup + 'cfg = {"batch_size": 16384, "lr": 0.1, "epochs": 2}\n'
    loader_setup = (
        _IMPORTS
        + _MLP
        + """\
decoder = torch.nn.Linear(20, 64).cuda()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
ds = TensorDataset(torch.randn(32768, 64), torch.randint(0, 10, (32768,)))
train_loader = DataLoader(ds, batch_size=16384, shuffle=True)
"""
    )
    loader_cell = """\
for epoch in range(1):
    for step, (x, y) in zip(range(2), train_loader):
        x, y = x.cuda(), y.cuda()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        sample = decoder(torch.randn(64, 20, device="cuda"))
"""
    lstm_setup = (
        _IMPORTS
        + """\
lstm = torch.nn.LSTM(32, 64).cuda()
head = torch.nn.Linear(64, 10).cuda()
opt = torch.optim.Adam([*lstm.parameters(), *head.parameters()], lr=1e-3)
"""
    )
    lstm_cell = """\
bs = 8192
for step in range(2):
    seq = torch.randn(8, bs, 32, device="cuda")
    out, _ = lstm(seq)
    loss = head(out[-1]).logsumexp(1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
"""
    body = _MLP_STEP
    step_setup = (
        _IMPORTS
        + """\
model = torch.nn.Sequential(
    torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048), torch.nn.ReLU(),
    torch.nn.Linear(2048, 10),
).cuda()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
"""
    )
    step_cell = """\
batch = 8192
x = torch.randn(batch, 512, device="cuda")
y = torch.randint(0, 10, (batch,), device="cuda")
opt.zero_grad()
loss = F.cross_entropy(model(x), y)
loss.backward()
opt.step()
"""
    return [
        Workload("MLP + SGD, `batch_size = 16384` in the cell", 16384, sgd_setup,
                 mlp_cell, _literal(mlp_cell, 16384)),
        Workload("MLP + Adam (state made on the first step)", 16384, adam_setup,
                 mlp_cell, _literal(mlp_cell, 16384)),
        Workload("convnet, `batch = 4096` then `torch.randn(batch, 3, 32, 32)`", 4096,
                 conv_setup, conv_cell, _literal(conv_cell, 4096)),
        Workload("transformer encoder inference, `torch.randn(4096, 32, 64)`", 4096,
                 enc_setup, enc_cell, _literal(enc_cell, 4096)),
        Workload("`args.batch_size` (argparse, an earlier cell)", 16384, args_setup,
                 body.replace("{b}", "args.batch_size"),
                 lambda b: (f"args.batch_size = {b}\n", body.replace("{b}", "args.batch_size"))),
        Workload('`cfg["batch_size"]`', 16384, cfg_setup,
                 body.replace("{b}", 'cfg["batch_size"]'),
                 lambda b: (f'cfg["batch_size"] = {b}\n', body.replace("{b}", 'cfg["batch_size"]'))),
        Workload("DataLoader from an earlier cell; `torch.randn(64, 20)` in the cell",
                 16384, loader_setup, loader_cell,
                 lambda b: (f"train_loader = DataLoader(ds, batch_size={b}, shuffle=True)\n",
                            loader_cell), epoch=_LOADER_EPOCH),
        Workload("LSTM, `torch.randn(8, bs, 32)` (batch in dim 1)", 8192, lstm_setup,
                 lstm_cell, _literal(lstm_cell, 8192)),
        Workload("one Adam step, no loop (state made by the first run)", 8192, step_setup,
                 step_cell, _literal(step_cell, 8192)),
        Workload("padded sequences, `DataLoader(data, batch_size=1024, collate_fn=pad)`; the"
                 " longest batch (256 tokens) after the first two (16-64)", 1024, _PADDED_SETUP,
                 _PADDED_CELL,
                 lambda b: (f"loader = DataLoader(data, batch_size={b}, collate_fn=pad)\n",
                            _PADDED_CELL), epoch=CELL_IS_EPOCH),
    ]  # fmt: skip


def _gpu_workloads() -> list[Workload]:
    resnet_setup = """\
import torch
import torch.nn.functional as F
import torchvision
torch.manual_seed(0)
model = torchvision.models.resnet50().cuda()
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
"""
    resnet_cell = """\
batch = 512
for step in range(2):
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
"""
    bert_setup = """\
import torch
from transformers import BertConfig, BertForMaskedLM
torch.manual_seed(0)
config = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                    intermediate_size=4096)
model = BertForMaskedLM(config).cuda().train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
"""
    bert_cell = """\
batch_size = 64
for step in range(2):
    ids = torch.randint(0, config.vocab_size, (batch_size, 512), device="cuda")
    loss = model(input_ids=ids, labels=ids).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
"""
    return [
        Workload("bert-large, seq 512, AdamW, `batch_size = 64`", 64, bert_setup, bert_cell,
                 _literal(bert_cell, 64), card_bytes=GPU_CARD),
        Workload("resnet50, 224 px, SGD + momentum, `batch = 512`", 512, resnet_setup,
                 resnet_cell, _literal(resnet_cell, 512), card_bytes=GPU_CARD),
    ]  # fmt: skip


def _cap_gpu(card_bytes: int) -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, card_bytes / total))


# -- one fresh card -------------------------------------------------------------------------------


def _fresh(w: Workload, card: Card | None) -> dict[str, Any]:
    if card is None:
        _cap_gpu(w.card_bytes)
    else:
        card.start()
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(w.setup, ns)
    return ns


def _exec(code: str, ns: dict[str, Any]) -> bool:
    """``code`` in ``ns``; False on an OOM (its frames freed)."""
    import torch

    try:
        exec(code, ns)
        return True
    except torch.OutOfMemoryError as exc:
        traceback.clear_frames(exc.__traceback__)
        del exc
        gc.collect()
        return False


def _runs_at(ns: dict[str, Any], w: Workload, b: int) -> bool:
    """The cell at batch b in ``ns``; False on an OOM."""
    prep, cell = w.at(b)
    return _exec(prep + cell, ns)


def _next_fits(ns: dict[str, Any], w: Workload, b: int) -> bool:
    """The next steps at b from the state in ``ns``: the cell again (twice for a cell without a
    loop: one step each)."""
    return all(_runs_at(ns, w, b) for _ in range(1 if w.loops else 2))


def _epoch_fits(ns: dict[str, Any], w: Workload, b: int, next_fits: bool) -> bool | None:
    """One whole epoch at b from the state in ``ns`` (after the next steps); None: no data."""
    if w.epoch is None:
        return None
    if w.epoch == CELL_IS_EPOCH:
        return next_fits  # the next run of the cell was a whole epoch
    return _exec(w.at(b)[0] + w.epoch, ns)


def _fits(w: Workload, card: Card | None, b: int) -> bool:
    """The cell and the next steps at batch b, from a fresh card and setup."""
    ns = _fresh(w, card)
    return _runs_at(ns, w, b) and _next_fits(ns, w, b)


def largest_fit(w: Workload, card: Card | None) -> int:
    lo, hi = 0, w.start
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits(w, card, mid) else (lo, mid)
    return lo


# -- the tools --------------------------------------------------------------------------------


@dataclass
class Result:
    runs: int
    batch: int
    next_fits: bool
    epoch_fits: bool | None  # None: the workload has no data to make an epoch of
    seconds: float
    # jupyter_gpumem only, where a replay placed the batch: its predicted need at the batch
    # settled on, and the smallest capacity the run fits on (bytes)
    predicted: int | None = None
    actual: int | None = None
    note: str = ""  # how it was run, where not as the others

    @property
    def replay_error(self) -> float | None:
        if self.predicted is None or not self.actual:
            return None
        return (self.predicted - self.actual) / self.actual


def _need(w: Workload, card: Card, b: int) -> int | None:
    """The smallest capacity (to 1 MiB) on which the run the replay predicts fits at ``b``, with
    the card's allocator settings: from a fresh card (no context) and setup, the cell and its
    next steps, as the largest batch is checked (the replay predicts the steady state: its
    rehearsal's last pass played until the allocator's blocks settle). At the limit the
    allocator gives its free cached segments back before it reserves a new one, which a roomy
    card's reserved peak does not show. None: it does not fit 4x the card."""

    def fits(mib: int) -> bool:
        ns = _fresh(w, Card("need", mib * MiB, alloc_conf=card.alloc_conf))
        return _runs_at(ns, w, b) and _next_fits(ns, w, b)

    lo, hi = 0, card.capacity_bytes // MiB
    while not fits(hi):
        lo, hi = hi, hi * 2
        if hi > 4 * card.capacity_bytes // MiB:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi * MiB


def _start_in_shell(shell: Any, w: Workload, card: Card | None) -> None:
    if card is None:
        _cap_gpu(w.card_bytes)
    elif card.profile is None:  # as a user starts it
        ok = shell.run_cell(f"%gpumem simulate {card.total_bytes // MiB}MiB", store_history=False)
        assert ok.success
    else:  # a profile at another size: from Python (the magic takes the profile's own size)
        card.start()


def ours(w: Workload, card: Card | None) -> Result:
    from IPython.core.interactiveshell import InteractiveShell

    import jupyter_gpumem
    from jupyter_gpumem.backends import simulated
    from jupyter_gpumem.fixes import ladder as rescue
    from jupyter_gpumem.fixes.batch.search import BatchSearch

    replays: list[Any] = []
    built = BatchSearch.replay

    def replay(self: BatchSearch) -> Any:  # the replays the search builds, for their error
        r = built(self)
        replays.append(r)
        return r

    BatchSearch.replay = replay  # type: ignore[method-assign]
    simulated.stop()
    InteractiveShell.clear_instance()
    shell = InteractiveShell.instance(colors="nocolor")
    shell.run_cell("%load_ext jupyter_gpumem", store_history=False)
    try:
        _start_in_shell(shell, w, card)
        assert shell.run_cell(w.setup, store_history=True).success
        assert not shell.run_cell(w.cell, store_history=True).success
        failed = jupyter_gpumem.last_failure(shell)
        assert failed is not None
        t0 = time.perf_counter()
        outcome = rescue.apply_fix(shell, failed, "batch", rescue.Options(), {})
        forced = outcome.refused and not outcome.runs
        if forced:  # refused (the loop's earlier passes stepped the optimizer): as the user would
            print(f"    refused: {outcome.message}; again with --force", flush=True)
            outcome = rescue.apply_fix(shell, failed, "batch", rescue.Options(force=True), {})
        secs = time.perf_counter() - t0
        for a in outcome.attempts:
            print("    " + a.line(), flush=True)
        print(f"    {outcome.message} {outcome.change}", flush=True)
        for note in outcome.notes:
            print(f"    note: {note}", flush=True)
        batch = outcome.batch or 0
        ns = shell.user_ns
        nxt = bool(batch) and _next_fits(ns, w, batch)
        epoch = _epoch_fits(ns, w, batch, nxt) if batch else (None if w.epoch is None else False)
        # the replay that proposed the batch: built before the run at it (one built from that
        # run is calibrated on it, and its error there is nil by construction)
        last = next((r for r in reversed(replays) if r and batch not in r.batches), None)
        predicted = actual = None
        if last is not None and batch and card is not None:
            predicted = last.need(batch)
            actual = _need(w, card, batch)  # fresh cards of its own
        note = "after `--force`" if forced else ""
        return Result(outcome.runs, batch, nxt, epoch, secs, predicted, actual, note)
    finally:
        BatchSearch.replay = built  # type: ignore[method-assign]
        shell.run_cell("%unload_ext jupyter_gpumem", store_history=False)
        simulated.stop()
        InteractiveShell.clear_instance()


def _competitor(
    w: Workload, card: Card | None, search: Callable[[Callable[[int], int]], int]
) -> Result:
    ns = _fresh(w, card)
    calls: list[int] = []

    def train(batch_size: int) -> int:
        calls.append(batch_size)
        prep, cell = w.at(batch_size)
        exec(prep + cell, dict(ns))  # the function's locals die with it; the model is shared
        return batch_size

    t0 = time.perf_counter()
    batch = search(train)
    secs = time.perf_counter() - t0
    nxt = _next_fits(ns, w, batch)
    return Result(len(calls) - 1, batch, nxt, _epoch_fits(ns, w, batch, nxt), secs)


def accelerate(w: Workload, card: Card | None) -> Result:
    from accelerate.utils import find_executable_batch_size

    return _competitor(
        w, card, lambda f: find_executable_batch_size(f, starting_batch_size=w.start)()
    )


def toma_(w: Workload, card: Card | None) -> Result:
    import toma

    return _competitor(w, card, lambda f: toma.simple.batch(f, w.start))


TOOLS = (("jupyter_gpumem", ours), ("accelerate", accelerate), ("toma", toma_))


# -- the report ---------------------------------------------------------------------------------


@dataclass
class Row:
    workload: Workload
    card: Card | None
    best: int
    results: dict[str, Result]


def _yes(ok: bool | None) -> str:
    return "–" if ok is None else "yes" if ok else "**no**"


def _cell(r: Result, best: int) -> str:
    pct = 100 * r.batch / best if best else 0
    return (
        f"{r.runs} runs, {r.batch} ({pct:.0f}%), next: {_yes(r.next_fits)},"
        f" epoch: {_yes(r.epoch_fits)}, {r.seconds:.0f} s" + (f", {r.note}" if r.note else "")
    )


def measure(
    w: Workload, card: Card | None, tools: list[str], earlier: Earlier | None = None
) -> Row:
    """The row of ``w`` on ``card``: the largest batch that fits and each tool in ``tools``;
    those measured by an ``earlier`` run of this script are taken from it."""
    where = "" if card is None else f" [{card.label}]"
    with card.settings() if card is not None else contextlib.nullcontext():
        t0 = time.perf_counter()
        best = earlier.best if earlier is not None else largest_fit(w, card)
        print(f"{w.name}{where}: largest that fits {best}"
              f" ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
        results = {}
        for tool, fn in TOOLS:
            if tool in tools:
                r = results[tool] = fn(w, card)
                err = "" if r.replay_error is None else f", replay error {r.replay_error:+.1%}"
                if r.predicted is not None and r.actual:
                    err += f" ({r.predicted / MiB:.1f} MiB for {r.actual / MiB:.0f} MiB)"
                print(f"  {tool}: {_cell(r, best)}{err}", flush=True)
            elif earlier is not None and tool in earlier.results:
                results[tool] = earlier.results[tool]
        # the need is not monotonic in the batch (a tensor past 10 MiB leaves the shared 20 MiB
        # segments), so the bisection's edge can be under a batch a tool found: checked the same way
        for b in sorted({r.batch for r in results.values() if r.batch > best}):
            if _fits(w, card, b):
                print(f"  largest that fits: {b}, above the bisection's {best}", flush=True)
                best = b
        return Row(w, card, best, results)


@dataclass
class Earlier:
    """A row as an earlier run of this script printed it (``--reuse LOG``)."""

    best: int
    results: dict[str, Result]


_ROW = re.compile(r"^(?P<name>.*) \[(?P<card>.*)\]: largest that fits (?P<best>\d+) \(")
_TOOL = re.compile(
    r"^  (?P<tool>\S+): (?P<runs>\d+) runs, (?P<batch>\d+) \(\d+%\), next: (?P<next>\S+),"
    r" epoch: (?P<epoch>\S+), (?P<secs>\d+) s"
)


def read_log(path: Path) -> tuple[dict[tuple[str, str], Earlier], str]:
    """The rows an earlier run printed, by (workload, card label), and the code it measured."""
    rows: dict[tuple[str, str], Earlier] = {}
    row: Earlier | None = None
    code = "unknown"
    flag = {"yes": True, "**no**": False, "–": None}
    for line in path.read_text().splitlines():
        if m := _ROW.match(line):
            row = rows[(m["name"], m["card"])] = Earlier(int(m["best"]), {})
        elif (m := _TOOL.match(line)) and row is not None:
            nxt = flag[m["next"]]
            row.results[m["tool"]] = Result(
                int(m["runs"]), int(m["batch"]), bool(nxt), flag[m["epoch"]], float(m["secs"])
            )
        elif found := re.search(r", the code at (.+?); ", line):
            code = found[1]
    return rows, code


def _meets_goal(results: dict[str, Result], best: int) -> bool:
    """Issue 8's goal for jupyter_gpumem on one row, with issue 20's epoch."""
    ours = results.get("jupyter_gpumem")
    if ours is None or not best:
        return False
    theirs = results.get("accelerate")
    return (
        ours.batch >= 0.95 * best
        and ours.runs <= 4
        and ours.next_fits
        and ours.epoch_fits is not False
        and (theirs is None or ours.batch >= theirs.batch or not theirs.next_fits)
    )


def _table(rows: list[Row], tools: list[str]) -> list[str]:
    lines = [
        "| workload | largest that fits | " + " | ".join(tools) + " |",
        "|---|---|" + "---|" * len(tools),
    ]
    for row in rows:
        cells = [_cell(row.results[t], row.best) if t in row.results else "not run" for t in tools]
        lines.append(f"| {row.workload.name} | {row.best} | " + " | ".join(cells) + " |")
    met = [_meets_goal(r.results, r.best) for r in rows]
    missed = "; ".join(r.workload.name for r, ok in zip(rows, met, strict=True) if not ok)
    held = []
    for t in tools:
        nxt = sum(bool(r.results[t].next_fits) for r in rows if t in r.results)
        data = [r.results[t].epoch_fits for r in rows if t in r.results]
        epochs = [e for e in data if e is not None]
        held.append(
            f"{t} {nxt} of {len(data)}"
            + (f" (epoch {sum(epochs)} of {len(epochs)})" if epochs else "")
        )
    lines += [
        "",
        "The next steps fit at the batch settled on: " + ", ".join(held) + ".",
        "",
        f"Against the goal (>= 95% of the largest batch in <= 4 re-runs, the next steps and the"
        f" epoch fit, never fewer % than accelerate): met on {sum(met)} of {len(met)} rows by"
        " jupyter_gpumem" + (f"; not on: {missed}." if missed else "."),
    ]
    return lines


def _replay_table(rows: list[Row]) -> list[str]:
    lines = [
        "| workload | card | batch settled on (of the largest) | predicted need | actual need"
        " | replay error |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = row.results.get("jupyter_gpumem")
        if r is None or row.card is None:
            continue
        share = f"{r.batch} ({100 * r.batch / row.best:.0f}% of {row.best})" if row.best else "–"
        pred = "–" if r.predicted is None else f"{r.predicted / MiB:.1f} MiB"
        act = "–" if r.actual is None else f"{r.actual / MiB:.0f} MiB"
        err = "no replay placed it" if r.replay_error is None else f"{r.replay_error:+.1%}"
        lines.append(
            f"| {row.workload.name} | {row.card.label} | {share} | {pred} | {act} | {err} |"
        )
    return lines


def _commit() -> str:
    """The code measured: ``git describe`` of this checkout, or ``$GPUMEM_COMMIT`` for a copy
    (``git archive HEAD``) run outside the repository."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return os.environ.get("GPUMEM_COMMIT", "unknown") + " (a clean copy of it)"
    dirty = git("status", "--porcelain", "--", "jupyter_gpumem", "benchmarks/batch_search.py")
    return head + (" (with uncommitted changes)" if dirty else "")


def report(rows: list[Row], tools: list[str], seconds: float, earlier_code: str = "") -> str:
    import accelerate as acc
    import torch

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if _GPU:
        where = f"{torch.cuda.get_device_name(0)} capped to {GPU_CARD / GiB:.2f} GiB"
    else:
        where = (
            f"simulated GPU, {os.cpu_count()}-core {platform.machine()} shared with other sessions"
        )
    text = [
        _heading(_GPU),
        "",
        f"{now}, the code at {_commit()}; {where}; torch {torch.__version__}, accelerate"
        f" {acc.__version__}, toma 1.1, Python {platform.python_version()};"
        f" `python {' '.join(['benchmarks/batch_search.py', *sys.argv[1:]])}`, {seconds / 60:.0f}"
        " min in all (the times are rough: the cores were shared).",
        "",
        "Each cell: re-runs after the failing one, the batch settled on (its share of the largest"
        " that fits, found by bisection from a fresh card and setup each time, the cell and its"
        " next steps, and raised to a tool's batch above it that passes the same check: the need is"
        " not monotonic in the batch), whether the next steps fit at that batch from the state the tool left (the"
        " cell again; twice for a cell without a loop), whether one whole epoch then fits (only"
        " where the workload has data: the DataLoader row's loader, and the padded row, whose cell"
        " is the epoch; – where every step makes tensors alike), and the tool's wall time.",
    ]
    if earlier_code:
        reused = [t for t, _ in TOOLS if t not in tools]
        text += [
            "",
            f"Measured in this run: {', '.join(tools)}. The largest batches that fit"
            + (f" and {', '.join(reused)}" if reused else "")
            + f": from an earlier run of this script, on the code at {earlier_code} (`--reuse`;"
            " they run the workloads' own cells on the simulated card, not jupyter_gpumem's"
            " fixes).",
        ]
    by_card: dict[str, list[Row]] = {}
    for row in rows:
        key = "GPU" if row.card is None else row.card.label
        by_card.setdefault(key, []).append(row)
    for label, group in by_card.items():
        present = [t for t, _ in TOOLS if t in group[0].results]
        only = "" if len(present) == len(TOOLS) else f" ({', '.join(present)} only)"
        text += ["", f"**{label}**{only}", "", *_table(group, present)]
    if not _GPU and any("jupyter_gpumem" in row.results for row in rows):
        text += [
            "",
            "**The replay's error against the ported caching allocator.** Predicted: the need at"
            " the batch settled on, from the replay that proposed it (built before the run at"
            " it), through the replay's own allocator model (`fixes/batch/blocks.py`: the default"
            " settings and expandable segments). Actual: the smallest capacity (to 1 MiB) the run fits on, from a"
            " fresh card with the same `PYTORCH_CUDA_ALLOC_CONF` (the card's ported allocator"
            " gives its free cached segments back before it reserves a new one there). The run"
            " is the cell and its next steps, as the largest batch is checked (the cell twice;"
            " three times for a cell without a loop), which the replay predicts by playing the"
            " rehearsal's last pass again until the allocator's blocks settle (its steady state);"
            " for the padded row that is the whole epoch, while the replay saw the rehearsal's"
            " first two batches.",
            "",
            *_replay_table(rows),
        ]
    return "\n".join(text) + "\n"


def main() -> None:
    global _GPU
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md", help="%(default)s")
    ap.add_argument("--only", help="run the workloads whose name contains this")
    ap.add_argument(
        "--tools", default=",".join(t for t, _ in TOOLS), help="comma-separated, of: %(default)s"
    )
    ap.add_argument("--cards", default="plain,T4,A100-40GB", help="comma-separated: %(default)s")
    ap.add_argument(
        "--expandable", action="store_true", help=f"the plain card again with {EXPANDABLE}"
    )
    ap.add_argument(
        "--reuse",
        type=Path,
        help="the log of an earlier run: its largest batches and the tools not in --tools",
    )
    ap.add_argument("--gpu", action="store_true", help="bert-large and resnet50 on a real GPU")
    args = ap.parse_args()
    import torch

    _GPU = args.gpu
    if _GPU and not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA GPU: nothing measured")
    if not _GPU:
        torch.set_num_threads(1)
    tools = [t for t, _ in TOOLS if t in args.tools.split(",")]
    t0 = time.perf_counter()
    rows = []
    chosen = [w for w in (_gpu_workloads() if _GPU else _workloads())
              if not args.only or args.only in w.name]  # fmt: skip
    earlier, earlier_code = read_log(args.reuse) if args.reuse else ({}, "")
    for card in [None] if _GPU else cards(args.cards.split(","), args.expandable):
        for w in chosen:
            # the extra card: the search and its replay only (the other tools do not read the
            # allocator's settings)
            extra = card is not None and bool(card.alloc_conf)
            before = earlier.get((w.name, "" if card is None else card.label))
            rows.append(measure(w, card, ["jupyter_gpumem"] if extra else tools, before))
    text = report(rows, tools, time.perf_counter() - t0, earlier_code)
    print(text)
    if args.write:
        write_section(text, _heading(_GPU), args.doc)


def _heading(gpu: bool) -> str:
    if gpu:
        return "### Reduce batch vs accelerate and toma, end to end (GPU)"
    return "### Reduce batch vs accelerate and toma, end to end (simulated GPU)"


def write_section(text: str, head: str, doc: Path = ROOT / "docs" / "benchmarks.md") -> None:
    """Replace this benchmark's section of docs/benchmarks.md (or add it)."""
    old = doc.read_text()
    if head in old:  # replace this section only
        before, _, after = old.partition(head)
        rest = after.split("\n### ", 1)
        old = before + text + (("\n### " + rest[1]) if len(rest) > 1 else "")
    else:  # after the search's own section
        anchor = "### Gauge overhead"
        before, _, after = old.partition(anchor)
        old = before + text + "\n" + anchor + after if after else old + "\n" + text
    doc.write_text(old)


if __name__ == "__main__":
    main()

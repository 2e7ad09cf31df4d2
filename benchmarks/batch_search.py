"""Reduce batch against accelerate's ``find_executable_batch_size`` and toma, on one simulated card.

Eight notebook workloads (issue 8's seven and an LSTM), each from the same start on a fresh
simulated GPU: a setup cell, then a training (or inference) cell of two steps that runs out of
memory at its batch. For each tool: the re-runs after the failing one, the batch it settles on,
that batch as a share of the largest batch that fits, and whether the next two steps fit at it
(the cell run again, from the state the tool left: optimizer state and all).

- jupyter_gpumem: the cell fails in a real ``InteractiveShell``; then ``%gpumem retry batch``'s
  code path (``rescue.apply_fix``), which finds the batch where the cell keeps it;
- accelerate 1.15: the cell's body as the decorated function (the batch set at its top), x0.9 per OOM;
- toma 1.1: the same function under ``toma.simple.batch`` (halves per OOM).

The largest batch that fits is found by bisection, each probe from a fresh card and a fresh setup,
and must fit the cell and the next two steps. Needs the ``bench`` extra (``pip install -e
.[bench]``). ``--write`` replaces the batch-search section of ``docs/benchmarks.md``.

    python benchmarks/batch_search.py [--write] [--only NAME] [--tools jupyter_gpumem,accelerate]

``--gpu`` (a CUDA machine): bert-large (24 layers, hidden 1024, seq 512, AdamW, built from a config:
no download) from batch 64 and resnet50 (224 px, SGD with momentum) from batch 512, on the real card
capped to 11.17 GiB with ``set_per_process_memory_fraction``; the same three tools, its own section.
"""

from __future__ import annotations

import argparse
import gc
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 1 << 20
# One card for every workload, large enough that the allocator's rounding (2 MiB blocks, 20 MiB
# segments for mid-sized tensors) is a few % of it, as on a real card, not the whole story.
CARD = 128 * MiB
GiB = 1 << 30
# --gpu: the seed scenario's card (findings §2)
GPU_CARD = int(11.17 * GiB)
_GPU = False  # set by --gpu: real CUDA, no simulation

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


@dataclass(frozen=True)
class Workload:
    name: str
    card_bytes: int
    start: int
    setup: str
    cell: str  # the cell as the user wrote it, failing at ``start``
    # (code run before the cell, the cell) at batch b: how the other tools (and the ground truth)
    # set the batch, as a user would in the function they decorate
    at: Callable[[int], tuple[str, str]]


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
        Workload("MLP + SGD, `batch_size = 16384` in the cell", CARD, 16384, sgd_setup,
                 mlp_cell, _literal(mlp_cell, 16384)),
        Workload("MLP + Adam (state made on the first step)", CARD, 16384, adam_setup,
                 mlp_cell, _literal(mlp_cell, 16384)),
        Workload("convnet, `batch = 4096` then `torch.randn(batch, 3, 32, 32)`", CARD, 4096,
                 conv_setup, conv_cell, _literal(conv_cell, 4096)),
        Workload("transformer encoder inference, `torch.randn(4096, 32, 64)`", CARD, 4096,
                 enc_setup, enc_cell, _literal(enc_cell, 4096)),
        Workload("`args.batch_size` (argparse, an earlier cell)", CARD, 16384, args_setup,
                 body.replace("{b}", "args.batch_size"),
                 lambda b: (f"args.batch_size = {b}\n", body.replace("{b}", "args.batch_size"))),
        Workload('`cfg["batch_size"]`', CARD, 16384, cfg_setup,
                 body.replace("{b}", 'cfg["batch_size"]'),
                 lambda b: (f'cfg["batch_size"] = {b}\n', body.replace("{b}", 'cfg["batch_size"]'))),
        Workload("DataLoader from an earlier cell; `torch.randn(64, 20)` in the cell", CARD,
                 16384, loader_setup, loader_cell,
                 lambda b: (f"train_loader = DataLoader(ds, batch_size={b}, shuffle=True)\n",
                            loader_cell)),
        Workload("LSTM, `torch.randn(8, bs, 32)` (batch in dim 1)", CARD, 8192, lstm_setup,
                 lstm_cell, _literal(lstm_cell, 8192)),
        Workload("one Adam step, no loop (state made by the first run)", CARD, 8192, step_setup,
                 step_cell, _literal(step_cell, 8192)),
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
        Workload("bert-large, seq 512, AdamW, `batch_size = 64`", GPU_CARD, 64, bert_setup,
                 bert_cell, _literal(bert_cell, 64)),
        Workload("resnet50, 224 px, SGD + momentum, `batch = 512`", GPU_CARD, 512, resnet_setup,
                 resnet_cell, _literal(resnet_cell, 512)),
    ]  # fmt: skip


def _cap_gpu(card_bytes: int) -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, card_bytes / total))


# -- one fresh card -------------------------------------------------------------------------------


def _fresh(w: Workload) -> dict[str, Any]:
    from jupyter_gpumem.backends import simulated

    if _GPU:
        _cap_gpu(w.card_bytes)
    else:
        simulated.stop()
        gc.collect()
        simulated.start(w.card_bytes)
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(w.setup, ns)
    return ns


def _runs_at(ns: dict[str, Any], w: Workload, b: int) -> bool:
    """The cell at batch b in ``ns``; False on an OOM (its frames freed)."""
    import torch

    prep, cell = w.at(b)
    try:
        exec(prep + cell, ns)
        return True
    except torch.OutOfMemoryError as exc:
        import traceback

        traceback.clear_frames(exc.__traceback__)
        del exc
        gc.collect()
        return False


def _fits(w: Workload, b: int) -> bool:
    """The cell and the next two steps at batch b, from a fresh card and setup."""
    ns = _fresh(w)
    return _runs_at(ns, w, b) and _runs_at(ns, w, b)


def largest_fit(w: Workload) -> int:
    lo, hi = 0, w.start
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits(w, mid) else (lo, mid)
    return lo


# -- the tools --------------------------------------------------------------------------------


@dataclass
class Result:
    runs: int
    batch: int
    next_fits: bool
    seconds: float
    # the replay's predicted reserved peak at the batch settled on, less the card's, as a share
    # of the card's (jupyter_gpumem only; None where no replay placed it)
    replay_error: float | None = None


def _reserved_peak(w: Workload, b: int) -> int:
    """The reserved peak of the run the replay predicts at ``b``: from a fresh card and setup,
    the cell (twice for a cell without a loop: its rehearsal runs it twice)."""
    import ast

    import torch

    ns = _fresh(w)
    runs = 1 if any(isinstance(n, (ast.For, ast.While)) for n in ast.walk(ast.parse(w.cell))) else 2
    torch.cuda.reset_peak_memory_stats()
    for _ in range(runs):
        if not _runs_at(ns, w, b):
            break
    return int(torch.cuda.memory_stats().get("reserved_bytes.all.peak", 0))


def ours(w: Workload) -> Result:
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
        if _GPU:
            _cap_gpu(w.card_bytes)
        else:
            shell.run_cell(f"%gpumem simulate {w.card_bytes // MiB}MiB", store_history=False)
        assert shell.run_cell(w.setup, store_history=True).success
        assert not shell.run_cell(w.cell, store_history=True).success
        failed = jupyter_gpumem.last_failure(shell)
        t0 = time.perf_counter()
        outcome = rescue.apply_fix(shell, failed, "batch", rescue.Options(), {})
        secs = time.perf_counter() - t0
        for a in outcome.attempts:
            print("    " + a.line(), flush=True)
        print(f"    {outcome.message} {outcome.change}", flush=True)
        batch = outcome.batch or 0
        ns = shell.user_ns
        next_fits = bool(batch) and _runs_at(ns, w, batch)
        # the replay that proposed the batch: built before the run at it (one built from that
        # run is calibrated on it, and its error there is nil by construction)
        last = next((r for r in reversed(replays) if r and batch not in r.batches), None)
        error = None
        if last is not None and batch:
            predicted = last.need(batch)
            actual = _reserved_peak(w, batch)  # a fresh card of its own
            error = (predicted - actual) / actual if actual else None
        return Result(outcome.runs, batch, next_fits, secs, error)
    finally:
        BatchSearch.replay = built  # type: ignore[method-assign]
        shell.run_cell("%unload_ext jupyter_gpumem", store_history=False)
        simulated.stop()
        InteractiveShell.clear_instance()


def _competitor(w: Workload, search: Callable[[Callable[[int], int]], int]) -> Result:
    ns = _fresh(w)
    calls: list[int] = []

    def train(batch_size: int) -> int:
        calls.append(batch_size)
        prep, cell = w.at(batch_size)
        exec(prep + cell, dict(ns))  # the function's locals die with it; the model is shared
        return batch_size

    t0 = time.perf_counter()
    batch = search(train)
    secs = time.perf_counter() - t0
    return Result(len(calls) - 1, batch, _runs_at(ns, w, batch), secs)


def accelerate(w: Workload) -> Result:
    from accelerate.utils import find_executable_batch_size

    return _competitor(w, lambda f: find_executable_batch_size(f, starting_batch_size=w.start)())


def toma_(w: Workload) -> Result:
    import toma

    return _competitor(w, lambda f: toma.simple.batch(f, w.start))


TOOLS = (("jupyter_gpumem", ours), ("accelerate", accelerate), ("toma", toma_))


def main() -> None:
    global _GPU
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    ap.add_argument("--only", help="run the workloads whose name contains this")
    ap.add_argument(
        "--tools", default=",".join(t for t, _ in TOOLS), help="comma-separated, of: %(default)s"
    )
    ap.add_argument("--gpu", action="store_true", help="bert-large and resnet50 on a real GPU")
    args = ap.parse_args()
    import torch

    _GPU = args.gpu
    if _GPU and not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA GPU: nothing measured")
    if not _GPU:
        torch.set_num_threads(1)
    rows, verdicts = [], []
    for w in _gpu_workloads() if _GPU else _workloads():
        if args.only and args.only not in w.name:
            continue
        best = largest_fit(w)
        print(f"{w.name}: largest that fits {best}", flush=True)
        cells, results = [], {}
        for tool, fn in TOOLS:
            if tool not in args.tools.split(","):
                continue
            r = results[tool] = fn(w)
            pct = 100 * r.batch / best if best else 0
            nxt = "yes" if r.next_fits else "**no**"
            err = "" if r.replay_error is None else f", replay error {100 * r.replay_error:+.1f}%"
            cells.append(
                f"{r.runs} runs, {r.batch} ({pct:.0f}%), next: {nxt}, {r.seconds:.0f} s{err}"
            )
            print(f"  {tool}: {cells[-1]}", flush=True)
        verdicts.append(_meets_goal(results, best))
        card = f"{w.card_bytes / GiB:.2f} GiB" if _GPU else f"{w.card_bytes // MiB} MiB"
        rows.append(f"| {w.name} | {card} | {best} | " + " | ".join(cells) + " |")
    import accelerate as acc

    where = (
        f"{torch.cuda.get_device_name(0)} capped to {GPU_CARD / GiB:.2f} GiB"
        if _GPU
        else "simulated GPU"
    )
    text = "\n".join(
        [
            _heading(_GPU),
            "",
            f"{date.today()}, {where}, torch {torch.__version__}, accelerate {acc.__version__},"
            f" toma 1.1, Python {platform.python_version()}, {platform.machine()}; "
            f"`python benchmarks/batch_search.py{' --gpu' if _GPU else ''}`.",
            "Each cell: re-runs after the failing one, the batch settled on (its share of the",
            "largest that fits, found by bisection from a fresh card each time), whether the",
            "next two steps fit at that batch from the state the tool left, and the wall time;"
            " for jupyter_gpumem, the replay error: the reserved peak its replay (its own"
            " allocator model, fixes/batch/blocks.py) predicts at the batch settled on, against"
            " the card's, from a fresh card."
            + ("" if _GPU else f" One card of {CARD // MiB} MiB for every workload."),
            "",
            "| workload | card | largest that fits | "
            + " | ".join(t for t, _ in TOOLS if t in args.tools.split(","))
            + " |",
            "|---|---|---|" + "---|" * len(args.tools.split(",")),
            *rows,
            "",
            f"**Against the goal** (>= 95% of the largest batch in <= 4 re-runs, the next steps"
            f" fit, never fewer % than accelerate): met on {sum(verdicts)} of {len(verdicts)}"
            " rows by jupyter_gpumem"
            + (
                "."
                if all(verdicts)
                else "; not on: "
                + "; ".join(
                    r.split(" | ")[0][2:] for r, ok in zip(rows, verdicts, strict=True) if not ok
                )
                + "."
            ),
            "",
        ]
    )
    print(text)
    if args.write:
        write_section(text, _heading(_GPU))


def _meets_goal(results: dict[str, Result], best: int) -> bool:
    """Issue 8's goal for jupyter_gpumem on one row."""
    ours = results.get("jupyter_gpumem")
    if ours is None or not best:
        return False
    theirs = results.get("accelerate")
    return (
        ours.batch >= 0.95 * best
        and ours.runs <= 4
        and ours.next_fits
        and (theirs is None or ours.batch >= theirs.batch or not theirs.next_fits)
    )


def _heading(gpu: bool) -> str:
    if gpu:
        return "### Reduce batch vs accelerate and toma, end to end (GPU)"
    return "### Reduce batch vs accelerate and toma, end to end (simulated GPU)"


def write_section(text: str, head: str) -> None:
    """Replace this benchmark's section of docs/benchmarks.md (or add it)."""
    doc = ROOT / "docs" / "benchmarks.md"
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

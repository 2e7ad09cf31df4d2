"""The workloads and cards of ``benchmarks/batch_search.py`` are what its table says they are.

Each workload runs out of memory at its start on every card the benchmark runs it on (else its row
measures nothing); the other tools' way of setting the batch gives the user's own cell at the start;
the padded-sequence workload's longest batch is not among the first two at any batch up to its
start; the profile cards answer as the profile (name, CUDA context outside PyTorch). Cheap: no
search, no bisection.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from jupyter_gpumem.backends import simulated  # noqa: E402

MiB = 1 << 20
_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "batch_search.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("_bench_batch_search", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture
def stopped() -> Any:
    yield
    simulated.stop()


def test_profile_cards_answer_as_the_profile(bench: ModuleType, stopped: Any) -> None:
    for key in ("T4", "A100-40GB"):
        card = bench.cards([key], expandable=False)[0]
        profile = simulated.PROFILES[key]
        assert card.context_bytes == profile.context_bytes  # the context in full
        assert card.total_bytes <= profile.total_bytes // bench.PROFILE_SCALE[key]
        with card.settings():
            card.start()
            free, total = torch.cuda.mem_get_info()
        assert torch.cuda.get_device_name(0) == profile.name
        assert total == card.total_bytes
        assert free == card.capacity_bytes  # the context is outside what PyTorch may reserve
        assert key in card.label and f"{card.capacity_bytes // MiB} MiB for PyTorch" in card.label


def test_the_expandable_card_sets_the_allocators_settings_while_it_runs(
    bench: ModuleType, stopped: Any, monkeypatch: Any
) -> None:
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    card = bench.cards([], expandable=True)[0]
    with card.settings():
        sim = card.start()
        assert sim.card().alloc_conf.expandable_segments
    assert "PYTORCH_CUDA_ALLOC_CONF" not in __import__("os").environ


@pytest.mark.slow  # about 50 s on 2 shared cores
def test_every_workload_runs_out_at_its_start_on_every_card(
    bench: ModuleType, stopped: Any
) -> None:
    for card in bench.cards(["plain", "T4", "A100-40GB"], expandable=False):
        for w in bench._workloads():
            prep, cell = w.at(w.start)
            if not prep:  # the batch is a literal of the cell: the other tools run the cell itself
                assert cell == w.cell, w.name
            ns = bench._fresh(w, card)
            assert not bench._runs_at(ns, w, w.start), (w.name, card.label)
            if w.epoch != bench.CELL_IS_EPOCH:  # (at batch 1 that cell is 4096 steps)
                assert bench._runs_at(bench._fresh(w, card), w, 1), (w.name, card.label)


def test_the_padded_workloads_longest_batch_is_not_among_the_first_two(
    bench: ModuleType, stopped: Any
) -> None:
    (w,) = [w for w in bench._workloads() if w.name.startswith("padded")]
    assert w.epoch == bench.CELL_IS_EPOCH and w.loops
    ns = bench._fresh(w, bench.cards(["plain"], expandable=False)[0])
    longest = max(len(seq) for seq, _ in ns["data"])
    for b in (7, 64, 136, 509, w.start):
        exec(w.at(b)[0], ns)
        widths = [tokens.shape[1] for tokens, _ in ns["loader"]]
        assert max(widths[:2]) < longest == max(widths), b

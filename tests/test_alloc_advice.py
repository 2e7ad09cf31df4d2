"""Allocator advice that knows the settings: PYTORCH_CUDA_ALLOC_CONF read as torch reads it, advice
only where it changes something, fragmentation measured from the allocator's blocks before it is
named a cause."""

from __future__ import annotations

from typing import Any

import pytest

from jupyter_gpumem.backends.alloc_conf import ENV_NAMES, parse_alloc_conf
from jupyter_gpumem.diagnosis.diagnose import diagnose
from jupyter_gpumem.diagnosis.model import Diagnosis
from jupyter_gpumem.diagnosis.rules_allocator import settings_advice
from jupyter_gpumem.oom.report import parse_oom_message
from jupyter_gpumem.readings.allocator_state import (
    AllocatorState,
    measure_blocks,
    read_allocator_state,
)
from jupyter_gpumem.readings.holders import HolderSet
from jupyter_gpumem.units import MiB

SET_IT = "Set PYTORCH_CUDA_ALLOC_CONF="
RUNTIME = "_set_allocator_settings"


def _segment(blocks: list[tuple[float, str]], kind: str = "large") -> dict[str, Any]:
    """One segment in ``torch.cuda.memory_snapshot()``'s format, sizes in MiB."""
    sized = [{"size": int(mib * MiB), "state": state} for mib, state in blocks]
    return {
        "device": 0,
        "segment_type": kind,
        "total_size": sum(b["size"] for b in sized),
        "blocks": sized,
    }


def test_two_freed_5_mib_blocks_cannot_hold_6_mib() -> None:
    """PyTorch's own fragmentation case: a 20 MiB segment split into four 5 MiB blocks, the 1st
    and 3rd freed: 10 MiB free, none of it usable for 6 MiB, none of it returnable."""
    segs = [
        _segment(
            [(5, "inactive"), (5, "active_allocated"), (5, "inactive"), (5, "active_allocated")]
        )
    ]
    b = measure_blocks(segs, 6 * MiB)
    assert (b.pool, b.unallocated_bytes, b.too_small_bytes) == ("large", 10 * MiB, 10 * MiB)
    assert (b.too_small_blocks, b.largest_bytes, b.releasable_bytes) == (2, 5 * MiB, 0)
    # a request the 5 MiB blocks can hold is not blocked by them
    assert measure_blocks(segs, 4 * MiB).too_small_bytes == 0
    # small requests come from the small pool, whatever the large one holds
    small = measure_blocks([*segs, _segment([(2, "inactive")], "small")], 512)
    assert (small.pool, small.pool_free_bytes, small.too_small_bytes) == ("small", 2 * MiB, 0)
    assert small.releasable_bytes == 2 * MiB  # a segment with no tensor: empty_cache returns it


def _env(monkeypatch: Any, **values: str) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def _fragmented_oom(monkeypatch: Any, **env: str) -> Diagnosis:
    """A real OOM on the simulated GPU (64 MiB): five 1.5 MiB tensors in a 20 MiB segment (one
    that grows instead, with expandable segments), then 60 MiB more; read as the failure reads
    it: the allocator's state before anything is released, then the diagnosis."""
    torch = pytest.importorskip("torch")
    import jupyter_gpumem
    from jupyter_gpumem.readings.snapshot import read_snapshot

    _env(monkeypatch, **env)
    with jupyter_gpumem.simulate("64MiB"):
        kept = [torch.empty(3 * (1 << 19), dtype=torch.uint8, device="cuda") for _ in range(5)]
        try:
            torch.empty(60 * MiB, dtype=torch.uint8, device="cuda")  # with or without the slack
        except torch.OutOfMemoryError as exc:
            report = parse_oom_message(str(exc))
        assert report is not None
        state = read_allocator_state(report.requested_bytes, 0)
        d = diagnose(report, read_snapshot(), HolderSet(), allocator=state)
        del kept
    return d


SETTINGS_ON = [
    {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
    {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128,expandable_segments:True"},
    {"PYTORCH_CUDA_ALLOC_CONF": " expandable_segments : True , garbage_collection_threshold:0.6"},
    {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False,expandable_segments:True"},
    # PYTORCH_ALLOC_CONF wins over the CUDA one, as in torch
    {"PYTORCH_ALLOC_CONF": "expandable_segments:True", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"},
    {"PYTORCH_HIP_ALLOC_CONF": "expandable_segments:True"},
]  # fmt: skip


@pytest.mark.parametrize(
    "env", SETTINGS_ON, ids=lambda e: ";".join(f"{k}={v}" for k, v in e.items())
)
def test_advice_never_repeats_a_setting_already_on(monkeypatch: Any, env: dict[str, str]) -> None:
    d = _fragmented_oom(monkeypatch, **env)
    assert d.allocator is not None and d.allocator.expandable
    text = " ".join(f"{c.evidence} {c.action}" for c in d.causes)
    assert SET_IT not in text and RUNTIME not in text
    assert "expandable_segments:True is already on" in settings_advice(d.allocator)


@pytest.mark.parametrize(
    ("env", "advised"),
    [
        ({}, "expandable_segments:True"),
        ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}, "expandable_segments:True"),
        (
            {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:256,garbage_collection_threshold:0.8"},
            "max_split_size_mb:256,garbage_collection_threshold:0.8,expandable_segments:True",
        ),
    ],
    ids=["unset", "off", "others-kept"],
)
def test_advice_when_off_keeps_the_other_settings_and_says_restart(
    monkeypatch: Any, env: dict[str, str], advised: str
) -> None:
    d = _fragmented_oom(monkeypatch, **env)
    frag = next(c for c in d.causes if c.key == "fragmentation")
    assert f"{SET_IT}{advised} and restart the kernel" in frag.action
    assert "when CUDA started" in frag.action


# 64 MiB asked, 20 MiB free, 300 MiB reserved but unallocated: torch's own message
FRAGMENTED = (
    "CUDA out of memory. Tried to allocate 64.00 MiB. GPU 0 has a total capacity of 1024.00 MiB of "
    "which 20.00 MiB is free. Including non-PyTorch memory, this process has 1000.00 MiB memory in "
    "use. Of the allocated memory 700.00 MiB is allocated by PyTorch, and 300.00 MiB is reserved by "
    "PyTorch but unallocated."
)


def _from_env(env: dict[str, str], blocks: Any = None) -> Diagnosis:
    """The message diagnosed with the settings read from ``env`` as the failure reads them
    (no card to take blocks from here, unless ``blocks`` is given)."""
    report = parse_oom_message(FRAGMENTED)
    assert report is not None
    state = read_allocator_state(report.requested_bytes, 0, env=env)
    if blocks is not None:
        state = AllocatorState(**{**state.__dict__, "blocks": blocks})
    return diagnose(report, None, HolderSet(), allocator=state)


def test_no_expandable_advice_under_cudamallocasync() -> None:
    """cudaMallocAsync does not use expandable segments (and the simulated GPU refuses it)."""
    d = _from_env({"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"})
    frag = next(c for c in d.causes if c.key == "fragmentation")
    assert (
        SET_IT not in frag.action and "cudaMallocAsync backend pools memory itself" in frag.action
    )


def test_a_setting_torch_refuses_is_said_not_built_upon() -> None:
    d = _from_env({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:maybe"})
    frag = next(c for c in d.causes if c.key == "fragmentation")
    assert "PYTORCH_CUDA_ALLOC_CONF is refused by torch" in frag.action
    assert "expandable_segments" in frag.action and SET_IT not in frag.action


@pytest.mark.parametrize(
    "env", SETTINGS_ON, ids=lambda e: ";".join(f"{k}={v}" for k, v in e.items())
)
def test_an_estimated_fragmentation_does_not_repeat_a_setting_either(env: dict[str, str]) -> None:
    frag = next(c for c in _from_env(env).causes if c.key == "fragmentation")
    assert SET_IT not in frag.action and "already on" in frag.action


def test_fragmentation_says_the_measured_numbers(monkeypatch: Any) -> None:
    d = _fragmented_oom(monkeypatch)
    b = d.allocator.blocks
    assert b is not None and b.too_small_bytes > 0
    frag = next(c for c in d.causes if c.key == "fragmentation")
    assert frag.saving_bytes == b.too_small_bytes
    assert f"free block{'s' if b.too_small_blocks != 1 else ''} of the large pool too small" in (
        frag.evidence
    )
    assert "not measured" not in frag.evidence


def _state(**kw: Any) -> AllocatorState:
    base: dict[str, Any] = {
        "conf": parse_alloc_conf(""),
        "env_conf": parse_alloc_conf(""),
        "conf_error": None,
        "from_allocator": True,
        "cuda_started": True,
        "blocks": None,
    }
    return AllocatorState(**{**base, **kw})


def test_set_after_cuda_started_needs_a_restart_not_the_same_advice() -> None:
    """The environment says on; the allocator, which read it once, runs without it."""
    a = _state(env_conf=parse_alloc_conf("expandable_segments:True"))
    advice = settings_advice(a)
    assert "restart the kernel for it to apply" in advice and SET_IT not in advice


def test_before_cuda_starts_no_restart_is_needed() -> None:
    advice = settings_advice(_state(cuda_started=False, from_allocator=False))
    assert (
        advice
        == "Set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before the first CUDA allocation."
    )


def test_measured_blocks_that_fit_the_request_are_no_fragmentation() -> None:
    """The message's 'reserved but unallocated' is large, but the blocks are big enough: the
    allocator's blocks are not what stopped it, so fragmentation is not named."""
    segs = [_segment([(100, "inactive"), (100, "active_allocated")]) for _ in range(3)]
    blocks = measure_blocks(segs, 64 * MiB)
    assert blocks.too_small_bytes == 0
    measured = _from_env({}, blocks)
    assert "fragmentation" not in {c.key for c in measured.causes}
    # unmeasured, the same message is an estimate, and says so
    guessed = _from_env({})
    frag = next(c for c in guessed.causes if c.key == "fragmentation")
    assert "not measured" in frag.evidence


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({}, "Set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True and restart the kernel"),
        ({"PYTORCH_CUDA_ALLOC_CONF": "garbage_collection_threshold:0.6"}, "Set PYTORCH_CUDA_ALLOC_CONF=garbage_collection_threshold:0.6,expandable_segments:True"),
    ],
    ids=["unset", "others-kept"],
)  # fmt: skip
def test_an_oom_in_a_cell_measures_the_blocks_and_advises_what_is_not_on(
    shell: Any, run: Any, monkeypatch: Any, env: dict[str, str], said: str
) -> None:
    pytest.importorskip("torch")
    _env(monkeypatch, **env)
    shell.run_cell("%gpumem simulate 64MiB")
    shell.run_cell(
        "import torch\n"
        "kept = [torch.empty(3 * 2**19, dtype=torch.uint8, device='cuda') for _ in range(5)]"
    )
    out = run(
        shell,
        "more = torch.empty(60 * 2**20, dtype=torch.uint8, device='cuda')",
        store_history=False,
    ).out
    assert "free block of the large pool too small for the 60.00 MiB request" in out, out
    assert said in out


@pytest.mark.parametrize(
    ("segments", "said"),
    [
        ([_segment([(20, "inactive")]), _segment([(2, "active_allocated")], "small")], "Clear cache returns 20.00 MiB"),
        ([_segment([(5, "inactive"), (15, "active_allocated")])], "Clear cache has nothing to return"),
    ],
    ids=["free-segment", "none"],
)  # fmt: skip
def test_a_library_failure_says_what_clear_cache_returns(
    segments: list[dict[str, Any]], said: str
) -> None:
    """cuBLAS's workspace: Clear cache's saving is the segments with no tensor, measured."""
    report = parse_oom_message(
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
    )
    assert report is not None
    state = _state(blocks=measure_blocks(segments, 0))
    lib = next(c for c in diagnose(report, None, HolderSet(), allocator=state).causes)
    assert lib.key == "library" and said in lib.action


def test_the_allocators_own_record_wins_over_the_environment() -> None:
    """``memory_snapshot()['allocator_settings']`` on CUDA: the string the allocator was set up
    with, and the expandable flag as it is now (``_set_allocator_settings`` may have changed it)."""
    from jupyter_gpumem.readings.allocator_state import _from_settings

    conf = _from_settings(
        {"PYTORCH_ALLOC_CONF": "max_split_size_mb:128", "expandable_segments": True}
    )
    assert conf is not None and conf.expandable_segments and conf.max_split_size == 128 * MiB
    assert _from_settings({}) is None  # the simulated GPU's and older torches': the environment
    advice = settings_advice(_state(conf=conf, env_conf=parse_alloc_conf("")))
    assert "already on (the allocator runs with it)" in advice and SET_IT not in advice


def test_clear_cache_promises_only_what_the_allocator_can_give_back(shell: Any, run: Any) -> None:
    """PyTorch's fragmentation case, through the user's surface: two freed 5 MiB blocks share a
    segment with live tensors, so empty_cache returns neither. The cause says so, and the Clear
    cache line agrees with it (was: 'Clear cache (saves ~10.00 MiB)' beside 'Clear cache cannot
    return them', the reserved-but-unallocated bytes taken for what it frees)."""
    pytest.importorskip("torch")
    shell.run_cell("%gpumem simulate 64MiB")
    shell.run_cell(
        "import torch\nMiB = 1 << 20\n"
        "parts = [torch.empty(5 * MiB, dtype=torch.uint8, device='cuda') for _ in range(4)]\n"
        "del parts[2], parts[0]\n"
        "big = torch.empty(40 * MiB, dtype=torch.uint8, device='cuda')"
    )
    out = run(
        shell, "x = torch.empty(6 * MiB, dtype=torch.uint8, device='cuda')", store_history=False
    ).out
    assert "Clear cache cannot return them" in out, out
    clear = next(line for line in out.splitlines() if "retry clear" in line)
    assert "saves ~0 B" in clear, clear

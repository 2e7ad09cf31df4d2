"""PYTORCH_CUDA_ALLOC_CONF read as torch 2.13 reads it (c10/core/AllocatorConfig.cpp,
c10/cuda/CUDAAllocatorConfig.cpp): checked against torch's own parser where the installed torch
has it (``torch._C._accelerator_setAllocatorSettings``, the same c10 code on every build), and
against the source for the CUDA-only keys a CPU build does not register."""

from __future__ import annotations

import pytest

from jupyter_gpumem.backends.alloc_conf import (
    UNLIMITED,
    AllocConf,
    AllocConfError,
    parse_alloc_conf,
    read_alloc_conf,
)

MiB = 1 << 20


def test_nothing_set_is_torchs_defaults() -> None:
    conf = read_alloc_conf({})
    assert conf == AllocConf()
    assert conf.backend == "native" and conf.source is None
    assert conf.max_split_size == UNLIMITED and not conf.split_limited
    assert conf.roundup_power2_divisions == (0,) * 16
    assert conf.garbage_collection_threshold == 0.0 and not conf.expandable_segments
    assert conf.large_segment_size == conf.max_non_split_rounding_size == 20 * MiB


def test_pytorch_alloc_conf_wins_over_the_cuda_name() -> None:
    env = {
        "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64",
        "PYTORCH_ALLOC_CONF": "expandable_segments:True",
    }
    conf = read_alloc_conf(env)
    assert conf.source == "PYTORCH_ALLOC_CONF"
    assert conf.expandable_segments and not conf.split_limited
    assert read_alloc_conf({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}).max_split_size == (
        64 * MiB
    )


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage_collection_threshold:0.6")
    assert read_alloc_conf().garbage_collection_threshold == 0.6


def test_the_documented_settings() -> None:
    conf = parse_alloc_conf(
        " max_split_size_mb : 128 , garbage_collection_threshold:0.8,"
        "roundup_power2_divisions:[256:1,512:2,1024:4,>:8],expandable_segments:True,"
        "backend:native,pinned_use_cuda_host_register:True,pinned_num_register_threads:8"
    )
    assert conf.max_split_size == 128 * MiB and conf.split_limited
    assert conf.garbage_collection_threshold == 0.8
    assert conf.expandable_segments and conf.native
    assert conf.pinned_use_cuda_host_register and conf.pinned_num_register_threads == 8
    # intervals by log2(MiB): below 256 MiB the first value, 256 -> index 8, 512 -> 9, 1024 -> 10
    assert conf.roundup_power2_divisions == (1,) * 9 + (2, 4) + (8,) * 5
    assert conf.divisions_for(100 * MiB) == 1
    assert conf.divisions_for(300 * MiB) == 1
    assert conf.divisions_for(600 * MiB) == 2
    assert conf.divisions_for(1500 * MiB) == 4
    assert conf.divisions_for(3000 * MiB) == 8
    assert conf.divisions_for(100 << 30) == 8  # past 64 GiB: the last interval


def test_roundup_power2_divisions_old_form_fills_every_interval() -> None:
    assert parse_alloc_conf("roundup_power2_divisions:4").roundup_power2_divisions == (4,) * 16


def test_large_segment_size_raises_the_split_floor() -> None:
    conf = parse_alloc_conf("max_split_size_mb:40,large_segment_size_mb:40")
    assert conf.large_segment_size == conf.max_non_split_rounding_size == 40 * MiB
    with pytest.raises(AllocConfError, match="max_split_size_mb too small, must be >= 40"):
        parse_alloc_conf("max_split_size_mb:30,large_segment_size_mb:40")


def test_cuda_malloc_async_backend_and_its_warning() -> None:
    conf = parse_alloc_conf("backend:cudaMallocAsync")
    assert conf.backend == "cudaMallocAsync" and not conf.native and not conf.warnings
    warned = parse_alloc_conf("backend:cudaMallocAsync,pinned_num_register_threads:2")
    assert warned.warnings and "ignores max_split_size_mb" in warned.warnings[0]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("max_split_size_mb:10", "max_split_size_mb too small, must be >= 20"),
        ("max_non_split_rounding_mb:4", "max_non_split_rounding_mb too small, must be >= 20"),
        ("large_segment_size_mb:10", "large_segment_size_mb must be > 10 MB"),
        ("garbage_collection_threshold:1.5", "set it in (0.0, 1.0)"),
        ("garbage_collection_threshold:0", "set it in (0.0, 1.0)"),
        ("expandable_segments:true", "Expected 'True' or 'False' at index 2"),
        ("roundup_power2_divisions:3", "divisions has to be power of 2"),
        ("roundup_power2_divisions:[256:3]", "power of 2 or 0 to disable roundup"),
        ("roundup_power2_divisions:[100:2]", "the intervals have to be power of 2"),
        ("roundup_power2_divisions:[256:2", "ends early"),
        ("max_split_size_mb", "ends early"),
        ("max_split_size_mb:abc", "not a number"),
        ("backend:cudaMalloc", "Unknown allocator backend, options are native and cudaMallocAsync"),
        ("expandable_segment:True", "Unrecognized key 'expandable_segment' in Accelerator"),
        ("max_split_size_mb=100", "Unrecognized key 'max_split_size_mb=100'"),
        ("expandable_segments:True,,max_split_size_mb:30", "Unrecognized key ','"),
        ("pinned_num_register_threads:3", "has to be power of 2, got 3"),
        ("pinned_num_register_threads:256", "less than or equal to 128, got 256"),
        ("pinned_reserve_segment_size_mb:0", "greater than 0"),
        ("per_process_memory_fraction:1.5", "set it in [0.0, 1.0]"),
    ],
)
def test_refused_as_torch_refuses(text: str, words: str) -> None:
    with pytest.raises(AllocConfError) as raised:
        parse_alloc_conf(text)
    message = str(raised.value)
    assert words in message
    assert message.startswith(f"PYTORCH_CUDA_ALLOC_CONF={text!r}: ")
    assert "\n" not in message
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize(
    ("text", "field", "value"),
    [
        ("max_split_size_mb:64x", "max_split_size", 64 * MiB),  # stoull reads the leading digits
        ("max_split_size_mb:-5", "max_split_size", (UNLIMITED // MiB) * MiB),  # stoull wraps
        ("garbage_collection_threshold:0.5x", "garbage_collection_threshold", 0.5),
        ("roundup_power2_divisions:[>:4]", "roundup_power2_divisions", (0,) + (4,) * 15),
        ("roundup_power2_divisions:[256:2,>:4,]", "roundup_power2_divisions", (2,) * 9 + (4,) * 7),
    ],
)
def test_what_torch_lets_pass_passes(text: str, field: str, value: object) -> None:
    assert getattr(parse_alloc_conf(text), field) == value


# ---- against the installed torch's own parser ---------------------------------------------------

AGAINST_TORCH = [
    "max_split_size_mb:100",
    "max_split_size_mb:19",
    "max_split_size_mb:20",
    "max_split_size_mb:abc",
    "max_split_size_mb:64x",
    "max_split_size_mb:-5",
    "max_split_size_mb",
    "max_split_size_mb:",
    "max_non_split_rounding_mb:10",
    "large_segment_size_mb:10",
    "large_segment_size_mb:11",
    "large_segment_size_mb:40,max_split_size_mb:30",
    "max_split_size_mb:30,large_segment_size_mb:40",
    "garbage_collection_threshold:0.5",
    "garbage_collection_threshold:1",
    "garbage_collection_threshold:-0.1",
    "garbage_collection_threshold:x",
    "expandable_segments:True",
    "expandable_segments:False",
    "expandable_segments:true",
    "expandable_segments:1",
    "expandable_segments",
    " expandable_segments : True ",
    "roundup_power2_divisions:4",
    "roundup_power2_divisions:3",
    "roundup_power2_divisions:[256:1,512:2,>:8]",
    "roundup_power2_divisions:[256:3]",
    "roundup_power2_divisions:[100:2]",
    "roundup_power2_divisions:[256:2",
    "roundup_power2_divisions:[>:0]",
    "pinned_use_background_threads:True",
    "pinned_use_background_threads:yes",
    "pinned_max_round_threshold_mb:4",
    "pinned_max_cached_size_mb:0",
    "max_split_size_mb:100 max_split_size_mb:200",
]


@pytest.mark.parametrize("text", AGAINST_TORCH)
def test_agrees_with_torchs_parser(text: str) -> None:
    torch = pytest.importorskip("torch")
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:
        pytest.skip("this torch has no c10 AcceleratorAllocatorConfig")
    before = torch._C._accelerator_getAllocatorSettings()
    setter("large_segment_size_mb:20")  # the one setting torch keeps from one parse to the next
    try:
        try:
            setter(text)
            torch_error = None
        except (ValueError, RuntimeError) as exc:
            torch_error = str(exc).splitlines()[0]
    finally:
        setter("large_segment_size_mb:20")
        setter(before)
    try:
        parse_alloc_conf(text)
        ours = None
    except AllocConfError as exc:
        ours = str(exc)
    assert (ours is None) == (torch_error is None), (ours, torch_error)
    if (
        torch_error is not None
        and "INTERNAL ASSERT" not in torch_error
        and "sto" not in torch_error
    ):
        assert torch_error.strip() in ours  # type: ignore[operator]

"""Simulated cards like the real ones: torch.cuda's answers per profile, checked against what
real cards print (OOM messages posted from them, and ours from an H100 in shared/data)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from jupyter_gpumem import backends  # noqa: E402
from jupyter_gpumem.backends import simulated  # noqa: E402
from jupyter_gpumem.backends.simulated.card import format_size  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30

# "GPU 0 has a total capacity of X", as torch printed it on each card
TOTAL_PRINTED = {
    "T4": "14.56 GiB",  # Kaggle/Colab T4: "a 14.56 GiB T4" (several posted messages)
    "V100-16GB": "15.77 GiB",
    "A100-40GB": "39.39 GiB",  # "GPU 2 has a total capacity of 39.39 GiB" (A100-SXM4-40GB)
    "A100-80GB": "79.15 GiB",
    "H100-80GB": "79.18 GiB",  # shared/data/oom_messages, our H100 80GB HBM3
    "RTX4090": "23.64 GiB",  # "24GB 4090 ... total capacity of 23.64 GiB"
    "L4": "22.03 GiB",  # "NVIDIA L4 (22.03 GiB visible to PyTorch, 23.66 GB nameplate)"
}

CAPABILITY = {
    "T4": (7, 5),
    "V100-16GB": (7, 0),
    "A100-40GB": (8, 0),
    "A100-80GB": (8, 0),
    "H100-80GB": (9, 0),
    "RTX4090": (8, 9),
    "L4": (8, 9),
}

# torch 2.11 + CUDA 13.0 on an H100 80GB HBM3, nothing allocated yet (shared/data/oom_messages)
REAL_H100 = (
    "CUDA out of memory. Tried to allocate 400.00 GiB. GPU 0 has a total capacity of 79.18 GiB of "
    "which 78.66 GiB is free. Including non-PyTorch memory, this process has 518.00 MiB memory in "
    "use. Of the allocated memory 0 bytes is allocated by PyTorch, and 0 bytes is reserved by "
    "PyTorch but unallocated."
)


@pytest.fixture(autouse=True)
def _stop_simulation() -> Iterator[None]:
    yield
    simulated.stop()


def test_every_profile_is_listed() -> None:
    assert set(backends.simulated_profiles()) == set(TOTAL_PRINTED)


@pytest.mark.parametrize("key", sorted(TOTAL_PRINTED))
def test_torch_cuda_answers_as_the_card(key: str) -> None:
    gpu = backends.simulate(None, profile=key)
    props = torch.cuda.get_device_properties(0)
    assert format_size(props.total_memory) == TOTAL_PRINTED[key]
    assert (props.major, props.minor) == CAPABILITY[key] == torch.cuda.get_device_capability()
    assert props.multi_processor_count > 0 and props.name == torch.cuda.get_device_name(0)
    assert torch.cuda.get_device_name() == gpu.devices[0].name
    assert f"total_memory={props.total_memory // MiB}MB" in repr(props)
    # the CUDA context: seen by the driver, not by the allocator
    free, total = torch.cuda.mem_get_info()
    context = gpu.devices[0].context_bytes
    assert 100 * MiB <= context <= 600 * MiB
    assert total == props.total_memory and free == total - context
    assert torch.cuda.memory_allocated() == torch.cuda.memory_reserved() == 0
    x = torch.empty(10 * MiB, dtype=torch.uint8, device="cuda")
    free_now, _ = torch.cuda.mem_get_info()
    assert free_now == total - context - torch.cuda.memory_reserved()
    del x


@pytest.mark.parametrize("key", sorted(CAPABILITY))
def test_bf16_native_only_from_compute_capability_8(key: str) -> None:
    backends.simulate(None, profile=key)
    native = CAPABILITY[key][0] >= 8
    assert torch.cuda.is_bf16_supported() is True  # emulated counts, as torch says by default
    assert torch.cuda.is_bf16_supported(including_emulation=False) is native


def test_t4_oom_message_has_its_context() -> None:
    backends.simulate("T4")
    with pytest.raises(torch.OutOfMemoryError) as raised:
        torch.empty(15 * GiB, dtype=torch.uint8, device="cuda")
    message = str(raised.value)
    assert "GPU 0 has a total capacity of 14.56 GiB" in message
    assert "this process has 150.00 MiB memory in use" in message  # the context, nothing else
    assert "Of the allocated memory 0 bytes is allocated by PyTorch" in message


def test_h100_oom_reads_as_the_real_one() -> None:
    backends.simulate(None, profile="H100-80GB")
    with pytest.raises(torch.OutOfMemoryError) as raised:
        torch.empty(400 * GiB, dtype=torch.uint8, device="cuda")
    ours = str(raised.value)
    free = re.compile(r"of which ([\d.]+) GiB is free")
    real_free = float(free.search(REAL_H100).group(1))  # type: ignore[union-attr]
    our_free = float(free.search(ours).group(1))  # type: ignore[union-attr]
    # the driver keeps a few MiB more than this process's context: within 0.02 GiB
    assert abs(real_free - our_free) <= 0.02
    assert free.sub("", ours).startswith(free.sub("", REAL_H100))


def test_a_plain_size_keeps_todays_card() -> None:
    gpu = backends.simulate(512 * MiB)
    assert gpu.devices[0].context_bytes == 0
    assert torch.cuda.mem_get_info() == (512 * MiB, 512 * MiB)
    assert torch.cuda.get_device_capability() == (8, 0) and torch.cuda.is_bf16_supported(False)
    assert torch.cuda.get_device_name() == "Simulated GPU (512 MiB)"


def test_a_plain_size_with_a_context() -> None:
    gpu = backends.simulate(1 * GiB, context_bytes=300 * MiB)
    assert torch.cuda.mem_get_info() == (GiB - 300 * MiB, GiB)
    with pytest.raises(torch.OutOfMemoryError) as raised:
        torch.empty(800 * MiB, dtype=torch.uint8, device="cuda")  # fits the card, not the rest
    assert "this process has 300.00 MiB memory in use" in str(raised.value)
    assert gpu.reserved_bytes == 0


def test_profiles_on_several_devices() -> None:
    gpu = backends.simulate(None, profile="A100-40GB", devices=2)
    assert [c.name for c in gpu.devices] == ["NVIDIA A100-SXM4-40GB"] * 2
    assert torch.cuda.get_device_properties(1).total_memory == gpu.devices[1].total_bytes
    assert (
        torch.cuda.mem_get_info(1)[0] == gpu.devices[1].total_bytes - gpu.devices[1].context_bytes
    )


@pytest.mark.parametrize(
    ("name", "key"),
    [("t4", "T4"), ("H100", "H100-80GB"), ("rtx 4090", "RTX4090"), ("NVIDIA L4", "L4")],
)
def test_profile_names_are_forgiving(name: str, key: str) -> None:
    gpu = backends.simulate(None, profile=name)
    assert gpu.devices[0].profile is simulated.PROFILES[key]


@pytest.mark.parametrize(
    ("args", "kwargs", "words"),
    [
        ((None,), {"profile": "A100"}, "no simulated card is called 'A100'"),
        ((None,), {"profile": "GTX 480"}, "the profiles: T4, V100-16GB"),
        ((GiB,), {"profile": "T4"}, "a profile or a size, not both"),
        ((None,), {}, "a size or a profile"),
        ((GiB,), {"context_bytes": 2 * GiB}, "does not fit a card"),
    ],
)
def test_bad_arguments_are_one_line(args: tuple, kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError) as raised:
        backends.simulate(*args, **kwargs)
    assert words in str(raised.value) and "\n" not in str(raised.value)
    assert backends.simulation() is None


def test_gpumem_simulate_a_profile_in_a_notebook(shell: Any, capsys: Any) -> None:
    shell.run_cell("%gpumem simulate T4")
    assert "Simulated GPU of 14.56 GiB" in capsys.readouterr().out
    result = shell.run_cell(
        "import torch\n"
        "name = torch.cuda.get_device_name()\n"
        "native = torch.cuda.is_bf16_supported(including_emulation=False)\n"
        "free, total = torch.cuda.mem_get_info()\n"
        "try:\n"
        "    torch.empty(15 * 2**30, dtype=torch.uint8, device='cuda')\n"
        "except torch.OutOfMemoryError as e:\n"
        "    message = str(e)\n"
    )
    assert result.success
    ns = shell.user_ns
    assert ns["name"] == "Tesla T4" and ns["native"] is False
    assert ns["total"] - ns["free"] == 150 * MiB  # the context, before anything is allocated
    assert "this process has 150.00 MiB memory in use" in ns["message"]

"""The simulated GPU as strict as CUDA (issue 18, item 1), through what the user types.

Tensors on the card say so (``device``, ``is_cuda``, ``get_device``, their repr); host tensors stay
on the host and count nowhere; an op mixing devices raises torch's own error; ``.numpy()`` of a
card tensor is refused with torch's words; a model with Adam trains on the card; two cards keep
their tensors apart. Messages are torch 2.13's (``libtorch_cpu``'s strings,
``aten/src/ATen/core/adaption.cpp`` and ``TensorIterator``), never the double's own.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

import jupyter_gpumem  # noqa: E402
from jupyter_gpumem import backends  # noqa: E402

MiB = 1 << 20
SAME_DEVICE = "Expected all tensors to be on the same device"


def _cell(shell: Any, code: str) -> Any:
    """Run a cell; return its result (the cell's error, if any, in ``error_in_exec``)."""
    return shell.run_cell(code, store_history=True)


def _ok(shell: Any, code: str) -> None:
    result = _cell(shell, code)
    assert result.error_in_exec is None, result.error_in_exec


def _error(shell: Any, code: str) -> BaseException:
    result = _cell(shell, code)
    assert result.error_in_exec is not None, code
    return result.error_in_exec


@pytest.fixture
def card(shell: Any) -> Any:
    _ok(shell, "%gpumem simulate 256MiB")
    _ok(shell, "import torch, numpy as np")
    return shell


def test_a_tensor_on_the_card_says_it_is_on_cuda(card: Any) -> None:
    _ok(card, "x = torch.zeros(3, device='cuda')\nh = torch.zeros(3)")
    ns = card.user_ns
    x, h = ns["x"], ns["h"]
    assert x.device == torch.device("cuda", 0) and x.is_cuda and not x.is_cpu
    assert x.get_device() == 0 and x.type() == "torch.cuda.FloatTensor"
    assert repr(x) == "tensor([0., 0., 0.], device='cuda:0')"
    assert h.device == torch.device("cpu") and not h.is_cuda and repr(h) == "tensor([0., 0., 0.])"
    _ok(card, "y = x.cpu()\nz = x.to('cpu')\nv = x.sum().item()\nl = x.tolist()")
    assert ns["y"].device.type == ns["z"].device.type == "cpu"
    assert ns["v"] == 0.0 and ns["l"] == [0.0, 0.0, 0.0]


def test_mixing_cuda_and_cpu_raises_torchs_error(card: Any, capsys: Any) -> None:
    _ok(card, "x = torch.ones(4, device='cuda')\nh = torch.ones(4)")
    capsys.readouterr()
    err = _error(card, "x + h")
    shown = capsys.readouterr()
    assert "Expected all tensors" in shown.out + shown.err
    # the user's error, not ours: IPython hides our frames but the one that raises it
    assert (shown.out + shown.err).count("jupyter_gpumem") == 1
    assert isinstance(err, RuntimeError)
    assert str(err) == (
        "Expected all tensors to be on the same device, but found at least two devices, "
        "cuda:0 and cpu!"
    )
    _ok(card, "s = x * torch.tensor(2.0)")  # a 0-dim host tensor is a scalar, as on CUDA
    assert card.user_ns["s"].is_cuda
    # a layer on the card fed a host batch: the generated check's form, with the argument's name
    _ok(card, "layer = torch.nn.Linear(4, 2).to('cuda')")
    err = _error(card, "layer(torch.ones(3, 4))")
    assert str(err) == (
        "Expected all tensors to be on the same device, but got mat1 is on cpu, different from "
        "other tensors on cuda:0 (when checking argument in method wrapper_CUDA_addmm)"
    )


def test_numpy_of_a_card_tensor_is_refused_as_torch_refuses_it(card: Any) -> None:
    _ok(card, "x = torch.ones(2, device='cuda')")
    expected = (
        "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
        "to host memory first."
    )
    for code in ("x.numpy()", "np.asarray(x)"):
        err = _error(card, code)
        assert isinstance(err, TypeError) and str(err) == expected
    _ok(card, "a = x.cpu().numpy()")
    assert card.user_ns["a"].tolist() == [1.0, 1.0]


def test_host_tensors_do_not_count_nanogpt_get_batch(card: Any) -> None:
    """nanoGPT's get_batch: per-sample host tensors from numpy, stacked, pinned, then sent."""
    _ok(
        card,
        "data = np.random.default_rng(0).integers(0, 50, 400_000).astype(np.int64)\n"
        "def get_batch(device='cuda'):\n"
        "    ix = torch.randint(len(data) - 256, (32,))\n"
        "    x = torch.stack([torch.from_numpy(data[i:i + 256]) for i in ix])\n"
        "    y = torch.stack([torch.from_numpy(data[i + 1:i + 257]) for i in ix])\n"
        "    return (x.pin_memory().to(device, non_blocking=True),\n"
        "            y.pin_memory().to(device, non_blocking=True))\n"
        "host = torch.from_numpy(data)\n"
        "before = torch.cuda.memory_allocated()\n"
        "big_host = torch.randn(4 * 2**20)  # 16 MiB on the host\n"
        "after_host = torch.cuda.memory_allocated()\n"
        "x, y = get_batch()",
    )
    ns = card.user_ns
    assert ns["after_host"] == ns["before"]  # host tensors are not on the card
    assert ns["x"].is_cuda and ns["y"].is_cuda
    gpu = backends.simulation()
    assert gpu is not None
    assert not gpu.holds(ns["host"]) and not gpu.holds(ns["big_host"])
    on_card = sum(n for _, n in gpu.live_storages())
    assert on_card == 2 * 32 * 256 * 8  # the two batches, nothing else


def test_a_model_and_adam_train_on_the_card(card: Any) -> None:
    _ok(
        card,
        "torch.manual_seed(0)\n"
        "model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),\n"
        "                            torch.nn.Linear(32, 4)).cuda()\n"
        "opt = torch.optim.Adam(model.parameters(), lr=1e-2)\n"
        "data = torch.utils.data.TensorDataset(torch.randn(64, 16), torch.randint(0, 4, (64,)))\n"
        "losses = []\n"
        "for xb, yb in torch.utils.data.DataLoader(data, batch_size=16):\n"
        "    xb, yb = xb.to('cuda'), yb.to('cuda')\n"
        "    loss = torch.nn.functional.cross_entropy(model(xb), yb)\n"
        "    opt.zero_grad(); loss.backward(); opt.step(); torch.cuda.synchronize()\n"
        "    losses.append(loss.item())\n"
        "state = model.state_dict()",
    )
    ns = card.user_ns
    model, opt = ns["model"], ns["opt"]
    assert all(p.is_cuda and p.grad.is_cuda for p in model.parameters())
    first = opt.state[next(iter(model.parameters()))]
    assert first["exp_avg"].is_cuda and first["exp_avg_sq"].is_cuda
    assert first["step"].device.type == "cpu"  # as torch keeps it, without capturable/fused
    assert all(v.is_cuda for v in ns["state"].values())
    assert len(ns["losses"]) == 4
    _ok(card, "model.cpu()\ncpu_out = model(torch.randn(2, 16))")  # back on the host: no error
    assert ns["cpu_out"].device.type == "cpu"
    assert all(not p.is_cuda for p in model.parameters())


def test_two_cards_keep_their_tensors_apart(shell: Any) -> None:
    _ok(shell, "%gpumem simulate 256MiB --devices 2\nimport torch")
    _ok(shell, "a = torch.ones(8, device='cuda:0')\nb = torch.ones(8, device='cuda:1')")
    ns = shell.user_ns
    assert ns["a"].device == torch.device("cuda", 0) and ns["b"].device == torch.device("cuda", 1)
    assert repr(ns["b"]) == "tensor([1., 1., 1., 1., 1., 1., 1., 1.], device='cuda:1')"
    err = _error(shell, "a + b")
    assert str(err) == (
        "Expected all tensors to be on the same device, but found at least two devices, "
        "cuda:0 and cuda:1!"
    )
    _ok(shell, "c = b * 2\nd = a.to('cuda:1') + b")
    assert ns["c"].get_device() == 1 and ns["d"].get_device() == 1


def test_simulate_from_python_and_torch_as_it_was_after() -> None:
    with jupyter_gpumem.simulate("64MiB"):
        x = torch.zeros(4, device="cuda")
        assert x.is_cuda and repr(x).endswith("device='cuda:0')")
        with pytest.raises(RuntimeError, match=SAME_DEVICE):
            torch.cat([x, torch.zeros(4)])
        with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"):
            torch.empty(128 * MiB, dtype=torch.uint8, device="cuda")
        torch.empty(128 * MiB, dtype=torch.uint8)  # a host tensor: the card's size is no limit
    assert not x.is_cuda and x.device.type == "cpu"  # no simulation: torch as it was


def test_torchs_own_intermediates_go_to_the_card(card: Any) -> None:
    """C++ makes a composite op's intermediates on its inputs' device: scaled_dot_product_attention's
    causal mask (nanoGPT's attention in training) is on the card, not a host tensor that mixes;
    pack_padded_sequence's lengths stay on the CPU, as CUDA wants them."""
    _ok(
        card,
        "q = torch.randn(2, 2, 8, 4, device='cuda', requires_grad=True)\n"
        "y = torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.2,\n"
        "                                                     is_causal=True)\n"
        "y.sum().backward()\n"
        "seqs = torch.randn(3, 5, 4, device='cuda')\n"
        "packed = torch.nn.utils.rnn.pack_padded_sequence(seqs, torch.tensor([5, 3, 2]),\n"
        "                                                 batch_first=True)\n"
        "out, _ = torch.nn.LSTM(4, 6, batch_first=True).cuda()(packed)",
    )
    ns = card.user_ns
    assert ns["y"].is_cuda and ns["q"].grad.is_cuda and ns["out"].data.is_cuda


def test_an_lstm_on_the_card_runs_without_looking_for_cudnn() -> None:
    """Card tensors report ``is_cuda``; a CPU build has no cuDNN, so an LSTM warned at each call
    ("PyTorch was compiled without cuDNN") until the simulation turned cuDNN off while it runs."""
    import warnings

    import jupyter_gpumem

    enabled = torch.backends.cudnn.enabled
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with jupyter_gpumem.simulate("256MiB"):
            lstm = torch.nn.LSTM(8, 16).cuda()
            out, _ = lstm(torch.randn(5, 3, 8, device="cuda"))
            assert out.is_cuda
    assert not [w for w in caught if "cuDNN" in str(w.message)]
    assert torch.backends.cudnn.enabled == enabled, "left as it was found"


def test_the_backend_empties_the_cards_caches_as_torch_does() -> None:
    """``MemoryBackend.empty_cache`` (what Clear cache and the release call) gives the cards'
    wholly free cached segments back, as ``torch.cuda.empty_cache()`` does (was: a no-op since
    the card caches blocks as PyTorch's allocator does)."""
    import jupyter_gpumem
    from jupyter_gpumem.backends import active

    with jupyter_gpumem.simulate("256MiB", devices=2):
        x = torch.empty(30 << 20, dtype=torch.uint8, device="cuda:1")
        del x
        assert torch.cuda.memory_reserved(1) > 0, "freed blocks stay cached"
        active().empty_cache()
        assert torch.cuda.memory_reserved(1) == 0


def test_torch_accelerator_answers_for_the_card_as_on_a_cuda_machine(shell: Any) -> None:
    """pytorch/examples choose their device with ``torch.accelerator`` (``is_available()``,
    ``current_accelerator()``), and torch.optim asks its ``current_stream().is_capturing()``
    before a step on an accelerator: on a CUDA machine they answer ``cuda``, so they do on the
    simulated one, its memory functions included; after ``simulate off``, torch's own again."""
    before = (torch.accelerator.is_available(), torch.accelerator.current_accelerator())
    _ok(shell, "%gpumem simulate 64MiB --devices 2")
    _ok(
        shell,
        "import torch\n"
        "device = torch.accelerator.current_accelerator() if torch.accelerator.is_available() "
        "else torch.device('cpu')\n"
        "model = torch.nn.Linear(64, 64).to(device)\n"
        "opt = torch.optim.Adam(model.parameters())\n"
        "model(torch.randn(32, 64, device=device)).sum().backward()\n"
        "opt.step()\n"
        "on = (device.type, torch.accelerator.device_count(), next(model.parameters()).is_cuda)\n"
        "mem = (torch.accelerator.memory_allocated(), torch.cuda.memory_allocated())\n"
        "torch.accelerator.set_device_index(1)\n"
        "idx = (torch.accelerator.current_device_index(), torch.cuda.current_device())\n"
        "torch.accelerator.set_device_index(0)",
    )
    ns = shell.user_ns
    assert ns["on"] == ("cuda", 2, True)
    assert ns["mem"][0] == ns["mem"][1] > 0
    assert ns["idx"] == (1, 1)
    _ok(shell, "%gpumem simulate off")
    after = (torch.accelerator.is_available(), torch.accelerator.current_accelerator())
    assert after == before

"""One MemoryBackend: the CUDA one and the simulated one answer the same questions, the simulated
one is a double that leaves torch as it found it, and nothing outside backends/ asks which it has."""

from __future__ import annotations

import ast
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest

import jupyter_gpumem
from jupyter_gpumem import backends
from jupyter_gpumem.backends import MemoryBackend, active, simulated
from jupyter_gpumem.backends.cuda import CudaBackend

PACKAGE = Path(jupyter_gpumem.__file__).resolve().parent
MiB = 1 << 20


# What asks whether the GPU is simulated: the simulated GPU's names (imported, or read as an
# attribute of anything: ``backends.simulation()``, ``snap.simulated``; a name bound by an import
# is caught at the import, a local variable of that name is not asking), getattr/hasattr of one,
# and a device's words searched for "simulated" (``"simulated" in label``, ``note == "simulated"``,
# ``re.search("simulated", ...)``, ``label.endswith("(simulated)")``).
_SIMULATED_NAMES = frozenset(
    {"simulated", "simulation", "simulate", "stop_simulation", "simulated_profiles", "SimulatedGPU"}
)
_SEARCHES = frozenset({"search", "match", "fullmatch", "findall", "find", "endswith", "startswith"})

# Outside backends/, only the user's own switch: the public API that starts and stops it, and
# `%gpumem simulate` (start, stop, the profiles it offers, and ending the one it started when the
# extension unloads). These start and stop the double; none of them branches on it.
_ALLOWED = {
    "__init__.py": {"simulate", "stop_simulation", "SimulatedGPU"},  # jupyter_gpumem.simulate()
    "ipython/magics.py": {"simulate", "simulation", "stop_simulation"},  # %gpumem simulate [off]
    "ipython/magic_args.py": {"simulated_profiles"},  # %gpumem simulate T4: the profile names
    "ipython/extension.py": {"simulation", "stop_simulation"},  # unload ends %gpumem simulate's
}


def _asks_simulated(source: str) -> list[tuple[int, str]]:
    """(line, what) for each place in ``source`` that asks whether the GPU is simulated."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if "simulated" in module.split("."):
                found.append((node.lineno, "simulated"))
            found += [(node.lineno, a.name) for a in node.names if a.name in _SIMULATED_NAMES]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, "simulated") for a in node.names if "simulated" in a.name]
        elif isinstance(node, ast.Attribute) and node.attr in _SIMULATED_NAMES:
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            texts = [a.value for a in node.args if isinstance(a, ast.Constant)]
            asked = sorted(_SIMULATED_NAMES.intersection(texts))
            if name in ("getattr", "hasattr") and asked:
                found.append((node.lineno, f"{name}(..., {asked[0]!r})"))
            elif name in _SEARCHES and any("imulated" in str(t) for t in texts):
                found.append((node.lineno, f"{name}('...simulated...')"))
        elif isinstance(node, ast.Compare):
            words = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
            if any(isinstance(w, str) and "imulated" in w for w in words):
                found.append((node.lineno, "compared with 'simulated'"))
    return found


def test_nothing_outside_backends_asks_whether_the_gpu_is_simulated() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("backends/"):
            continue
        allowed = _ALLOWED.get(rel, set())
        for line, what in _asks_simulated(path.read_text(encoding="utf-8")):
            if what not in allowed:
                found.append(f"{rel}:{line}: {what}")
    assert not found, "\n".join(found)


def test_the_check_for_asking_whether_the_gpu_is_simulated_finds_each_way_of_asking() -> None:
    planted = {
        "from jupyter_gpumem.backends import simulated": "simulated",
        "from jupyter_gpumem.backends.simulated import current": "simulated",
        "import jupyter_gpumem.backends.simulated.gpu": "simulated",
        "from jupyter_gpumem.backends import SimulatedGPU": "SimulatedGPU",
        "x = backends.simulation() is None": "simulation",
        "if snap.simulated: pass": "simulated",
        "ok = isinstance(b, backends.SimulatedGPU)": "SimulatedGPU",
        "f = getattr(snap, 'simulated', False)": "getattr(..., 'simulated')",
        "y = 'simulated' in device": "compared with 'simulated'",
        "y = reading.note == 'simulated'": "compared with 'simulated'",
        "y = label.endswith('(simulated)')": "endswith('...simulated...')",
        "y = re.search(r'\\(simulated\\)', label)": "search('...simulated...')",
    }
    for source, what in planted.items():
        assert [w for _line, w in _asks_simulated(source)] == [what], source
    # what is not asking: the words shown to the user, the backend's own note passed on
    assert not _asks_simulated("print('Simulated GPU off.')\nlabel = f'{name} ({r.note})'")


def test_the_cuda_backend_reads_nothing_without_a_gpu_and_never_raises() -> None:
    backend = CudaBackend()
    assert isinstance(backend, MemoryBackend)
    assert backend.note is None
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        pytest.skip("a real GPU is here")
    reading = backend.read(0)
    assert reading.stats is None and reading.index == 0
    assert backend.allocator_stats() is None and backend.mem_get_info() is None
    assert backend.process_cap() is None
    backend.empty_cache()
    backend.reset_peak()
    assert backend.autocast_device_type() == "cuda"


def test_active_is_the_simulation_while_it_runs_and_cuda_otherwise() -> None:
    pytest.importorskip("torch")
    assert isinstance(active(), CudaBackend)
    with jupyter_gpumem.simulate("64MiB") as gpu:
        assert active() is gpu and isinstance(gpu, MemoryBackend)
        assert gpu.note == "simulated"
    assert isinstance(active(), CudaBackend)


def test_both_backends_answer_storage_of_and_move_to_cpu_the_same_way() -> None:
    torch = pytest.importorskip("torch")
    cpu = torch.ones(4)
    assert CudaBackend().storage_of(cpu) is None  # a CPU tensor is on no GPU
    with jupyter_gpumem.simulate("64MiB") as gpu:
        model = torch.nn.Linear(256, 256).cuda()
        _key, nbytes, device = gpu.storage_of(model.weight)  # type: ignore[misc]
        assert nbytes == 256 * 256 * 4 and device == "cuda:0 (simulated)"
        assert device.device_index == 0
        obj, moved = gpu.move_to_cpu(model)
        assert obj is model and moved == (256 * 256 + 256) * 4
        assert gpu.allocated_bytes == 0 and gpu.storage_of(model.weight) is None


def _torch_state(torch: Any) -> dict[str, Any]:
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return {
        "cuda": {name: getattr(torch.cuda, name) for name in dir(torch.cuda)},
        "function modes": list(_get_current_function_mode_stack()),
        "dispatch modes": list(_get_current_dispatch_mode_stack()),
        "profile": threading.getprofile(),
        "default device": torch.get_default_device(),
        "available": torch.cuda.is_available(),
    }


def test_simulate_leaves_torch_exactly_as_it_was_even_when_the_block_raises() -> None:
    torch = pytest.importorskip("torch")
    before = _torch_state(torch)
    with pytest.raises(torch.OutOfMemoryError), jupyter_gpumem.simulate("64MiB", devices=2) as gpu:
        assert torch.cuda.device_count() == 2
        with torch.cuda.device(1):  # torch.cuda's private _exchange_device, patched too
            x = torch.zeros(MiB, device="cuda")
        assert gpu.devices[1].holds(x)
        torch.empty(128 * MiB, dtype=torch.uint8, device="cuda")
    assert _torch_state(torch) == before
    assert simulated.current() is None


def test_simulate_counts_on_threads_like_a_real_card_and_not_after() -> None:
    torch = pytest.importorskip("torch")
    made: list[Any] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            made.append(torch.zeros(MiB, device="cuda:1"))  # 4 MiB on the second card
            torch.empty(128 * MiB, dtype=torch.uint8, device="cuda")
        except BaseException as exc:
            errors.append(exc)

    with jupyter_gpumem.simulate("64MiB", devices=2) as gpu:
        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
        assert gpu.devices[1].allocated_bytes == 4 * MiB and gpu.devices[0].allocated_bytes == 0
        assert isinstance(errors[0], torch.OutOfMemoryError) and "GPU 0" in str(errors[0])
    errors.clear()
    after = threading.Thread(target=work)
    after.start()
    after.join()
    assert errors and not isinstance(errors[0], torch.OutOfMemoryError)  # no CUDA here any more


def test_both_backends_run_code_written_for_the_gpu_on_the_cpu() -> None:
    """Move to CPU's re-run: placements on any card make host tensors, counted nowhere, and the
    mode says what it sent."""
    torch = pytest.importorskip("torch")
    with CudaBackend().placements_to_cpu() as mode:
        x = torch.zeros(4, device="cuda:1")
    assert x.device.type == "cpu" and mode.redirected["torch.zeros"] == 1
    with jupyter_gpumem.simulate("64MiB", devices=2) as gpu:
        with gpu.host_only(), gpu.placements_to_cpu() as mode:
            y = torch.ones(MiB, device="cuda:1").to("cuda")
        assert gpu.storage_of(y) is None and all(c.allocated_bytes == 0 for c in gpu.devices)
        assert not y.is_cuda and mode.redirected == {"torch.ones": 1, "torch.Tensor.to": 1}


def test_a_storage_names_its_card_by_index_not_by_its_words() -> None:
    """``on_device`` reads the index the backend filled, never the text; a copy or a pickle of
    the label keeps it; text with no index counts on every card."""
    import copy
    import pickle

    torch = pytest.importorskip("torch")
    with jupyter_gpumem.simulate("64MiB", devices=2) as gpu:
        x = torch.zeros(4, device="cuda:1")
        device = gpu.storage_of(x)[2]  # type: ignore[index]
    assert str(device) == "cuda:1 (simulated)" and device.device_index == 1
    assert backends.on_device(device, 1) and not backends.on_device(device, 0)
    assert backends.on_device(device, None)
    for again in (copy.deepcopy(device), pickle.loads(pickle.dumps(device))):
        assert again == device and again.device_index == 1
    # made by hand, the words say cuda:1 but name no card: nothing is read out of them
    assert backends.on_device("cuda:1", 0) and backends.on_device("", 0)
    # a CUDA tensor's label: torch's device text, its index; another accelerator's has none
    label = backends.DeviceLabel("cuda:3", 3)
    assert f"{label}" == "cuda:3" and not backends.on_device(label, 0)
    assert backends.on_device(backends.DeviceLabel("mps:0", None), 1)


def test_the_cuda_backend_labels_a_storage_with_torchs_index() -> None:
    torch = pytest.importorskip("torch")

    class OnCard2:  # what storage_of reads of a tensor on cuda:2, without a GPU
        device = torch.device("cuda", 2)

        def untyped_storage(self) -> Any:
            return types.SimpleNamespace(data_ptr=lambda: 4096, nbytes=lambda: 512)

    (_dev, ptr), nbytes, device = CudaBackend().storage_of(OnCard2())  # type: ignore[misc]
    assert (ptr, nbytes, device) == (4096, 512, "cuda:2") and device.device_index == 2

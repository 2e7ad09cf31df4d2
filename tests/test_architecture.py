"""The codebase as docs/architecture.md describes it: every module listed, the layers kept
(import-linter's contracts), no private name imported across subpackages, the public names pinned,
the simulated GPU a double that leaves torch as it found it. Complexity is ruff's C901 (<= 15)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import jupyter_gpumem

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jupyter_gpumem"


def _modules() -> set[str]:
    return {
        p.relative_to(ROOT).as_posix()
        for p in PACKAGE.rglob("*.py")
        if "labextension" not in p.parts
    }


def test_every_module_is_on_the_architecture_page() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"`(jupyter_gpumem/[\w/]+\.py)`", page))
    missing = sorted(_modules() - listed)
    gone = sorted(listed - _modules())
    assert not missing, f"modules not on docs/architecture.md: {missing}"
    assert not gone, f"docs/architecture.md lists modules that do not exist: {gone}"


def _subpackage(module: str) -> str:
    """``jupyter_gpumem.fixes.batch.search`` -> ``jupyter_gpumem.fixes``: the layer it lives in."""
    return ".".join(module.split(".")[:2])


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _crossings(module: str, source: str) -> list[str]:
    """Where ``module`` (dotted) imports a ``_private`` name, or from a ``_private`` module, of
    another subpackage: ``from a.b import _x``, ``from a._b import x``, ``import a._b``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [(node.module, [a.name for a in node.names])]
        elif isinstance(node, ast.Import):
            targets = [(a.name, []) for a in node.names]
        else:
            continue
        for target, names in targets:
            if not target.startswith("jupyter_gpumem") or (
                _subpackage(target) == _subpackage(module)
            ):
                continue
            hidden = [n for n in names if _private(n)]
            hidden += [part for part in target.split(".") if _private(part)]
            found += [f"{module}:{node.lineno} imports {h} from {target}" for h in hidden]
    return found


def test_no_private_name_is_imported_across_subpackages() -> None:
    """A ``_name`` is its subpackage's business: another layer imports only what is public."""
    crossings: list[str] = []
    for name in sorted(_modules()):
        module = name.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
        crossings += _crossings(module, (ROOT / name).read_text(encoding="utf-8"))
    assert not crossings, crossings


def test_the_private_import_check_can_fail() -> None:
    """The check above, given a module that crosses in each way it knows, names each crossing,
    and leaves alone what a subpackage may do inside itself and what is public."""
    source = (
        "from jupyter_gpumem.diagnosis.render import _md, render_text\n"
        "from jupyter_gpumem.backends._nvml import read_device\n"
        "import jupyter_gpumem.backends._trace_modules as tm\n"
        "from jupyter_gpumem.fixes.batch._inner import y\n"  # own subpackage: allowed
        "from jupyter_gpumem.fixes.base import _Private\n"  # own subpackage: allowed
        "from jupyter_gpumem.readings.snapshot import read_snapshot\n"  # public: allowed
        "from os import _exit\n"  # not ours
    )
    found = _crossings("jupyter_gpumem.fixes.ladder", source)
    assert [f.split(" ", 1)[1] for f in found] == [
        "imports _md from jupyter_gpumem.diagnosis.render",
        "imports _nvml from jupyter_gpumem.backends._nvml",
        "imports _trace_modules from jupyter_gpumem.backends._trace_modules",
    ]
    assert [f.split(" ", 1)[0] for f in found] == [
        "jupyter_gpumem.fixes.ladder:1",
        "jupyter_gpumem.fixes.ladder:2",
        "jupyter_gpumem.fixes.ladder:3",
    ]


def test_the_layer_contracts_hold() -> None:
    """import-linter's contracts in pyproject.toml (the layers, the simulated GPU kept inside
    backends/): the same check .ci/test runs, here so a plain pytest run sees a broken layer."""
    importlinter = pytest.importorskip("importlinter")
    del importlinter
    import subprocess
    import sys

    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter's lint-imports is not installed beside this Python")
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:]


def test_public_names_are_pinned() -> None:
    """httpx's test_exported_members: a name added or removed is a decision, made here."""
    assert set(jupyter_gpumem.__all__) == {
        "Cause",
        "Diagnosis",
        "GpuMem",
        "Holder",
        "HolderSet",
        "MemoryBackend",
        "MemorySnapshot",
        "OOMReport",
        "ReleaseResult",
        "__version__",
        "diagnose",
        "find_holders",
        "find_oom",
        "format_bytes",
        "is_oom",
        "last_failure",
        "load_ipython_extension",
        "parse_oom_message",
        "parse_size",
        "read_snapshot",
        "release_failed_cell",
        "render_html",
        "render_text",
        "simulate",
        "stop_simulation",
        "unload_ipython_extension",
    }
    for name in jupyter_gpumem.__all__:
        assert hasattr(jupyter_gpumem, name), name


def test_simulate_as_a_context_manager_leaves_torch_as_it_was() -> None:
    torch = pytest.importorskip("torch")
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    before = {
        name: getattr(torch.cuda, name) for name in dir(torch.cuda) if not name.startswith("_")
    }
    modes = (len(_get_current_function_mode_stack()), len(_get_current_dispatch_mode_stack()))
    with jupyter_gpumem.simulate("64MiB") as gpu:
        x = torch.zeros(4 << 20, device="cuda")  # 16 MiB, counted
        assert torch.cuda.is_available()
        assert gpu.allocated_bytes == 16 << 20
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(128 << 20, device="cuda")
        del x
    after = {
        name: getattr(torch.cuda, name) for name in dir(torch.cuda) if not name.startswith("_")
    }
    assert after == before
    assert (
        len(_get_current_function_mode_stack()),
        len(_get_current_dispatch_mode_stack()),
    ) == modes
    assert not torch.cuda.is_available()

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


def test_no_private_name_is_imported_across_subpackages() -> None:
    """A ``_name`` is its subpackage's business: another layer imports only what is public."""
    crossings: list[str] = []
    for name in sorted(_modules()):
        module = name.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
        for node in ast.walk(ast.parse((ROOT / name).read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module):
                continue
            if not node.module.startswith("jupyter_gpumem") or (
                _subpackage(node.module) == _subpackage(module)
            ):
                continue
            hidden = [a.name for a in node.names if _private(a.name)]
            hidden += [part for part in node.module.split(".") if _private(part)]
            crossings += [f"{name}:{node.lineno} imports {h} from {node.module}" for h in hidden]
    assert not crossings, crossings


def test_the_private_import_check_can_fail() -> None:
    """The walk above sees a private crossing when there is one (its own input, not the tree)."""
    source = "from jupyter_gpumem.diagnosis.render import _md\nfrom jupyter_gpumem.backends._x import y\n"
    node_names = [
        (n.module, [a.name for a in n.names])
        for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.ImportFrom)
    ]
    assert [m for m, names in node_names if any(map(_private, names))] == [
        "jupyter_gpumem.diagnosis.render"
    ]
    assert [m for m, _ in node_names if any(map(_private, (m or "").split(".")))] == [
        "jupyter_gpumem.backends._x"
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

"""The codebase as docs/architecture.md describes it: every module listed, the public names pinned,
no module over 400 lines nor function over 60, the simulated GPU a double that leaves torch as it
found it."""

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


# A module that does one job reads in one sitting; a function that does one thing fits a screen.
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def test_no_module_or_function_past_its_size() -> None:
    too_long: list[str] = []
    for name in sorted(_modules()):
        source = (ROOT / name).read_text(encoding="utf-8")
        if source.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{name}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}: {node.name} is {length} lines")
    assert not too_long, too_long


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

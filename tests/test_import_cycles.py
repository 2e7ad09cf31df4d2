"""No two modules of the package import each other, directly or through others, type-only
imports included (grimp reads `if TYPE_CHECKING:` blocks too): a cycle is a module that cannot be
read without the one reading it (issue 17: diagnosis's rules read the Diagnosis that held their own
output; the magics typed their extension, which made the magics).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")


def _cycles(package: str) -> list[str]:
    graph = grimp.build_graph(package, cache_dir=None)  # no cache written into the checkout
    modules = sorted(graph.modules)
    found = []
    for a, b in itertools.combinations(modules, 2):
        there = graph.find_shortest_chain(importer=a, imported=b)
        back = graph.find_shortest_chain(importer=b, imported=a) if there else None
        if there and back:
            found.append(" -> ".join(there) + " | " + " -> ".join(back))
    return found


def test_no_module_imports_one_that_imports_it() -> None:
    assert _cycles("jupyter_gpumem") == []


def test_the_check_sees_a_type_only_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check itself: a cycle through an `if TYPE_CHECKING:` import is found."""
    pkg = tmp_path / "cyclic_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyclic_pkg.b import B\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from cyclic_pkg.a import A\n"
        "class B: ...\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert len(_cycles("cyclic_pkg")) == 1

"""Shift+Enter -> traceback -> the panel's headline and buttons, in a real browser.

A private, headless JupyterLab and Chromium (the fixtures of tests/test_browser.py), a notebook whose
second cell runs out of memory on the simulated GPU. The page itself stamps the times
(``performance.now()``): the Shift+Enter keydown, the first ``OutOfMemoryError`` output, the
panel's headline, its buttons, its chart. "Cold" is the first OOM in a fresh kernel (imports and
first widgets included: the case a user meets); "warm" re-runs the failing cell in the same kernel.

    python benchmarks/panel_latency.py [--kernels 3] [--warm 3] [--source DIR] [--write]

``--source DIR`` times another copy of the package (say, an older commit exported with
``git archive``); ``--write`` replaces this benchmark's section in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from datetime import date
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_browser import (  # noqa: E402  (after the path)
    KERNEL_READY_JS,
    OOM_CELL,
    SETUP,
    T_RUN,
    browser,
    expect,
    lab,
    open_notebook,
    outputs,
    run_cell,
)

__all__ = ["browser", "lab", "open_notebook"]  # fixtures, used by name
HEADING = "### Time from Shift+Enter to the panel, in the browser (simulated GPU)"

# Stamps, in page time, when each part first appears under the cell being run.
WATCH_JS = """cell => {
  const t = window.__gpumem = {};
  document.addEventListener('keydown', e => {
    if (e.key === 'Enter' && e.shiftKey) { for (const k in t) delete t[k]; t.key = performance.now(); }
  }, {capture: true});
  const seen = () => {
    const now = performance.now();
    if (!('key' in t)) return;
    const out = cell.querySelector('.jp-OutputArea');
    if (!out) return;
    if (!t.traceback && out.textContent.includes('OutOfMemoryError')) t.traceback = now;
    if (!t.headline && out.querySelector('.gpumem-panel .gpumem-diag h4')) t.headline = now;
    if (!t.buttons && out.querySelectorAll('.gpumem-panel button').length >= 4) t.buttons = now;
    if (!t.chart && out.querySelector('.gpumem-panel .gpumem-chart, .gpumem-panel .js-plotly-plot'))
      t.chart = now;
  };
  new MutationObserver(seen).observe(cell, {subtree: true, childList: true, characterData: true});
}"""
PARTS = ("traceback", "headline", "buttons", "chart")


def _one_oom(page: Any, cell_index: int) -> dict[str, float]:
    cell = run_cell(page, cell_index)
    expect(outputs(cell).first).to_contain_text("OutOfMemoryError", timeout=T_RUN)
    expect(cell.locator(".gpumem-panel button").nth(3)).to_be_attached(timeout=T_RUN)
    page.wait_for_function(
        "() => window.__gpumem.chart !== undefined && window.__gpumem.buttons !== undefined",
        timeout=T_RUN,
    )
    page.wait_for_function(KERNEL_READY_JS, timeout=T_RUN)
    t = page.evaluate("() => ({...window.__gpumem})")
    return {k: (t[k] - t["key"]) / 1000 for k in PARTS if k in t}


def bench_panel_latency(open_notebook: Any, request: Any) -> None:
    kernels, warm = request.config.kernels, request.config.warm
    runs: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    for k in range(kernels):
        # one cell per OOM: re-running a cell in place would race with its old outputs
        page = open_notebook(f"latency{k}.ipynb", [SETUP] + [OOM_CELL] * (1 + warm))
        cell0 = run_cell(page, 0)
        expect(outputs(cell0).first).to_contain_text("Simulated GPU", timeout=T_RUN)
        page.wait_for_function(KERNEL_READY_JS, timeout=T_RUN)
        for i in range(1 + warm):
            page.locator(".jp-Notebook .jp-Cell").nth(1 + i).evaluate(WATCH_JS)
            r = _one_oom(page, 1 + i)
            runs["cold" if i == 0 else "warm"].append(r)
            print("cold" if i == 0 else "warm", {k: round(v, 2) for k, v in r.items()}, flush=True)
    request.config.results = runs


def table(runs: dict[str, list[dict[str, float]]]) -> str:
    lines = [
        "| OOM | n | traceback s | headline s | buttons s | chart s | headline after traceback s |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, rs in runs.items():
        if not rs:
            continue

        def med(key: str, rs: list[dict[str, float]] = rs) -> str:
            vals = [r[key] for r in rs if key in r]
            return f"{statistics.median(vals):.2f}" if vals else "-"

        gap = [r["headline"] - r["traceback"] for r in rs if "headline" in r and "traceback" in r]
        lines.append(
            f"| {kind} | {len(rs)} | {med('traceback')} | {med('headline')} | {med('buttons')} "
            f"| {med('chart')} | {statistics.median(gap):.2f} (max {max(gap):.2f}) |"
        )
    return "\n".join(lines)


class _Plugin:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results: dict[str, list[dict[str, float]]] = {}

    def pytest_configure(self, config: Any) -> None:
        config.kernels, config.warm = self.args.kernels, self.args.warm

    def pytest_unconfigure(self, config: Any) -> None:
        self.results = getattr(config, "results", {})


def _write(doc: Path, text: str) -> None:
    """Replace this benchmark's own section (from its heading to the next one), or append it."""
    old = doc.read_text()
    if HEADING in old:
        start = old.index(HEADING)
        nxt = old.find("\n### ", start + len(HEADING))
        old = old[:start] + text + ("\n" + old[nxt + 1 :] if nxt != -1 else "")
    else:
        old = old.rstrip("\n") + "\n\n" + text
    doc.write_text(old if old.endswith("\n") else old + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernels", type=int, default=3, help="fresh kernels (one cold OOM each)")
    ap.add_argument("--warm", type=int, default=3, help="warm OOMs per kernel")
    ap.add_argument("--source", help="directory holding the jupyter_gpumem package to time")
    ap.add_argument("--write", action="store_true", help="write the table to docs/benchmarks.md")
    args = ap.parse_args()
    if args.source:
        os.environ["GPUMEM_PYTHONPATH"] = str(Path(args.source).resolve())
    plugin = _Plugin(args)
    rc = pytest.main(
        [__file__, "-q", "-s", "-p", "no:cacheprovider", "-o", "python_functions=bench_*"],
        plugins=[plugin],
    )
    if rc != 0 or not plugin.results:
        return int(rc) or 1
    import IPython
    import ipywidgets

    text = (
        f"{HEADING}\n\n{date.today()}, {platform.machine()}, {os.cpu_count()} cores shared, "
        f"Python {platform.python_version()}, IPython {IPython.__version__}, ipywidgets "
        f"{ipywidgets.__version__}, JupyterLab in headless Chromium; `benchmarks/panel_latency.py "
        f"--kernels {args.kernels} --warm {args.warm}`. Seconds from the Shift+Enter keydown to "
        "each part's first appearance under the cell (medians); cold: the first OOM of a fresh "
        "kernel.\n\n" + table(plugin.results) + "\n"
    )
    print(text)
    if args.write:
        _write(ROOT / "docs" / "benchmarks.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

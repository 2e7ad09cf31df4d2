"""jupyter_gpumem in Notebook 7 (``jupyter notebook``), in Chromium through Playwright, as in
JupyterLab (test_browser.py): the panel and its buttons, Cancel, the live gauge, and
``%gpumem sidebar``, which has no JupyterLab sidebar to go to here and says so in one line.

Notebook 7 is built from JupyterLab's components (the same cell and output DOM, the same page
config, ``window.jupyterapp``), so the shared fixtures drive it; only the server and the URL
differ (tests/_browser.py, ``serve("notebook", ...)``).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests import _browser
from tests._browser import BROWSER_MARKS, T_RUN, expect, outputs, run_cell, serve
from tests.test_browser import (
    ALLOC,
    CHECK,
    GAUGE,
    OOM_CELL,
    SETUP,
    SLOW_CELL,
    SLOW_CHECK,
    SLOW_SETUP,
    cancel_a_slow_fix,
    fail_and_show_panel,
    fits_at,
    run_gauge_while_allocating,
)

pytestmark = BROWSER_MARKS

browser = _browser.browser
open_notebook = _browser.open_notebook


@pytest.fixture(scope="module")
def lab(tmp_path_factory: Any) -> Any:
    """Notebook 7 (the fixture's name is the one open_notebook asks for)."""
    yield from serve("notebook", tmp_path_factory)


def _is_notebook7(page: Any) -> None:
    """The page is Notebook 7's notebook view, not JupyterLab's."""
    assert "/notebooks/" in page.url
    assert page.evaluate("window.jupyterapp.name") == "Jupyter Notebook"
    expect(page.locator("#jp-main-dock-panel, .jp-LabShell")).to_have_count(0)


def test_panel_and_reduce_batch_in_notebook7(open_notebook):
    page = open_notebook("nb7-quickstart.ipynb", [SETUP, OOM_CELL, CHECK], viewport=(1200, 1400))
    _is_notebook7(page)
    _, panel = fail_and_show_panel(page)
    reduce = panel.get_by_role("button", name=re.compile("^Reduce batch"))
    expect(reduce).to_be_enabled()
    reduce.click()
    found = fits_at(panel)
    expect(reduce).to_be_enabled()
    check = run_cell(page, 2)
    expect(outputs(check)).to_contain_text(f"batch now {found} ({found}, 256, 8)", timeout=T_RUN)


# Slow (CI's run, not the README's): test_notebook_experience's Cancel after "Re-run anyway"
# cancels through Notebook 7's server in the README's run too.
@pytest.mark.slow
def test_cancel_in_notebook7(open_notebook):
    """Cancel reaches the kernel through Notebook 7's server too (its page config, its cookie)."""
    page = open_notebook(
        "nb7-cancel.ipynb", [SLOW_SETUP, SLOW_CELL, SLOW_CHECK], viewport=(1200, 1400)
    )
    _is_notebook7(page)
    cancel_a_slow_fix(page)


SIDEBAR_NB7 = "%gpumem sidebar"


# Slow (CI's run, not the README's): the gauge moving is test_browser's in the README's run, the
# fallback outside JupyterLab test_ui's (test_sidebar_falls_back_inline_outside_jupyterlab).
@pytest.mark.slow
def test_gauge_moves_and_the_sidebar_falls_back_inline_in_notebook7(open_notebook):
    page = open_notebook("nb7-gauge.ipynb", [GAUGE, ALLOC, SIDEBAR_NB7])
    _is_notebook7(page)
    run_gauge_while_allocating(page)

    # no JupyterLab: the gauge lands under the cell, and one line says why
    cell2 = run_cell(page, 2)
    expect(cell2.locator(".js-plotly-plot text.number")).to_have_text("0.50 GiB", timeout=T_RUN)
    text = " ".join(outputs(cell2).all_text_contents())
    line = "No JupyterLab here: the gauge is shown inline instead of in a sidebar."
    assert text.count(line) == 1, text
    assert "right sidebar" not in text
    expect(page.locator(".jp-SideBar .lm-TabBar-tab", has_text="GPU memory")).to_have_count(0)

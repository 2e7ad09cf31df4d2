"""Settings, as traitlets config, so they can live in ``ipython_config.py`` like IPython's own::

c.InteractiveShellApp.extensions = ["jupyter_gpumem"]
c.GpuMem.keep_traceback = True     # keep the failed frames' tensors on the GPU (memory stays pinned)
c.GpuMem.gauge_interval = 0.5      # seconds between gauge samples
c.GpuMem.sidebar_on_load = True    # open the gauge in JupyterLab's sidebar on load
c.GpuMem.trace = True              # record which line allocated what, from load (%gpumem trace on)
"""

from __future__ import annotations

from traitlets import Bool, Enum, Float, Int
from traitlets.config import Configurable


class GpuMem(Configurable):
    """jupyter_gpumem: diagnose and fix GPU out-of-memory errors in cells."""

    keep_traceback = Bool(
        False,
        help="Keep the failed frames' tensors on the GPU after an OOM. By default they move to "
        "host memory in place (a tensor too large for it is described instead), so the GPU "
        "memory comes back and %debug still shows every local. With this on, the memory stays "
        "pinned until `%gpumem release`.",
    ).tag(config=True)
    traceback_context = Int(
        1, help="Lines of source shown around each frame of an OOM's traceback."
    ).tag(config=True)
    gauge_interval = Float(
        1.0, min=0.05, help="Seconds between two samples of the live memory gauge."
    ).tag(config=True)
    gauge_history = Float(120.0, help="Seconds of history the gauge shows.").tag(config=True)
    sidebar_on_load = Bool(
        False, help="Open the memory gauge in JupyterLab's right sidebar when the extension loads."
    ).tag(config=True)
    trace = Bool(
        False,
        help="Record allocation history with Python stacks from the moment the extension loads, "
        "as `%gpumem trace on` does, so an OOM says which lines of your cells hold the memory. "
        "Starts once torch is imported (never imports it); setting it later turns tracing on "
        "or off. Slows each allocation a little.",
    ).tag(config=True)
    display = Enum(
        ["auto", "panel", "html", "text"],
        default_value="auto",
        help="How to show a diagnosis: 'panel' (widgets with fix buttons, in Jupyter), 'html', "
        "'text' (terminal), or 'auto' (the panel where widgets work, else text).",
    ).tag(config=True)

from __future__ import annotations

import atexit
import gc
import importlib
import os
import queue
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _new_shell() -> Any:
    """A fresh InteractiveShell whose history lives in memory and which does nothing at exit:
    hundreds of test shells each writing IPython's history file at exit took ~1 s apiece after
    the last test."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    InteractiveShell.clear_instance()
    sh = InteractiveShell.instance(config=config, colors="nocolor")
    atexit.unregister(sh.atexit_operations)
    return sh


def _end_shell(sh: Any) -> None:
    """The shell's namespaces emptied as it goes: something of IPython's outlives a shell (each
    leaked its user namespace, tensors and all: ~190 MiB a test with a 190 MiB tensor, and a CI
    worker grew to 11 GiB)."""
    from IPython.core.interactiveshell import InteractiveShell

    sh.history_manager.end_session()
    try:
        sh.reset(new_session=False)  # the output cache, In/Out, the user namespace
    except Exception:
        pass
    sh.user_ns.clear()
    sh.user_ns_hidden.clear()
    InteractiveShell.clear_instance()


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def pytest_configure(config: Any) -> None:
    # one torch thread per test process (and per kernel a test starts, which inherits it): CI has
    # 2 cores and runs 2 workers, and a small model's step with torch's default threads took 35x
    # as long on a loaded 2-core machine (0.32 s against 0.009 s). A user's own setting is kept.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "torch" in sys.modules and os.environ["OMP_NUM_THREADS"] == "1":
        sys.modules["torch"].set_num_threads(1)


# the reason every slow test gives when `.ci/test` leaves it out: .ci/test counts these lines
SLOW_SKIPPED = "slow, left out of the README's run: GPUMEM_SLOW=1 bash .ci/test runs it (CI does)"


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    # under pytest-xdist (`-n 2 --dist loadgroup`, as .ci/test runs): the browser tests share one
    # worker, one after the other, so two JupyterLabs never compete for the page timeouts
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(pytest.mark.xdist_group("browser"))
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_frozen_at = 0  # len(sys.modules) when the garbage collector last froze what was alive


# what the extension and torch import on first use (torch._dynamo and the rest came after
# collection): imported before the one freeze, so their objects are frozen with the rest
_FIRST_USE = (
    "torch",
    "torch._dynamo",
    "torch.optim",
    "ipywidgets",
    "jupyter_gpumem.ipython.extension",
    "jupyter_gpumem.ui.panel",
    "jupyter_gpumem.fixes.ladder",
)


def _freeze_what_is_loaded() -> None:
    """Modules loaded (torch, IPython, the test modules, what the extension imports on first use:
    ~300k objects) stay for the whole session: out of the garbage collector's scans. Each
    gc.collect() the fixes make (several per re-run, hundreds of re-runs) took ~0.4 s scanning
    them on 2 cores. Frozen once, when collection ends, before any test ran: frozen objects are
    never collected, so freezing again later would keep what tests still held then (shells,
    their tensors) for the rest of the session: a worker grew to 10 GiB and the other was
    killed. Every object a test makes is collected as before."""
    global _frozen_at
    if os.environ.get("GPUMEM_GC_FREEZE", "1") != "1" or _frozen_at:
        return
    for name in _FIRST_USE:
        try:
            importlib.import_module(name)
        except Exception:  # not installed (the torch-free runs): nothing of it to freeze
            pass
    gc.collect()
    gc.freeze()
    _frozen_at = len(sys.modules)


def pytest_collection_finish(session: Any) -> None:
    _freeze_what_is_loaded()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: Any) -> None:
    # the README's `bash .ci/test` leaves the slow tests out (see there): skipped here, before any
    # fixture starts, so pytest -ra folds them into one line (this one) that .ci/test counts
    if os.environ.get("GPUMEM_SKIP_SLOW") == "1" and item.get_closest_marker("slow"):
        pytest.skip(SLOW_SKIPPED)


@pytest.fixture(autouse=True)
def _no_simulation_left() -> Iterator[None]:
    import signal

    handler = signal.getsignal(signal.SIGINT)
    yield
    from jupyter_gpumem.backends import simulated

    simulated.stop()
    # each test starts with the Ctrl-C handler the one before it found (a test that drives an
    # event loop or a kernel may leave its own; tests of Ctrl-C need Python's)
    if signal.getsignal(signal.SIGINT) is not handler and handler is not None:
        signal.signal(signal.SIGINT, handler)


@pytest.fixture
def shell() -> Iterator[Any]:
    """A real IPython InteractiveShell with the extension loaded (unloaded in teardown)."""
    sh = _new_shell()
    sh.run_cell("%load_ext jupyter_gpumem", store_history=False)
    yield sh
    sh.run_cell("%unload_ext jupyter_gpumem", store_history=False)
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)
    _end_shell(sh)


def extension(sh: Any) -> Any:
    """The extension loaded in ``sh`` (None when it is not), reached as IPython holds it: the
    object behind the ``%gpumem`` magics in IPython's magics registry. For tests that click the
    panel it shows or read what it recorded; settings are set with ``%config GpuMem.x = ...`` and
    the last failure read with ``jupyter_gpumem.last_failure(shell)``, as a user does."""
    magics = sh.magics_manager.registry.get("GpuMemMagics")
    return None if magics is None else magics.ext


@dataclass
class Seen:
    """What a user sees of one cell: what it printed (``out``), its error output and traceback
    (``err``), IPython's result (``result``: ``success``, ``error_in_exec``, ``result``), the
    bundles displayed while it ran (``displayed``: the hook's diagnosis, a gauge), and the
    ``In [N]`` it ran as (``number``)."""

    result: Any
    out: str
    err: str
    number: int
    displayed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def text(self) -> str:
        """Everything the cell showed, as one text: its output, then its error output."""
        return self.out + self.err

    @property
    def error(self) -> BaseException | None:
        return self.result.error_in_exec

    @property
    def success(self) -> bool:
        return bool(self.result.success)


@pytest.fixture
def run(capsys: Any) -> Callable[..., Seen]:
    """``run(shell, source)``: run one cell in ``shell`` as a notebook does (``In [N]`` counts;
    ``store_history=False`` for a cell the user's history does not keep) and return what the user
    sees of it (:class:`Seen`). Output printed before the cell is not part of it."""

    def _run(sh: Any, source: str, store_history: bool = True) -> Seen:
        displayed: list[dict[str, Any]] = []
        pub = sh.display_pub
        publish = pub.publish

        def _publish(data: Any, *args: Any, **kwargs: Any) -> Any:
            displayed.append(dict(data))
            return publish(data, *args, **kwargs)

        patched = "publish" in vars(pub)  # a test's own stand-in, put back as it was
        capsys.readouterr()
        number = sh.execution_count
        pub.publish = _publish
        try:
            result = sh.run_cell(source, store_history=store_history)
        finally:
            if patched:
                pub.publish = publish
            else:
                del pub.publish  # the class's method again
        cap = capsys.readouterr()
        return Seen(result, cap.out, cap.err, number, displayed)

    return _run


@pytest.fixture
def bare_shell() -> Iterator[Any]:
    """A real InteractiveShell without the extension."""
    sh = _new_shell()
    yield sh
    _end_shell(sh)


class Kernel:
    """A real ipykernel driven by jupyter_client: run cells, collect every output message."""

    def __init__(self, km: Any, kc: Any) -> None:
        self.km, self.kc = km, kc

    def run(self, code: str, timeout: float = 60) -> dict[str, Any]:
        # After a request fails with stop_on_error (JupyterLab's default, and the tests that send
        # their own requests), ipykernel aborts what reaches it before it has posted itself a
        # "stop aborting" message: a request sent at once can be answered "aborted", unrun. A
        # person cannot click that fast; the test sends it again, as the person's click would be.
        for _ in range(20):
            result = self._run_once(code, timeout)
            if result["reply"].get("status") != "aborted":
                return result
            time.sleep(0.05)
        raise AssertionError(f"the kernel aborted {code!r} 20 times")

    def _run_once(self, code: str, timeout: float) -> dict[str, Any]:
        msg_id = self.kc.execute(code, store_history=True)
        outputs: list[dict[str, Any]] = []
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no reply to {code!r}") from None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                break
            if kind in ("stream", "display_data", "execute_result", "error", "update_display_data"):
                outputs.append({"type": kind, **content})
        reply = self.kc.get_shell_msg(timeout=timeout)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.kc.get_shell_msg(timeout=timeout)
        return {"outputs": outputs, "reply": reply["content"]}

    @staticmethod
    def text(result: dict[str, Any]) -> str:
        parts = []
        for o in result["outputs"]:
            if o["type"] == "stream":
                parts.append(o["text"])
            elif o["type"] in ("display_data", "execute_result"):
                parts.append(o["data"].get("text/plain", ""))
            elif o["type"] == "error":
                parts.append("\n".join(o["traceback"]))
        return "\n".join(parts)


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    from jupyter_client.manager import start_new_kernel

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    km, kc = start_new_kernel(kernel_name="python3", env=env, cwd=ROOT)
    try:
        yield Kernel(km, kc)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)

"""The exception hook: ``shell.set_custom_exc``, chained to whatever handler was there.

It catches only the ``RuntimeError`` family (``torch.OutOfMemoryError`` is one), so every other error
never reaches it; a ``RuntimeError`` that is not an OOM goes to the previous handler, or to IPython's
own ``showtraceback`` exactly as IPython would call it. The handler never raises: IPython drops a
handler that raises. If building the diagnosis fails, one line says so under the user's traceback.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

from .backends import simulated
from .backends._state import read_rng
from .failure import FailedCell, NamespaceMark, build_failure
from .oom import OOMReport, find_oom
from .release import ReleaseResult, release_failed_cell

Presenter = Callable[["FailedCell"], None]


_DISPATCH_FILES = (
    "/jupyter_gpumem/backends/",
    "/torch/_compile.py",
    "/torch/_dynamo/",
    "/torch/utils/_python_dispatch.py",
    "/torch/overrides.py",
    "/torch/utils/_device.py",
)


def without_dispatch_frames(tb: TracebackType | None) -> TracebackType | None:
    """A copy of the traceback without the simulated GPU's own frames, for display.

    A real CUDA OOM is raised in C++ under the user's last Python frame; the simulated one passes
    through torch function and dispatch modes, Python frames that say nothing to the user. The
    original traceback (and its frames, for the diagnosis and %debug) is left as it is.
    """
    entries = []
    while tb is not None:
        if not _is_dispatch(tb):
            entries.append(tb)
        tb = tb.tb_next
    copy: TracebackType | None = None
    for e in reversed(entries):
        copy = TracebackType(copy, e.tb_frame, e.tb_lasti, e.tb_lineno)
    return copy


def _is_dispatch(tb: TracebackType) -> bool:
    name = tb.tb_frame.f_code.co_filename.replace("\\", "/")
    return any(p in name for p in _DISPATCH_FILES)


class OOMHook:
    """Installs, runs and removes the OOM handler of one shell."""

    def __init__(self, shell: Any, settings: Any) -> None:
        self.shell = shell
        self.settings = settings
        self.present: Presenter | None = None
        self.last_failure: FailedCell | None = None
        self._prev_exc: tuple[type[BaseException], ...] = ()
        self._prev_handler: Any = None
        self._installed = False
        self._mark = NamespaceMark(0, None)
        self._cell_source = ""
        self._cell_rng: Any = None
        self._cell_count: int | None = None
        self._pending_release: BaseException | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    def install(self) -> None:
        if self._installed:
            return
        shell = self.shell
        self._prev_exc = tuple(shell.custom_exceptions)
        self._prev_handler = shell.CustomTB if self._prev_exc else None
        hook = self

        def handler(
            shell: Any,
            etype: type[BaseException],
            value: BaseException,
            tb: TracebackType | None,
            tb_offset: int | None = None,
        ) -> None:
            hook.handle(etype, value, tb, tb_offset)

        shell.set_custom_exc((*self._prev_exc, RuntimeError), handler)
        self._our_handler = shell.CustomTB
        shell.events.register("pre_run_cell", self._pre_run_cell)
        shell.events.register("post_run_cell", self._post_run_cell)
        self._installed = True

    def uninstall(self) -> None:
        if not self._installed:
            return
        shell = self.shell
        for event, cb in (
            ("pre_run_cell", self._pre_run_cell),
            ("post_run_cell", self._post_run_cell),
        ):
            try:
                shell.events.unregister(event, cb)
            except ValueError:
                pass
        if getattr(shell, "CustomTB", None) == self._our_handler:
            if self._prev_exc:
                shell.custom_exceptions = self._prev_exc
                shell.CustomTB = self._prev_handler
            else:
                shell.set_custom_exc((), None)
                shell.custom_exceptions = ()
        self._installed = False

    # ---- per cell: O(1), the only cost a cell that does not fail pays ---------------------------

    def _pre_run_cell(self, info: Any) -> None:
        self._cell_source = getattr(info, "raw_cell", "") or ""
        self._mark = NamespaceMark.take(self.shell.user_ns)
        self._cell_count = getattr(self.shell, "execution_count", None)
        # a few KiB: the generators as this cell finds them, so a re-run starts from the same
        try:
            self._cell_rng = read_rng()
        except Exception:
            self._cell_rng = None

    def _post_run_cell(self, result: Any) -> None:
        exc = self._pending_release
        if exc is None:
            return
        self._pending_release = None
        # run_code has left its except block: now the exception object can let go of its frames
        err = getattr(result, "error_in_exec", None)
        if err is not None and err.__traceback__ is not None:
            from .release import detached_copy

            result.error_in_exec = detached_copy(err)
        exc.__traceback__ = None

    # ---- the handler --------------------------------------------------------------------------

    def _show_traceback(
        self, etype: type[BaseException], value: BaseException, tb: Any, tb_offset: int | None
    ) -> None:
        """IPython's own traceback, with less context per frame."""
        shell = self.shell
        # what IPython's showtraceback records, so %debug and %tb work as usual
        sys.last_type, sys.last_value, sys.last_traceback = etype, value, tb
        if simulated.current() is not None:
            tb = without_dispatch_frames(tb)
        if sys.version_info >= (3, 12):
            sys.last_exc = value
        itb = shell.InteractiveTB
        context = int(self.settings.traceback_context)
        params = inspect.signature(itb.structured_traceback).parameters
        kw = "context" if "context" in params else "number_of_lines_of_context"
        try:
            stb = itb.structured_traceback(etype, value, tb, tb_offset=tb_offset, **{kw: context})
        except Exception:
            stb = itb.structured_traceback(etype, value, tb, tb_offset=tb_offset)
        shell._showtraceback(etype, value, stb)

    def _pass_on(
        self, etype: type[BaseException], value: BaseException, tb: Any, tb_offset: int | None
    ) -> None:
        if self._prev_exc and isinstance(value, self._prev_exc) and self._prev_handler:
            self._prev_handler(etype, value, tb, tb_offset)
        else:
            self.shell.showtraceback(
                (etype, value, tb), tb_offset=tb_offset, running_compiled_code=True
            )

    def handle(
        self,
        etype: type[BaseException],
        value: BaseException,
        tb: TracebackType | None,
        tb_offset: int | None = None,
    ) -> None:
        # BaseException throughout: IPython drops a custom handler that raises (Ctrl-C included),
        # and the hook must stay installed for the rest of the session
        try:
            found = find_oom(value)
        except BaseException:
            found = None
        if found is None:
            try:
                self._pass_on(etype, value, tb, tb_offset)
            except BaseException:
                self._fallback_traceback(etype, value, tb, tb_offset)
            return
        try:
            self._show_traceback(etype, value, tb, tb_offset)
        except BaseException:
            self._fallback_traceback(etype, value, tb, tb_offset)
        failed = None
        try:
            failed = self.diagnose_failure(value, found[1], tb)
            self.last_failure = failed
            if self.present is not None:
                self.present(failed)
        except KeyboardInterrupt:
            print(
                "jupyter_gpumem: diagnosis interrupted (Ctrl-C); nothing was changed, and the "
                "traceback above is the original error.",
                file=sys.stderr,
            )
            self._release_quietly(failed, value)
        except BaseException as exc:  # never let IPython unregister us; never hide the error
            print(
                f"jupyter_gpumem: could not build the diagnosis ({type(exc).__name__}: {exc}); "
                "the traceback above is the original error.",
                file=sys.stderr,
            )
            self._release_quietly(failed, value)

    def _fallback_traceback(
        self, etype: type[BaseException], value: BaseException, tb: Any, tb_offset: int | None
    ) -> None:
        try:
            self.shell.showtraceback((etype, value, tb), tb_offset=tb_offset)
        except BaseException:
            pass

    def _release_quietly(self, failed: FailedCell | None, value: BaseException) -> None:
        if failed is None and not self.settings.keep_traceback:
            try:
                self._release(value)
            except BaseException:
                pass

    def diagnose_failure(
        self, value: BaseException, report: OOMReport, tb: TracebackType | None
    ) -> FailedCell:
        return build_failure(
            self.shell,
            value,
            report,
            tb,
            source=self._cell_source,
            preexisting=self._mark.preexisting(self.shell.user_ns),
            release=None if self.settings.keep_traceback else self._release,
            rng=self._cell_rng,
            execution_count=self._cell_count,
        )

    def _release(self, value: BaseException) -> ReleaseResult:
        self._pending_release = value
        return release_failed_cell(self.shell, value)

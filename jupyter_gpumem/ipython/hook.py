"""The exception hook: ``shell.set_custom_exc``, chained to whatever handler was there.

It is registered for every ``Exception`` (and ``BaseExceptionGroup``), because an OOM may arrive
wrapped: ``raise ValueError("loader failed") from oom``, inside an ``ExceptionGroup``, or as the
``__context__`` of a later error. An error with no OOM in its chain is shown exactly as IPython
shows it without us (or goes to the handler that claimed it before us); an OOM is shown, diagnosed
and freed, then passed on to that earlier handler if it claims the error. The handler never raises:
IPython drops a handler that raises. If building the diagnosis fails, one line says so under the
user's traceback.
"""

from __future__ import annotations

import builtins
import inspect
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

from jupyter_gpumem.backends import active
from jupyter_gpumem.backends.torch_state import read_rng
from jupyter_gpumem.cells.failure import FailedCell, NamespaceMark, build_failure
from jupyter_gpumem.frontend.labext import current_cell_id
from jupyter_gpumem.ipython.tracebacks import fold_library_frames, through
from jupyter_gpumem.oom.report import OOMReport, find_oom, walk_chain
from jupyter_gpumem.readings.release import ReleaseResult, release_failed_cell
from jupyter_gpumem.rescue import before_cell

Presenter = Callable[["FailedCell"], None]

_GROUP: type[BaseException] | None = getattr(builtins, "BaseExceptionGroup", None)
# KeyboardInterrupt and SystemExit stay IPython's: neither is an OOM, and neither is an Exception
CAUGHT: tuple[type[BaseException], ...] = (Exception,) if _GROUP is None else (Exception, _GROUP)


# --- the previous handler ---------------------------------------------------------------------


def _raw_handler(custom_tb: Any) -> Callable[..., Any] | None:
    """The function given to ``set_custom_exc``, out of IPython's wrapper around it.

    IPython's wrapper unregisters every custom handler (ours too) when the one inside raises;
    calling the function itself lets the hook report that in one line and stay installed.
    """
    func = getattr(custom_tb, "__func__", None)
    code = getattr(func, "__code__", None)
    closure = getattr(func, "__closure__", None)
    if code is None or not closure or "handler" not in code.co_freevars:
        return None
    raw = closure[code.co_freevars.index("handler")].cell_contents
    return raw if callable(raw) else None


class OOMHook:
    """Installs, runs and removes the OOM handler of one shell."""

    def __init__(self, shell: Any, settings: Any) -> None:
        self.shell = shell
        self.settings = settings
        self.present: Presenter | None = None
        self.last_failure: FailedCell | None = None
        self._prev_exc: tuple[type[BaseException], ...] = ()
        self._prev_handler: Any = None
        self._prev_raw: Callable[..., Any] | None = None
        self._our_exc: tuple[type[BaseException], ...] = ()
        self._our_handler: Any = None
        self._installed = False
        self._mark = NamespaceMark(0, None)
        self._cell_source = ""
        self._cell_rng: Any = None
        # (device, bytes allocated) as the cell started: what it found held, read from the
        # allocator's counter (a variable's gradients made by this cell are this cell's)
        self._cell_held: tuple[int, int] | None = None
        # the models' BatchNorm statistics and gradients as the cell found them, for the models
        # it names (rescue.before_cell): dropped after the cell, kept by a FailedCell
        self._cell_before: Any = None
        self._cell_id: str | None = None
        self._cell_count: int | None = None
        self._pending_release: BaseException | None = None
        # the error IPython last showed when the cell started, and the last one the handler saw:
        # an OOM shown between them without the handler (`%run`) is diagnosed after the cell
        # id of sys.last_value as the cell started: an id, not the error, which would keep an
        # earlier failure's frames (and the GPU tensors they hold) alive through the next run's
        # failure (exceptions take no weak references)
        self._last_seen: int | None = None
        self._handled: BaseException | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    def install(self) -> None:
        if self._installed:
            return
        shell = self.shell
        self._prev_exc = tuple(shell.custom_exceptions)
        self._prev_handler = shell.CustomTB
        self._prev_raw = _raw_handler(self._prev_handler) if self._prev_exc else None
        hook = self

        def handler(
            shell: Any,
            etype: type[BaseException],
            value: BaseException,
            tb: TracebackType | None,
            tb_offset: int | None = None,
        ) -> Any:
            return hook.handle(etype, value, tb, tb_offset)

        shell.set_custom_exc((*self._prev_exc, *CAUGHT), handler)
        self._our_exc = shell.custom_exceptions
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
            # exactly what was there: the same tuple and the same bound handler
            shell.custom_exceptions = self._prev_exc
            shell.CustomTB = self._prev_handler
        self._prev_handler = self._prev_raw = None
        self._installed = False

    def _reinstate(self) -> None:
        """Back in place after IPython's wrapper unregistered every handler (a previous one raised)."""
        if self._installed and self.shell.CustomTB is not self._our_handler:
            self.shell.custom_exceptions = self._our_exc
            self.shell.CustomTB = self._our_handler

    # ---- per cell: O(1), the only cost a cell that does not fail pays ---------------------------

    def _pre_run_cell(self, info: Any) -> None:
        self._cell_source = getattr(info, "raw_cell", "") or ""
        self._mark = NamespaceMark.take(self.shell.user_ns)
        self._cell_count = getattr(self.shell, "execution_count", None)
        self._cell_id = current_cell_id(self.shell) if getattr(self.shell, "kernel", None) else None
        # a few KiB: the generators as this cell finds them, so a re-run starts from the same
        try:
            self._cell_rng = read_rng()
        except Exception:
            self._cell_rng = None
        self._cell_held = _held_now()
        last = getattr(sys, "last_value", None)
        self._last_seen = None if last is None else id(last)
        # a scan of the cell's words when it names no model; else host copies of its models'
        # BatchNorm statistics (ResNet-50: 0.2 MiB) and which parameters had no .grad
        try:
            self._cell_before = before_cell.take(self._cell_source, self.shell.user_ns)
        except Exception:
            self._cell_before = None

    def _post_run_cell(self, result: Any) -> None:
        try:
            self._diagnose_shown_elsewhere()
        except BaseException:
            pass  # never raises out of a post_run_cell callback
        self._cell_before = None  # a failed cell's record went with its FailedCell
        exc = self._pending_release
        if exc is None:
            return
        self._pending_release = None
        # run_code has left its except block: now the exception object can let go of its frames
        err = getattr(result, "error_in_exec", None)
        if err is not None and err.__traceback__ is not None:
            from jupyter_gpumem.readings.release import detached_copy

            result.error_in_exec = detached_copy(err)
        exc.__traceback__ = None

    def _diagnose_shown_elsewhere(self) -> None:
        """An OOM that IPython showed itself, not through the handler: ``%run script.py`` (and
        other magics that catch an error and call ``showtraceback``). The traceback is on
        screen; the diagnosis follows it, and what the failed frames pinned is freed."""
        value = getattr(sys, "last_value", None)
        # the same id is the same error: sys.last_value held it from then to now
        if value is None or id(value) == self._last_seen or value is self._handled:
            return
        self._handled = value
        found = find_oom(value)
        if found is None:
            return
        oom = found[0]
        tb = getattr(sys, "last_traceback", None)
        frames = tb if oom is value else through(tb, oom.__traceback__)
        try:
            failed = self.diagnose_failure(oom, found[1], frames, outer=value)
        finally:
            del frames, tb
        self.last_failure = failed
        if self.present is not None:
            self.present(failed)

    # ---- the handler --------------------------------------------------------------------------

    def _show_traceback(
        self, etype: type[BaseException], value: BaseException, tb: Any, tb_offset: int | None
    ) -> None:
        """IPython's own traceback, with less context per frame and library frames folded."""
        shell = self.shell
        if any(_GROUP is not None and isinstance(e, _GROUP) for e in walk_chain(value)):
            # IPython prints groups with the traceback module; so do we
            shell.showtraceback((etype, value, tb), tb_offset=tb_offset, running_compiled_code=True)
            return
        # what IPython's showtraceback records, so %debug and %tb get every frame
        sys.last_type, sys.last_value, sys.last_traceback = etype, value, tb
        if sys.version_info >= (3, 12):
            sys.last_exc = value
        tb = active().user_traceback(tb)
        itb = shell.InteractiveTB
        context = int(self.settings.traceback_context)
        params = inspect.signature(itb.structured_traceback).parameters
        kw = "context" if "context" in params else "number_of_lines_of_context"
        try:
            stb = itb.structured_traceback(etype, value, tb, tb_offset=tb_offset, **{kw: context})
        except Exception:
            stb = itb.structured_traceback(etype, value, tb, tb_offset=tb_offset)
        note = " (%tb shows them)" if self.settings.keep_traceback else ""
        shell._showtraceback(etype, value, fold_library_frames(stb, note))

    def _show_as_ipython(
        self, etype: type[BaseException], value: BaseException, tb: Any, tb_offset: int | None
    ) -> None:
        """What IPython does with an error when no custom handler claims it.

        The handler is called from two places: ``run_code`` (the cell ran) and ``run_cell_async``
        (the cell did not compile), where IPython shows a syntax error without frames.
        """
        shell = self.shell
        ran = tb is not None and tb.tb_frame.f_code.co_name == "run_code"
        if ran:
            shell.showtraceback((etype, value, tb), tb_offset=tb_offset, running_compiled_code=True)
        elif isinstance(value, IndentationError):
            shell.showindentationerror()
        elif isinstance(value, (OverflowError, SyntaxError, ValueError, TypeError, MemoryError)):
            shell.showsyntaxerror()
        else:
            shell.showtraceback((etype, value, tb), tb_offset=tb_offset)

    def _claimed_before(self, value: BaseException) -> bool:
        return bool(self._prev_exc) and isinstance(value, self._prev_exc)

    def _call_previous(
        self, etype: type[BaseException], value: BaseException, tb: Any, tb_offset: int | None
    ) -> Any:
        """The handler that claimed this error before us; one line if it raises."""
        try:
            if self._prev_raw is not None:
                return self._prev_raw(self.shell, etype, value, tb, tb_offset=tb_offset)
            return self._prev_handler(etype, value, tb, tb_offset)
        except BaseException as exc:
            print(
                f"jupyter_gpumem: the exception handler registered before it failed "
                f"({type(exc).__name__}: {exc}).",
                file=sys.stderr,
            )
            return None
        finally:
            self._reinstate()

    def handle(
        self,
        etype: type[BaseException],
        value: BaseException,
        tb: TracebackType | None,
        tb_offset: int | None = None,
    ) -> Any:
        # BaseException throughout: IPython drops a custom handler that raises (Ctrl-C included),
        # and the hook must stay installed for the rest of the session
        self._handled = value
        try:
            found = find_oom(value)
        except BaseException:
            found = None
        if found is None:
            if self._claimed_before(value):
                return self._call_previous(etype, value, tb, tb_offset)
            try:
                self._show_as_ipython(etype, value, tb, tb_offset)
            except BaseException:
                self._fallback_traceback(etype, value, tb, tb_offset)
            return None
        try:
            self._show_traceback(etype, value, tb, tb_offset)
        except BaseException:
            self._fallback_traceback(etype, value, tb, tb_offset)
        failed = None
        try:
            oom = found[0]
            frames = tb if oom is value else through(tb, oom.__traceback__)
            failed = self.diagnose_failure(oom, found[1], frames, outer=value)
            del frames
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
        if self._claimed_before(value):
            # an error reporter registered before us still hears of the OOM, after the diagnosis
            self._call_previous(etype, value, tb, tb_offset)
        return None

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
        self,
        value: BaseException,
        report: OOMReport,
        tb: TracebackType | None,
        outer: BaseException | None = None,
    ) -> FailedCell:
        """``value`` is the OOM, ``tb`` its frames from the cell down; ``outer`` the error the
        cell raised (the same, unless the OOM came wrapped), whose whole chain is released."""
        raised = value if outer is None else outer
        failed = build_failure(
            self.shell,
            value,
            report,
            tb,
            source=self._cell_source,
            preexisting=self._mark.preexisting(self.shell.user_ns),
            release=None if self.settings.keep_traceback else lambda _oom: self._release(raised),
            rng=self._cell_rng,
            execution_count=self._cell_count,
            held_at_start=self._cell_held,
        )
        failed.cell_id = self._cell_id
        failed.before = before_cell.sealed(self._cell_before)
        return failed

    def _release(self, value: BaseException) -> ReleaseResult:
        self._pending_release = value
        result = release_failed_cell(self.shell, value, backend=active())
        if result.frames_kept:
            # the frames stay for %debug (IPython 9 reads sys.last_value.__traceback__); they
            # hold no GPU memory now
            self._pending_release = None
        return result


def _held_now() -> tuple[int, int] | None:
    """(current device, bytes allocated on it) when torch is in use; one counter read."""
    from jupyter_gpumem.backends.torch_objects import torch_module

    if torch_module() is None:
        return None
    try:
        backend = active()
        stats = backend.allocator_stats(None)
        if not stats:
            return None
        return backend.current_device(), int(stats.get("allocated_bytes.all.current", 0))
    except Exception:
        return None

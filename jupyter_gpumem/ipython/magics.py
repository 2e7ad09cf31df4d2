"""``%gpumem``: status, simulate, limit, release and help."""

from __future__ import annotations

import argparse
import ast
import os
import sys
from typing import Any, Protocol

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from jupyter_gpumem import backends
from jupyter_gpumem.backends import active
from jupyter_gpumem.cells.failure import FailedCell
from jupyter_gpumem.diagnosis.render import render_snapshot_text
from jupyter_gpumem.fixes import FIXES, FixOutcome
from jupyter_gpumem.fixes.ask import question_in_a_cell
from jupyter_gpumem.fixes.ladder import Options, apply_fix, run_ladder, run_reported
from jupyter_gpumem.ipython.cellstats import CellStats
from jupyter_gpumem.ipython.hook import OOMHook
from jupyter_gpumem.ipython.magic_args import (
    GPUMEM_PARSER,
    OOMSAFE_PARSER,
    doc,
    full_help,
    parse_gpumem,
    parse_oomsafe,
)
from jupyter_gpumem.readings.release import release_failed_cell
from jupyter_gpumem.readings.snapshot import read_snapshot
from jupyter_gpumem.units import format_bytes


class Host(Protocol):
    """What the magics use of the extension loaded in their shell (``ipython/extension.py``):
    its hook, its state, and how it shows things."""

    hook: OOMHook
    remembered: dict[str, int]  # cell hash -> batch size that fit
    simulation: Any  # the simulated GPU `%gpumem simulate` started
    limited: Any  # the backend `%gpumem limit` capped

    def cell_stats(self) -> CellStats: ...

    def widgets_available(self) -> bool: ...

    def show_gauge(self) -> Any: ...

    def open_sidebar(self) -> str: ...

    def close_sidebar(self) -> bool: ...

    def present(self, failed: FailedCell) -> None: ...

    def report_outcome(self, outcome: FixOutcome, failed: FailedCell | None = None) -> None: ...


@magics_class
class GpuMemMagics(Magics):
    def __init__(self, shell: Any, ext: Host) -> None:
        super().__init__(shell)
        self.ext = ext

    @line_magic
    def gpumem(self, line: str = "") -> None:
        __tracebackhide__ = True  # a Ctrl-C during a fix: IPython's line, none of our frames
        parsed = parse_gpumem(line)
        if isinstance(parsed, str):
            print(parsed)
            return
        getattr(self, f"_cmd_{parsed.command}")(parsed)

    gpumem.__doc__ = doc(GPUMEM_PARSER, "Show and control GPU memory from a notebook.")

    def _cmd_help(self, opts: argparse.Namespace) -> None:
        print(full_help())

    def _cmd_status(self, opts: argparse.Namespace) -> None:
        last = self.ext.hook.last_failure
        marked = last.report.device_index if last is not None else None
        print(render_snapshot_text(read_snapshot(), marked=marked))

    def _cmd_cells(self, opts: argparse.Namespace) -> None:
        if opts.switch == "off" and opts.quiet:
            raise UsageError("%gpumem cells off takes no --quiet")
        stats = self.ext.cell_stats()
        if opts.switch == "off":
            stats.stop()
            print("Per-cell GPU memory off (`%gpumem history` keeps what was recorded).")
            return
        stats.start(quiet=opts.quiet)
        print(
            "Per-cell GPU memory on: one line after each cell (its change, peak and time); "
            "`%gpumem history` for the table. It resets PyTorch's peak counter before each cell."
        )

    def _cmd_history(self, opts: argparse.Namespace) -> None:
        print(self.ext.cell_stats().table())

    def _cmd_trace(self, opts: argparse.Namespace) -> None:
        from jupyter_gpumem.readings import trace

        if opts.action != "save" and opts.path is not None:
            raise UsageError(f"%gpumem trace {opts.action} takes no path (only save does)")
        if opts.action != "on" and opts.no_modules:
            raise UsageError("%gpumem trace: --no-modules goes with on")
        if opts.action == "on":
            self._needs_torch("trace on")
            trace.start(modules=not opts.no_modules, shell=self.shell)
            print(
                "Tracing allocations: an OOM now says which lines of your cells hold the memory; "
                "`%gpumem trace save` writes a snapshot for pytorch.org/memory_viz. It slows each "
                "allocation a little; `%gpumem trace off` ends it."
            )
        elif opts.action == "off":
            was = trace.active()
            trace.stop()
            print("Tracing off." if was else "Tracing was not on.")
        else:
            if not trace.active():
                raise UsageError("%gpumem trace save: tracing is off (`%gpumem trace on` first)")
            target = opts.path or "gpumem_snapshot.pickle"
            try:
                path = trace.save_snapshot(target, shell=self.shell)
            except OSError as exc:
                raise UsageError(
                    f"%gpumem trace save: cannot write {target}: {exc.strerror or exc}"
                ) from None
            print(f"Saved {path}: open it at https://pytorch.org/memory_viz (nothing is uploaded).")

    def _cmd_shutdown(self, opts: argparse.Namespace) -> None:
        from jupyter_gpumem.readings.kernels import find_kernel, shutdown

        pid = opts.pid
        if pid == os.getpid():
            raise UsageError("%gpumem shutdown: that is this kernel")
        info = find_kernel(pid)
        if info is None:
            raise UsageError(f"%gpumem shutdown: pid {pid} is not a Jupyter kernel seen from here")
        if not info.notebook:
            raise UsageError(f"%gpumem shutdown: pid {pid} is {info.describe()}")
        if not opts.yes:
            print(
                f"This would shut down {info.describe()}: its variables are lost. "
                f"To confirm: %gpumem shutdown {pid} --yes"
            )
            return
        try:
            shutdown(info)
        except Exception as exc:
            raise UsageError(f"%gpumem shutdown: {type(exc).__name__}: {exc}") from None
        print(f"Shut down {info.describe()}.")

    def _needs_torch(self, command: str) -> None:
        import importlib.util

        if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
            raise UsageError(f"%gpumem {command} needs PyTorch: pip install torch")

    def _needs_widgets(self, command: str) -> None:
        if not self.ext.widgets_available():
            raise UsageError(
                f"%gpumem {command} needs Jupyter with ipywidgets (this is a terminal): "
                "use %gpumem status"
            )

    def _cmd_gauge(self, opts: argparse.Namespace) -> None:
        self._needs_widgets("gauge")
        self.ext.show_gauge()

    def _cmd_sidebar(self, opts: argparse.Namespace) -> None:
        if opts.off:
            closed = self.ext.close_sidebar()
            print("Sidebar gauge closed." if closed else "No sidebar gauge was open.")
            return
        self._needs_widgets("sidebar")
        print(self.ext.open_sidebar())

    def _cmd_simulate(self, opts: argparse.Namespace) -> None:
        card, asked = opts.card, opts.devices
        if card is None and asked is not None:
            raise UsageError("%gpumem simulate off takes no --devices")
        devices = asked or 1
        if card is None:
            was = backends.simulation()
            backends.stop_simulation()
            self.ext.simulation = None
            print("Simulated GPU off." if was else "No simulated GPU was running.")
            return
        self._needs_torch("simulate")
        try:
            if isinstance(card, str):
                sim = backends.simulate(None, profile=card, devices=devices)
            else:
                sim = backends.simulate(card, devices=devices)
        except ValueError as exc:  # a bad PYTORCH_CUDA_ALLOC_CONF, cudaMallocAsync: torch's words
            raise UsageError(f"%gpumem simulate: {exc}") from None
        self.ext.simulation = sim
        cards = (
            f"{devices} simulated GPUs of {format_bytes(sim.total_bytes)} each (cuda:0 to "
            f"cuda:{devices - 1})"
            if devices > 1
            else f"Simulated GPU of {format_bytes(sim.total_bytes)}"
        )
        print(
            f"{cards}: cells that place tensors on `cuda` now run on the CPU and count against "
            "it. `%gpumem simulate off` ends it."
        )

    def _cmd_limit(self, opts: argparse.Namespace) -> None:
        size, device = opts.size, opts.device
        backend = active()
        try:
            total = backend.set_limit(size, device)
            count = len(backend.visible_devices())
        except RuntimeError as exc:
            raise UsageError(f"%gpumem limit: {exc}") from None
        if size is not None:
            self.ext.limited = backend  # lifted on every device when the extension unloads
        elif device is None:
            self.ext.limited = None
        where = (
            f" on GPU {device}" if device is not None
            else f" on each of the {count} GPUs" if count > 1
            else ""
        )  # fmt: skip
        if size is None:
            print(f"No cap{where}: this process may use the whole {format_bytes(total)}.")
        else:
            print(
                f"This process may now use {format_bytes(min(size, total))} of "
                f"{format_bytes(total)}{where} (a rehearsal of a smaller card). "
                "`%gpumem limit off` lifts it."
            )

    def _cmd_release(self, opts: argparse.Namespace) -> None:
        exc = getattr(sys, "last_value", None)
        result = release_failed_cell(self.shell, exc)
        if self.ext.hook.last_failure is not None:
            self.ext.hook.last_failure.release = result
        if result.freed_bytes is None:
            print("Released the last failure's frames (no GPU reading to measure what was freed).")
        else:
            print(
                f"Freed {format_bytes(result.freed_bytes)}; PyTorch now has "
                f"{format_bytes(result.allocated_after_bytes)} allocated."
            )

    def _cmd_retry(self, opts: argparse.Namespace) -> None:
        __tracebackhide__ = True
        failed = self.ext.hook.last_failure
        if failed is None:
            raise UsageError("%gpumem retry: no cell has run out of memory yet")
        options = Options(
            batch_var=opts.batch_var,
            min_batch=opts.min_batch,
            max_runs=opts.max_retries,
            force=opts.force,
            drop=tuple(opts.drop or ()),
            drop_output_cache=opts.drop_output_cache,
            accumulate=opts.accumulate,
        )
        fix = FIXES[opts.fix]
        asked = question_in_a_cell(self.shell, failed, failed.fixed_by)
        if asked is not None and not opts.force:
            print(f"{asked} `%gpumem retry {opts.fix} --force` re-runs it anyway.")
            return
        outcome = run_reported(
            self.shell,
            fix.label,
            lambda: apply_fix(
                self.shell,
                failed,
                opts.fix,
                options,
                self.ext.remembered,
                on_attempt=lambda a: print("  " + a.line()),
            ),
            say=lambda text: print(text, file=sys.stderr),
        )
        if outcome is None:
            return
        self.ext.report_outcome(outcome, failed)

    @cell_magic
    def oomsafe(self, line: str, cell: str) -> None:
        __tracebackhide__ = True
        parsed = parse_oomsafe(line)
        if isinstance(parsed, str):
            print(parsed)
            return
        opts, fixes = parsed, parsed.fixes
        try:  # a body that does not parse is the user's typo: one line, nothing run
            compile(
                self.shell.transform_cell(cell),  # type: ignore[union-attr]
                "<%%oomsafe>",
                "exec",
                flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
                dont_inherit=True,
            )
        except SyntaxError as exc:
            raise UsageError(
                f"%%oomsafe: the cell does not parse: {exc.msg} (line {exc.lineno}); nothing ran"
            ) from None
        result = run_reported(
            self.shell,
            "a fix",
            lambda: run_ladder(
                self.shell,
                cell,
                fixes=fixes,
                options=Options(
                    batch_var=opts.batch_var,
                    min_batch=opts.min_batch,
                    max_runs=opts.max_retries,
                    force=opts.force,
                ),
                remembered=self.ext.remembered,
                say=print,
                quiet=opts.quiet,
            ),
            say=lambda text: print(f"oomsafe: {text}", file=sys.stderr),
        )
        if result is None:
            return
        if not result.ok and result.failure is not None:
            self.ext.hook.last_failure = result.failure
            if result.refused is None:
                self.ext.present(result.failure)

    oomsafe.__doc__ = doc(OOMSAFE_PARSER, "Run the cell; on out-of-memory, apply fixes in order.")

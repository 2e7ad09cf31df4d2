"""The hook in a real IPython InteractiveShell, on the simulated GPU."""

from __future__ import annotations

import re
import sys
from typing import Any

import pytest
from IPython.core.error import UsageError

import jupyter_gpumem
from jupyter_gpumem.cells import failure as failure_mod
from jupyter_gpumem.units import MiB
from tests.conftest import extension

OOM_CELL = """\
import torch
def work():
    held = torch.empty(300 * 2**20, dtype=torch.uint8, device="cuda")
    more = torch.empty(900 * 2**20, dtype=torch.uint8, device="cuda")
    return held, more
work()
"""


@pytest.mark.slow
def test_oom_cell_gets_traceback_then_diagnosis_with_the_messages_numbers(
    shell: Any, run: Any
) -> None:
    shell.run_cell("%gpumem simulate 1GiB")
    seen = run(shell, OOM_CELL, store_history=False)
    result, out = seen.result, seen.out
    assert type(result.error_in_exec).__name__ == "OutOfMemoryError"
    tb_at = out.index("OutOfMemoryError")
    diag_at = out.index("GPU out of memory: Tried to allocate")
    assert tb_at < diag_at, "IPython's traceback comes first, then the diagnosis"
    msg = str(result.error_in_exec)
    requested = re.search(r"Tried to allocate (\S+ \S+)\.", msg).group(1)
    free = re.search(r"of which (\S+ \S+) is free", msg).group(1)
    assert f"Tried to allocate {requested}" in out.replace("900 MiB", "900.00 MiB")
    failed = jupyter_gpumem.last_failure(shell)
    d = failed.diagnosis
    assert d.requested_bytes == 900 * MiB
    assert d.total_bytes == 1024 * MiB
    assert free.startswith(f"{d.free_bytes / MiB:.2f}")
    assert d.allocated_bytes == 300 * MiB
    # the local `held` was pinned by the failure; the diagnosis names it and it was freed
    assert any(h.name == "held in work()" and h.where == "failed frame" for h in d.holders.holders)
    assert d.freed_bytes == 300 * MiB
    assert "Freed 300 MiB that the failed cell pinned" in out
    assert failed.failed_lineno == 6


def test_memory_the_failed_frames_held_is_free_in_the_next_cell(shell: Any, capsys: Any) -> None:
    shell.run_cell("%gpumem simulate 1GiB")
    shell.run_cell(
        "import torch; keep = torch.empty(100 * 2**20, dtype=torch.uint8, device='cuda')"
    )
    before = shell.run_cell("torch.cuda.memory_allocated()").result
    shell.run_cell(OOM_CELL)
    after = shell.run_cell("torch.cuda.memory_allocated()").result
    assert before == after == 100 * MiB


def test_release_frees_a_function_held_tensor(shell: Any) -> None:
    shell.run_cell("%gpumem simulate 1GiB")
    shell.run_cell(
        "import torch, weakref\n"
        "refs = []\n"
        "def f():\n"
        "    x = torch.empty(200 * 2**20, dtype=torch.uint8, device='cuda')\n"
        "    refs.append(weakref.ref(x))\n"
        "    y = torch.empty(2 * 2**30, dtype=torch.uint8, device='cuda')\n"
        "f()\n"
    )
    ref = shell.user_ns["refs"][0]
    assert ref() is None, "the failed frame's tensor must be gone after the OOM"
    # the frame stays for %debug, holding a host copy in its place
    tb = sys.last_traceback
    while tb.tb_frame.f_code.co_name != "f":
        tb = tb.tb_next
    assert tuple(tb.tb_frame.f_locals["x"].shape) == (200 * 2**20,)


def test_without_release_the_frame_keeps_the_tensor(shell: Any) -> None:
    """The same cell with keep_traceback on: the tensor stays (what the extension fixes)."""
    shell.run_cell("%config GpuMem.keep_traceback = True")
    shell.run_cell("%gpumem simulate 1GiB")
    shell.run_cell(
        "import torch, weakref\n"
        "refs = []\n"
        "def f():\n"
        "    x = torch.empty(200 * 2**20, dtype=torch.uint8, device='cuda')\n"
        "    refs.append(weakref.ref(x))\n"
        "    y = torch.empty(2 * 2**30, dtype=torch.uint8, device='cuda')\n"
        "f()\n"
    )
    assert shell.user_ns["refs"][0]() is not None
    assert sys.last_traceback is not None, "%debug still has the frames"
    shell.run_cell("%gpumem release")
    assert shell.user_ns["refs"][0]() is None


def test_globals_the_cell_created_stay(shell: Any) -> None:
    shell.run_cell("%gpumem simulate 1GiB")
    shell.run_cell(
        "import torch\n"
        "big = torch.empty(200 * 2**20, dtype=torch.uint8, device='cuda')\n"
        "huge = torch.empty(2 * 2**30, dtype=torch.uint8, device='cuda')\n"
    )
    assert shell.user_ns["big"].numel() == 200 * MiB
    d = jupyter_gpumem.last_failure(shell).diagnosis
    assert d.holders.holders[0].name == "big"
    assert d.causes[0].key == "request_exceeds_card"


@pytest.mark.parametrize(
    "code",
    [
        "1/0",
        "raise RuntimeError('not an OOM')",
        "def g():\n    raise KeyError('x')\ng()",
        "raise MemoryError()",
        "raise ValueError('bad value')",
        "d = {}\nd['missing']",
        "assert 1 == 2, 'not equal'",
        "exec('1 +')",
        "1 +",
        "if True:\n x = 1\n  y = 2",
        "raise KeyboardInterrupt",
        "raise ValueError('outer') from KeyError('inner')",
        "raise ExceptionGroup('tasks', [ValueError('a'), KeyError('b')])",
        "import sys\nsys.exit(3)",
    ],
)
def test_other_errors_look_exactly_as_without_the_extension(
    bare_shell: Any, run: Any, code: str
) -> None:
    without = run(bare_shell, code, store_history=False).text
    bare_shell.run_cell("%load_ext jupyter_gpumem")
    try:
        with_ext = run(bare_shell, code, store_history=False).text
    finally:
        bare_shell.run_cell("%unload_ext jupyter_gpumem")
    # execution counts differ between the two runs; nothing else may
    norm = re.compile(r"In\[\d+\]|line \d+")
    assert norm.sub("", with_ext) == norm.sub("", without)
    assert "GPU out of memory" not in with_ext


def test_a_failing_diagnosis_still_shows_the_traceback(
    shell: Any, capsys: Any, monkeypatch: Any
) -> None:
    # fault injection: the one place a stand-in is used, to make our own code fail
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("injected")

    monkeypatch.setattr(failure_mod, "diagnose", broken)
    shell.run_cell("%gpumem simulate 1GiB")
    capsys.readouterr()
    shell.run_cell(OOM_CELL)
    cap = capsys.readouterr()
    assert "OutOfMemoryError" in cap.out
    lines = [ln for ln in cap.err.splitlines() if "jupyter_gpumem" in ln]
    assert lines == [
        "jupyter_gpumem: could not build the diagnosis (ValueError: injected); "
        "the traceback above is the original error."
    ]
    assert shell.CustomTB == extension(shell).hook._our_handler, "the handler is still registered"
    monkeypatch.undo()
    capsys.readouterr()
    shell.run_cell(OOM_CELL)
    assert "GPU out of memory" in capsys.readouterr().out


def _count(shell: Any) -> tuple[int, int, int]:
    handlers = shell.custom_exceptions.count(Exception)
    pre = sum(1 for cb in shell.events.callbacks["pre_run_cell"] if "OOMHook" in repr(cb))
    magics = 1 if "gpumem" in shell.magics_manager.magics["line"] else 0
    return handlers, pre, magics


def test_load_twice_unload_and_reload_leave_one_of_everything(bare_shell: Any) -> None:
    sh = bare_shell
    sh.run_cell("%load_ext jupyter_gpumem")
    sh.run_cell("%load_ext jupyter_gpumem")
    assert _count(sh) == (1, 1, 1)
    sh.run_cell("%reload_ext jupyter_gpumem")
    assert _count(sh) == (1, 1, 1)
    sh.run_cell("%reload_ext jupyter_gpumem")
    assert _count(sh) == (1, 1, 1)
    sh.run_cell("%unload_ext jupyter_gpumem")
    assert _count(sh) == (0, 0, 0)
    assert sh.custom_exceptions == ()


def test_unload_restores_the_very_handler_that_was_there(bare_shell: Any) -> None:
    before = (bare_shell.custom_exceptions, bare_shell.CustomTB)
    bare_shell.run_cell("%load_ext jupyter_gpumem")
    bare_shell.run_cell("%unload_ext jupyter_gpumem")
    assert bare_shell.custom_exceptions is before[0] and bare_shell.CustomTB is before[1]


def test_chains_to_the_previous_handler_and_restores_it(bare_shell: Any, capsys: Any) -> None:
    sh = bare_shell
    seen: list[str] = []

    def previous(self: Any, etype: Any, value: Any, tb: Any, tb_offset: Any = None) -> None:
        seen.append(str(value))

    sh.set_custom_exc((ValueError,), previous)
    sh.run_cell("%load_ext jupyter_gpumem")
    sh.run_cell("raise ValueError('mine')")
    assert seen == ["mine"]
    sh.run_cell("%unload_ext jupyter_gpumem")
    assert sh.custom_exceptions == (ValueError,)
    sh.run_cell("raise ValueError('again')")
    assert seen == ["mine", "again"]


def test_html_escapes_what_the_user_controls(shell: Any) -> None:
    shell.run_cell("%gpumem simulate 1GiB")
    shell.run_cell(
        "import torch\nraise torch.OutOfMemoryError('<script>alert(1)</script> out of memory')"
    )
    d = jupyter_gpumem.last_failure(shell).diagnosis
    html = jupyter_gpumem.render_html(d)
    assert "<script>alert" not in html
    assert "&lt;script&gt;" in html


def test_magic_usage_errors_are_one_line_usage_errors(shell: Any) -> None:
    magic = shell.magics_manager.magics["line"]["gpumem"]
    for bad in ("bogus", "simulate", "simulate 2XB", "simulate 1GiB 2GiB", "status now", "limit"):
        with pytest.raises(UsageError) as info:
            magic(bad)
        assert "\n" not in str(info.value), bad


def test_status_and_simulate_off(shell: Any, capsys: Any, run: Any) -> None:
    shell.run_cell("%gpumem simulate 2GiB")
    shell.run_cell("import torch; x = torch.zeros(2**20, device='cuda')")
    out = run(shell, "%gpumem", store_history=False).out
    assert "Simulated GPU" in out and "4.00 MiB allocated" in out and "of 2.00 GiB" in out
    shell.run_cell("%gpumem simulate off")
    assert "Simulated GPU off." in capsys.readouterr().out


def test_a_cell_that_does_not_fail_is_untouched(shell: Any, capsys: Any) -> None:
    result = shell.run_cell("1 + 1")
    assert result.result == 2 and result.success
    assert "gpumem" not in capsys.readouterr().out


def test_namespace_mark_finds_the_names_that_existed() -> None:
    ns: dict[str, Any] = {"a": 1, "b": 2}
    mark = failure_mod.NamespaceMark.take(ns)
    ns["c"] = 3
    ns["a"] = 4
    assert mark.preexisting(ns) == {"a", "b"}
    del ns["a"]  # a name before the mark deleted by the cell
    assert mark.preexisting(ns) == {"b"}


@pytest.mark.slow
def test_simulated_gpu_frames_are_not_in_the_traceback_shown(shell: Any, run: Any) -> None:
    shell.run_cell("%gpumem simulate 1GiB")
    shell.run_cell("import torch\nlin = torch.nn.Linear(1024, 1024).cuda()")
    out = run(shell, "y = lin(torch.randn(200000, 1024, device='cuda'))", store_history=False).out
    assert "OutOfMemoryError" in out and "Linear.forward" in out
    assert "jupyter_gpumem/backends" not in out and "_python_dispatch" not in out
    # %debug still gets the real traceback, frames included
    assert sys.last_traceback is None or sys.last_traceback.tb_frame is not None


# --- an OOM that arrives wrapped ---------------------------------------------------------------

HELD = """\
import torch, weakref
refs = []
def hold():
    held = torch.empty(300 * 2**20, dtype=torch.uint8, device="cuda")
    refs.append(weakref.ref(held))
    torch.empty(900 * 2**20, dtype=torch.uint8, device="cuda")
"""

WRAPPED = {
    "raise from": HELD
    + "try:\n    hold()\nexcept torch.OutOfMemoryError as oom:\n"
    + "    raise ValueError('loader failed') from oom\n",
    "group": HELD
    + "errors = []\ntry:\n    hold()\nexcept Exception as e:\n    errors.append(e)\n"
    + "raise ExceptionGroup('tasks failed', errors)\n",
    "context below a cause": HELD
    + "try:\n    hold()\nexcept torch.OutOfMemoryError:\n"
    + "    raise RuntimeError('step failed') from ValueError('bad batch')\n",
    "raised in a function": HELD.replace(
        '    torch.empty(900 * 2**20, dtype=torch.uint8, device="cuda")\n',
        "    try:\n"
        '        torch.empty(900 * 2**20, dtype=torch.uint8, device="cuda")\n'
        "    except torch.OutOfMemoryError as oom:\n"
        "        raise ValueError('loader failed') from oom\n",
    )
    + "hold()\n",
}


@pytest.mark.parametrize("case", sorted(WRAPPED))
def test_a_wrapped_oom_is_diagnosed_and_freed(shell: Any, capsys: Any, case: str) -> None:
    shell.run_cell("%gpumem simulate 1GiB")
    capsys.readouterr()
    result = shell.run_cell(WRAPPED[case])
    out = capsys.readouterr()
    assert not result.success
    assert "GPU out of memory: Tried to allocate" in out.out, out.err[-2000:]
    failed = jupyter_gpumem.last_failure(shell)
    assert failed.diagnosis.requested_bytes == 900 * MiB
    assert any(h.name == "held in hold()" for h in failed.diagnosis.holders.holders)
    assert shell.user_ns["refs"][0]() is None, "the OOM's frames were not freed"
    assert shell.run_cell("torch.cuda.memory_allocated()").result == 0


def test_a_handler_that_was_there_still_sees_every_error_and_the_oom(
    bare_shell: Any, capsys: Any
) -> None:
    sh = bare_shell
    seen: list[str] = []

    def reporter(self: Any, etype: Any, value: Any, tb: Any, tb_offset: Any = None) -> None:
        seen.append(etype.__name__)
        if "explode" in str(value):
            raise LookupError("reporter is down")

    sh.set_custom_exc((RuntimeError,), reporter)
    sh.run_cell("%load_ext jupyter_gpumem")
    try:
        sh.run_cell("%gpumem simulate 1GiB")
        sh.run_cell("raise RuntimeError('not an OOM')")
        assert seen == ["RuntimeError"]
        capsys.readouterr()
        sh.run_cell("1/0")  # not the reporter's: IPython's traceback
        assert seen == ["RuntimeError"] and "ZeroDivisionError" in capsys.readouterr().out
        sh.run_cell(OOM_CELL)
        out = capsys.readouterr().out
        assert seen == ["RuntimeError", "OutOfMemoryError"]
        assert "GPU out of memory: Tried to allocate" in out
        assert out.index("GPU out of memory") > out.index("OutOfMemoryError")
        sh.run_cell("raise RuntimeError('explode')")
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert lines == [
            "jupyter_gpumem: the exception handler registered before it failed "
            "(LookupError: reporter is down)."
        ]
        sh.run_cell(OOM_CELL)
        assert "GPU out of memory" in capsys.readouterr().out, "the hook is still there"
        assert seen[-1] == "OutOfMemoryError"
    finally:
        sh.run_cell("%unload_ext jupyter_gpumem")
    assert sh.custom_exceptions == (RuntimeError,)


# --- the OOM's traceback: the user's frames, library frames folded ----------------------------


@pytest.mark.slow
def test_library_frames_are_folded_and_the_full_traceback_stays_for_tb(
    shell: Any, run: Any
) -> None:
    shell.run_cell("%config GpuMem.keep_traceback = True")
    shell.run_cell("%gpumem simulate 1GiB")
    shell.run_cell(
        "import torch\n"
        "net = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(1024, 1024))).cuda()\n"
        "def run(x):\n    return net(x)\n"
    )
    out = run(shell, "y = run(torch.randn(200000, 1024, device='cuda'))", store_history=False).out
    shown = out[: out.index("GPU out of memory")]
    assert "in run(x)" in shown and "y = run(" in shown, "the user's frames"
    assert "Linear.forward" in shown, "the call that failed"
    assert "_call_impl" not in shown and "Sequential.forward" not in shown
    assert "... 8 frames in torch (%tb shows them) ..." in shown
    assert len(shown.splitlines()) < 25
    full = run(shell, "%tb", store_history=False).out
    assert full.count("_call_impl") >= 6 and "Sequential.forward" in full


def test_fold_keeps_user_frames_and_the_innermost() -> None:
    from jupyter_gpumem.ipython.tracebacks import fold_library_frames, library_of

    site = "/env/lib/python3.11/site-packages"
    stb = [
        "-----",
        "OutOfMemoryError    Traceback (most recent call last)",
        "Cell In[3], line 1\n----> 1 run()\n",
        f"File {site}/torch/nn/modules/module.py:1778, in Module._wrapped_call_impl(self)\n",
        f"File {site}/torch/nn/modules/module.py:1789, in Module._call_impl(self)\n",
        f"File {site}/accelerate/hooks.py:170, in new_forward(module)\n",
        "File ~/project/model.py:12, in Block.forward(self, x)\n",
        f"File {site}/torch/nn/modules/module.py:1778, in Module._wrapped_call_impl(self)\n",
        f"File {site}/torch/nn/functional.py:2000, in linear(input)\n",
        "OutOfMemoryError: CUDA out of memory.",
    ]
    assert library_of(stb[3]) == "torch" and library_of(stb[6]) is None
    assert library_of("\x1b[32mFile \x1b[0m/usr/x/site-packages/six.py:1, in f()") == "six"
    assert fold_library_frames(stb) == [
        *stb[:3],
        "... 3 frames in torch, accelerate ...\n",
        stb[6],
        stb[7],  # one library frame alone is not folded
        stb[8],  # the innermost frame stays
        stb[9],
    ]


def test_torch_frames_before_a_notebook_class_forward_are_folded() -> None:
    """The quickstart's traceback: the cell, torch's two call frames, then the notebook's own
    ``forward`` (a "Cell In[..]" frame, not a "File" one): the two torch frames fold."""
    from jupyter_gpumem.ipython.tracebacks import fold_library_frames

    site = "/env/lib/python3.11/site-packages"
    stb = [
        "Cell In[4], line 3\n----> 3 logits = model(x)\n",
        f"File {site}/torch/nn/modules/module.py:1778, in Module._wrapped_call_impl(self)\n",
        f"File {site}/torch/nn/modules/module.py:1789, in Module._call_impl(self)\n",
        "Cell In[1], line 13, in Classifier.forward(self, x)\n---> 13 h = self.enc(x)\n",
        "OutOfMemoryError: CUDA out of memory.",
    ]
    assert fold_library_frames(stb) == [
        stb[0],
        "... 2 frames in torch ...\n",
        stb[3],
        stb[4],
    ]


def test_a_fix_that_saves_less_than_the_shortfall_says_not_enough() -> None:
    from jupyter_gpumem.fixes.base import Check
    from jupyter_gpumem.ipython.extension import fix_lines

    checks = {
        "clear": Check(True, "free the cache", predicted_saving_bytes=100 * MiB),
        "batch": Check(True, "halve the batch", predicted_saving_bytes=2048 * MiB),
        "autocast": Check(True, "bf16", predicted_saving_bytes=None),
        "cpu": Check(False, "", reason="no model in the cell"),
    }
    clear, batch, autocast, cpu = fix_lines(checks, 500 * MiB)
    assert clear.endswith("(not enough: saves ~100 MiB of 500 MiB needed)")
    assert batch.endswith("(saves ~2.00 GiB)") and "not enough" not in batch
    assert "not enough" not in autocast and "(" not in autocast
    assert cpu.endswith("not available: no model in the cell")
    assert fix_lines(checks, None)[0].endswith("(saves ~100 MiB)")


def test_the_text_diagnosis_marks_fixes_that_are_not_enough(shell: Any, run: Any) -> None:
    shell.run_cell("%config GpuMem.display = 'text'")
    shell.run_cell("%gpumem simulate 1GiB")
    shell.run_cell(
        "import torch\nkeep = torch.empty(100 * 2**20, dtype=torch.uint8, device='cuda')"
    )
    out = run(shell, OOM_CELL, store_history=False).out
    d = jupyter_gpumem.last_failure(shell).diagnosis
    assert d.shortfall_bytes
    assert "%gpumem retry clear" in out
    fixes = out[out.index("%gpumem retry clear") :]
    assert "not enough: saves ~" in fixes, fixes


def test_del_in_a_cell_with_a_magic_frees_the_model_at_once(shell: Any) -> None:
    """`del model` in a cell that also has a line magic: the memory comes back when the cell
    ends, not at the garbage collector's next pass. Was: reading the cell (a SyntaxError kept in a
    local, whose traceback held the frame) kept the hook's record of the cell's models alive, and
    the notebook's next 128 MiB allocation ran out (notebooks/beyond.ipynb)."""
    import gc

    shell.run_cell("%gpumem simulate 512MiB")
    assert shell.run_cell(
        "import torch\nmodel = torch.nn.Linear(4096, 4096, device='cuda')  # 64 MiB"
    ).success
    gc.collect()
    gc.disable()
    try:
        assert shell.run_cell("del model\n%gpumem status").success
        assert shell.run_cell("left = torch.cuda.memory_allocated()").success
    finally:
        gc.enable()
    assert shell.user_ns["left"] < 1 << 20

"""What users type into %gpumem and %%oomsafe, in a real InteractiveShell: every mistake is one
UsageError line, every help is readable."""

from __future__ import annotations

from typing import Any

import pytest

from jupyter_gpumem.backends import simulated
from jupyter_gpumem.fixes.base import MAX_RUNS
from jupyter_gpumem.ipython.magic_args import parse_gpumem, parse_oomsafe


def _one_usage_error(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("UsageError: "), out
    return lines[0]


@pytest.mark.parametrize(
    "cell, says",
    [
        ('%gpumem "unterminated', "No closing quotation"),
        ("%gpumem simulate 'off", "No closing quotation"),
        ('%%oomsafe --fixes "clear\nx = 1', "No closing quotation"),
        ("%gpumem simulate 99999999999999999999999999999999TiB", "at most 16384 GiB"),
        ("%gpumem simulate １GiB", "digits 0-9"),
        ("%gpumem limit ２GiB", "digits 0-9"),
        ("%%oomsafe --fixes clear,teleport\nx = 1", "unknown fix teleport"),
        ("%%oomsafe --fixes ' , '\nx = 1", "unknown fix (none)"),
        ("%gpumem bogus", "unknown command 'bogus'"),
        ("%%oomsafe --max-retries 0\nx = 1", "expected a number >= 1"),
        ("%%oomsafe\nx = (1,\ny = 2", "the cell does not parse: '(' was never closed"),
    ],
)
def test_bad_input_is_one_usage_error_line(shell: Any, run: Any, cell: str, says: str) -> None:
    seen = run(shell, cell)
    result, out = seen.result, seen.text
    assert not result.success
    assert says in _one_usage_error(out)
    assert simulated.current() is None
    assert "x" not in shell.user_ns, "the cell did not run"


@pytest.mark.parametrize("cell", ["%gpumem -h", "%gpumem --help", "%gpumem help"])
def test_help_is_shown_not_refused(shell: Any, run: Any, cell: str) -> None:
    seen = run(shell, cell)
    result, out = seen.result, seen.text
    assert result.success and "UsageError" not in out
    assert "%gpumem [command]" in out and "simulate SIZE|CARD|off" in out
    assert out.count("positional arguments") == 1, "the help once"
    # every command, retry (what every fix prints) included, with its options
    for command in ("status", "retry", "simulate", "limit", "trace", "cells", "shutdown"):
        assert f"%gpumem {command}" in out, command
    assert "--batch-var NAME" in out and "--max-retries N" in out and "--devices N" in out


@pytest.mark.parametrize(
    "cell, says",
    [
        ("%gpumem retry cpu --accumulate", "--accumulate is for `retry batch` only"),
        ("%gpumem retry autocast --min-batch 5", "--min-batch is for `retry batch` only"),
        ("%gpumem retry batch --drop x", "--drop is for `retry clear` only"),
        ("%gpumem retry teleport", "invalid choice: 'teleport'"),
        ("%gpumem simulate 8MiB --devices 2 --devices 3", "given twice"),
        ("%gpumem cells maybe", "invalid choice: 'maybe'"),
        ("%gpumem trace off here.pickle", "takes no path"),
        ("%gpumem status now", "unrecognized arguments: now"),
        ("%%oomsafe --batch-var 1x\nx = 1", "not a variable: '1x'"),
    ],
)
def test_options_that_do_not_apply_are_refused_not_ignored(
    shell: Any, run: Any, cell: str, says: str
) -> None:
    seen = run(shell, cell)
    result, out = seen.result, seen.text
    assert not result.success
    assert says in _one_usage_error(out)
    assert "x" not in shell.user_ns, "the cell did not run"


def test_trace_save_to_a_missing_folder_is_one_line(shell: Any, run: Any, tmp_path: Any) -> None:
    pytest.importorskip("torch")
    run(shell, "%gpumem simulate 64MiB")
    try:
        run(shell, "%gpumem trace on")
        seen = run(shell, f"%gpumem trace save {tmp_path}/no/such/dir/x.pickle")
        result, out = seen.result, seen.text
        assert not result.success
        assert "cannot write" in _one_usage_error(out)
    finally:
        run(shell, "%gpumem trace off")
        run(shell, "%gpumem simulate off")


def test_help_texts_show_each_magic_with_its_own_percent_signs(shell: Any, run: Any) -> None:
    retry = run(shell, "%gpumem retry -h").text
    oomsafe = run(shell, "%%oomsafe --help\nx = 1").text
    assert "\n  %gpumem retry [--batch-var NAME]" in retry and "%%gpumem" not in retry
    assert "\n  %%oomsafe [--fixes LIST]" in oomsafe and "%%%" not in oomsafe
    assert "UsageError" not in retry + oomsafe and "x" not in shell.user_ns


def test_oomsafe_help_from_the_question_mark_lists_its_options(shell: Any, run: Any) -> None:
    out = run(shell, "%%oomsafe?").text
    for option in ("--fixes LIST", "--max-retries N", "--batch-var NAME", "--min-batch N"):
        assert option in out, option
    assert "--force" in out and "--quiet" in out


def test_oomsafe_keeps_its_options_and_defaults() -> None:
    opts = parse_oomsafe("")
    assert not isinstance(opts, str)
    assert (opts.fixes, opts.max_retries, opts.batch_var, opts.min_batch) == (
        ["clear", "batch", "autocast", "cpu"],
        MAX_RUNS,
        None,
        1,
    )
    assert (opts.force, opts.quiet) == (False, False)
    retry = parse_gpumem("retry batch")
    assert not isinstance(retry, str) and retry.max_retries == MAX_RUNS, "one default for both"
    opts = parse_oomsafe("--max-retries 3 --batch-var bs --min-batch 2 --force --quiet")
    assert not isinstance(opts, str)
    assert (opts.max_retries, opts.batch_var, opts.min_batch, opts.force, opts.quiet) == (
        3,
        "bs",
        2,
        True,
        True,
    )


@pytest.mark.parametrize(
    "line", ['--fixes "clear, batch"', "--fixes 'clear, batch'", "--fixes clear,batch"]
)
def test_oomsafe_fixes_may_be_quoted_with_spaces(shell: Any, run: Any, line: str) -> None:
    seen = run(shell, f"%%oomsafe {line}\nx = 41 + 1")
    result, out = seen.result, seen.text
    assert result.success, out
    assert shell.user_ns["x"] == 42


@pytest.mark.parametrize("text", ["１GiB", "٢GiB", "1.５GiB"])
def test_sizes_take_ascii_digits_only_everywhere(text: str) -> None:
    """Not only the magic: `jupyter_gpumem.simulate("１GiB")` refuses it too."""
    from jupyter_gpumem.units import parse_size

    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_simulate_a_card_by_name_and_a_bad_allocator_setting(
    shell: Any, run: Any, monkeypatch: Any
) -> None:
    """`%gpumem simulate T4` is a T4 (its name, its memory outside PyTorch); a setting torch
    would refuse is one UsageError line in torch's words, not a traceback."""
    torch = pytest.importorskip("torch")
    seen = run(shell, "%gpumem simulate t4")
    result, out = seen.result, seen.text
    assert result.success, out
    assert "T4" in torch.cuda.get_device_name(0)
    free, total = torch.cuda.mem_get_info(0)
    assert total - free > 0 == torch.cuda.memory_reserved(0), "the CUDA context is outside PyTorch"
    run(shell, "%gpumem simulate off")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
    seen = run(shell, "%gpumem simulate 1GiB")
    result, out = seen.result, seen.text
    assert not result.success
    assert "cudaMallocAsync" in _one_usage_error(out)
    assert simulated.current() is None


def test_a_batch_var_with_a_subscript_keeps_its_quotes() -> None:
    """``--batch-var dataloaders['train']`` names that entry (was read as ``dataloaders[train]``,
    the shell's quote removal); a path quoted whole still loses its quotes."""
    opts = parse_gpumem("retry batch --batch-var dataloaders['train']")
    assert not isinstance(opts, str) and opts.batch_var == "dataloaders['train']"
    opts = parse_gpumem('trace save "my file.pickle"')
    assert not isinstance(opts, str) and opts.path == "my file.pickle"

"""What users type into %gpumem and %%oomsafe, in a real InteractiveShell: every mistake is one
UsageError line, every help is readable."""

from __future__ import annotations

from typing import Any

import pytest
from IPython.core.magic_arguments import parse_argstring

from jupyter_gpumem.backends import simulated


def _run(shell: Any, capsys: Any, cell: str) -> tuple[Any, str]:
    capsys.readouterr()
    result = shell.run_cell(cell)
    cap = capsys.readouterr()
    return result, cap.out + cap.err


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
        ("%%oomsafe --max-retries 0\nx = 1", "expected a number >= 1"),
    ],
)
def test_bad_input_is_one_usage_error_line(shell: Any, capsys: Any, cell: str, says: str) -> None:
    result, out = _run(shell, capsys, cell)
    assert not result.success
    assert says in _one_usage_error(out)
    assert simulated.current() is None
    assert "x" not in shell.user_ns, "the cell did not run"


@pytest.mark.parametrize("cell", ["%gpumem -h", "%gpumem --help", "%gpumem help"])
def test_help_is_shown_not_refused(shell: Any, capsys: Any, cell: str) -> None:
    result, out = _run(shell, capsys, cell)
    assert result.success and "UsageError" not in out
    assert "%gpumem [command]" in out and "simulate SIZE|off" in out
    assert out.count("positional arguments") == 1, "the help once"


def test_help_texts_show_each_magic_with_its_own_percent_signs(shell: Any, capsys: Any) -> None:
    _, retry = _run(shell, capsys, "%gpumem retry -h")
    _, oomsafe = _run(shell, capsys, "%%oomsafe --help\nx = 1")
    assert "\n  %gpumem retry [--batch-var NAME]" in retry and "%%gpumem" not in retry
    assert "\n  %%oomsafe [--fixes LIST]" in oomsafe and "%%%" not in oomsafe
    assert "UsageError" not in retry + oomsafe and "x" not in shell.user_ns


def test_oomsafe_help_from_the_question_mark_lists_its_options(shell: Any, capsys: Any) -> None:
    _, out = _run(shell, capsys, "%%oomsafe?")
    for option in ("--fixes LIST", "--max-retries N", "--batch-var NAME", "--min-batch N"):
        assert option in out, option
    assert "--force" in out and "--quiet" in out


def test_oomsafe_keeps_its_options_and_defaults(shell: Any) -> None:
    magic = shell.magics_manager.magics["cell"]["oomsafe"]
    opts = parse_argstring(magic, "")
    assert (opts.fixes, opts.max_retries, opts.batch_var, opts.min_batch) == (
        "clear,batch,autocast,cpu",
        8,
        None,
        1,
    )
    assert (opts.force, opts.quiet) == (False, False)
    opts = parse_argstring(magic, "--max-retries 3 --batch-var bs --min-batch 2 --force --quiet")
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
def test_oomsafe_fixes_may_be_quoted_with_spaces(shell: Any, capsys: Any, line: str) -> None:
    result, out = _run(shell, capsys, f"%%oomsafe {line}\nx = 41 + 1")
    assert result.success, out
    assert shell.user_ns["x"] == 42


@pytest.mark.parametrize("text", ["１GiB", "٢GiB", "1.５GiB"])
def test_sizes_take_ascii_digits_only_everywhere(text: str) -> None:
    """Not only the magic: `jupyter_gpumem.simulate("１GiB")` refuses it too."""
    from jupyter_gpumem.units import parse_size

    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)

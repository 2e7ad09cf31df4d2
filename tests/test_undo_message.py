"""What a rollback says it put back: one sentence, its lists read as lists."""

from __future__ import annotations

from typing import Any

import pytest

from jupyter_gpumem.rescue.transaction import Transaction, _listed


def _transaction(**snapshot: Any) -> Transaction:
    t = Transaction({"n": 1}, ["n"], check_host=False)
    for name, value in snapshot.items():
        setattr(t.snapshot, name, value)
    return t


def test_the_notebook_and_the_random_generators_read_as_a_pair() -> None:
    assert _transaction().undo_message() == (
        "restored the notebook's variables and the random generators, as they were before the fix."
    )


def test_three_or_more_things_put_back_are_one_list() -> None:
    t = _transaction(modules=[object(), object()], optimizers=[object()])
    assert t.undo_message() == (
        "restored the notebook's variables, 2 models, optimizer state and the random generators, "
        "as they were before the fix."
    )
    t = _transaction(modules=[object()], state_dicts=[object()])
    assert t.undo_message().startswith(
        "restored the notebook's variables, 1 model, schedulers and scalers, and the random "
        "generators, as they were"
    ), "the serial comma keeps 'schedulers and scalers' one item"


def test_names_left_deleted_or_not_restored_are_listed_with_and() -> None:
    t = _transaction()
    t.evicted = {"x": None, "y": None, "z": None}
    t.released = ["a", "b"]
    assert t.undo_message() == (
        "restored the notebook's variables and the random generators, as they were before the "
        "fix; the failed run's `x`, `y` and `z` stay deleted (they held GPU memory; the cell "
        "makes them again); not restored (they held GPU memory; the cell makes them again): "
        "`a` and `b`."
    )
    t.evicted = {"x": None}
    t.released = []
    assert "the failed run's `x` stays deleted (it held GPU memory; the cell makes it again)" in (
        t.undo_message()
    )
    assert t.undo_message(everything=True).endswith("as they were before the fix.")


@pytest.mark.parametrize(
    ("items", "text"),
    [([], ""), (["a"], "a"), (["a", "b"], "a and b"), (["a", "b", "c"], "a, b and c")],
)
def test_listed(items: list[str], text: str) -> None:
    assert _listed(items) == text


def test_what_was_not_put_back_is_said_once_and_nothing_kept_is_not_claimed() -> None:
    t = _transaction()
    assert t.nothing_kept and t.whole
    t.not_covered = ["`gen` (a generator: where it stands cannot be put back)", "`db` (x)"]
    t.problems = ["`gen` (a generator) was advanced by the re-run and cannot be put back"]
    assert not t.nothing_kept
    assert t.undo_message().endswith(
        "as they were before the fix; `gen` (a generator) was advanced by the re-run and cannot "
        "be put back; not put back: `db` (x)."
    )
    assert t.not_undone() == [t.problems[0], "`db` (x)"]


def test_open_files_and_the_notebooks_modules_are_listed() -> None:
    import io
    import types

    from jupyter_gpumem.rescue import copies

    t = _transaction()
    t.snapshot.saved = [
        copies.Memory(io.StringIO(), "", 0),
        copies.Module(types.ModuleType("helpers"), {}),
    ]
    assert t.undo_message() == (
        "restored the notebook's variables, 1 open file (size and position), the attributes of "
        "`helpers` and the random generators, as they were before the fix."
    )


def test_a_failed_fix_says_nothing_was_kept_only_when_true(shell: Any, run: Any) -> None:
    """A re-run that advanced a generator made before the cell: the outcome does not say
    "Nothing was kept" (was: it did, with the generator advanced); it says what was put back and
    names what could not be."""
    pytest.importorskip("torch")
    shell.run_cell("%gpumem simulate 64MiB", store_history=True)
    shell.run_cell(
        "import torch\ngen = (i for i in range(100))\n"
        "keep = torch.empty(40 << 20, dtype=torch.uint8, device='cuda')",
        store_history=True,
    )
    shell.run_cell(
        "n = next(gen)\nx = torch.empty(40 << 20, dtype=torch.uint8, device='cuda')",
        store_history=True,
    )
    out = run(shell, "%gpumem retry clear --force").out
    assert "Still out of memory after clearing" in out, out
    assert "Nothing was kept" not in out
    assert "Put back what could be:" in out and "`gen` (a generator)" in out

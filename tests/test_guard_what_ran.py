"""The guard judges a failed cell by what ran, and asks about what nothing can undo.

Through the guard's public entry, ``analyse_rerun``, with a notebook namespace built as IPython
builds one (each cell's text kept in ``linecache``):

- the misses of issue 19: ``next(it)`` in a nested notebook function, a ``for`` loop over an
  iterator made before the cell, a ``logging.FileHandler``, ``WITH ... INSERT``, a bound method kept
  before the cell, an alias through a container, a thread started before the OOM, ``%run -i``;
- its false questions: a first-pass failure whose loop variable existed before the cell, nanoGPT
  failing at iteration 0, gradient accumulation after 0 optimizer steps, a fine-tune failing in its
  first backward, and the real hazard there (the failed batch's gradients left in ``.grad``) named;
- what a rehearsal would run (two passes of the loop, lines after the failing one) that neither the
  audit hooks stop nor the rollback undoes, asked about before it runs.

The end-to-end cases run ``%gpumem retry batch`` in a real InteractiveShell on the simulated GPU.
"""

from __future__ import annotations

import ast
import itertools
import linecache
import logging
import os
import textwrap
from typing import Any

import pytest

from jupyter_gpumem.guard.analyse import GuardVerdict, analyse_rerun

HERE = os.path.dirname(os.path.abspath(__file__))
_CELLS = itertools.count()


def notebook(*cells: str, **values: Any) -> dict[str, Any]:
    """A user namespace after running ``cells``, each kept in linecache as IPython keeps them."""
    ns: dict[str, Any] = {"__name__": "__main__", **values}
    for cell in cells:
        src = textwrap.dedent(cell)
        name = f"<ipython-input-{next(_CELLS)}-ran>"
        linecache.cache[name] = (len(src), None, src.splitlines(True), name)
        exec(compile(src, name, "exec"), ns)
    return ns


def guard(
    cell: str,
    failed: int | None,
    ns: dict[str, Any],
    *,
    earlier: bool | None = None,
    values: dict[str, Any] | None = None,
    frames: list[tuple[str, int]] | None = None,
) -> GuardVerdict:
    """The guard on ``cell`` failing at ``failed``, every name of ``ns`` from before the cell."""
    return analyse_rerun(
        textwrap.dedent(cell),
        failed_lineno=failed,
        preexisting=set(ns),
        namespace=ns,
        earlier_passes=earlier,
        values_at_failure=values,
        failed_frames=frames,
    )


def kinds(v: GuardVerdict) -> set[tuple[int, str, str]]:
    return {(e.lineno, e.kind, e.name) for e in v.effects}


# ---- the misses ------------------------------------------------------------------------------------


def test_next_inside_a_nested_notebook_function() -> None:
    """An iterator advanced by a function inside a function, by a closure made in an earlier cell,
    and by a function the cell defines and calls: each a batch the re-run never sees."""
    ns = notebook(
        """\
        it = iter(range(100))
        def outer():
            def inner():
                return next(it)
            return inner()
        def make():
            rows = iter(range(100))
            def take():
                return next(rows)
            return take
        take = make()
        """
    )
    v = guard("x = outer()\ny = f(x)\n", 2, ns)
    assert kinds(v) == {(1, "iterator", "it")}
    assert "`inner`, whose line" in v.summary() and "advances `it`" in v.summary()
    assert kinds(guard("x = take()\ny = f(x)\n", 2, ns)) == {(1, "iterator", "rows")}
    cell = "def get():\n    return next(it)\nx = get()\ny = f(x)\n"
    assert kinds(guard(cell, 4, ns)) == {(3, "iterator", "it")}
    # a closure made in the cell holds the cell's own iterator: a re-run makes it again
    cell = "rows = iter(range(3))\ndef get():\n    return next(rows)\nx = get()\ny = f(x)\n"
    assert guard(cell, 5, ns).safe


def test_a_function_s_own_names_are_not_read_from_the_notebook_s_values() -> None:
    """`i` in a function the cell defines is its own: the notebook's `i` = 0 at the failure says
    nothing of which pass the function's loop was in."""
    cell = (
        "def train():\n    for i in range(3):\n        y = model(i)\n        opt.step()\ntrain()\n"
    )
    ns = _names("model", "opt", "i")
    v = guard(cell, 5, ns, earlier=True, values={"i": 0}, frames=[("train", 3)])
    assert kinds(v) == {(5, "optimizer_step", "opt")}
    v = guard(cell, 5, ns, earlier=False, values={"i": 0}, frames=[("train", 3)])
    assert v.safe  # the record says first pass: the step after the failing line did not run


def test_a_library_s_bound_method_is_read_by_its_name() -> None:
    """`from random import shuffle` is a bound method of random's own generator: read as
    `shuffle(xs)` always was, a change to `xs`."""
    ns = notebook("from random import shuffle\nxs = [1, 2, 3]\n")
    assert kinds(guard("shuffle(xs)\ny = f()\n", 2, ns)) == {(1, "mutate_global", "xs")}


def test_a_for_loop_over_an_iterator_made_before_the_cell() -> None:
    """A generator, ``iter(...)``, an open file: a pass takes an item; a list or a loader starts
    over for the re-run."""
    ns = notebook(
        """\
        gen = (i for i in range(10))
        batches = iter([1, 2, 3])
        data = [1, 2, 3]
        class Loader:
            def __iter__(self):
                return iter(data)
        loader = Loader()
        """
    )
    cell = "for b in gen:\n    y = f(b)\n"
    v = guard(cell, 2, ns, earlier=False)
    assert kinds(v) == {(1, "iterator", "gen")}
    assert "takes items from `gen` in a `for` loop" in v.effects[0].why
    cell = "for i, b in enumerate(batches):\n    y = f(b)\n"
    assert kinds(guard(cell, 2, ns, earlier=False)) == {(1, "iterator", "batches")}
    for iterable in ("data", "loader", "range(3)"):
        assert guard(f"for b in {iterable}:\n    y = f(b)\n", 2, ns, earlier=False).safe


def test_logging_through_a_file_handler(tmp_path: Any) -> None:
    path = str(tmp_path / "train.log")
    ns = notebook(
        f"""\
        import logging
        log = logging.getLogger("guard-test-file")
        log.setLevel(logging.INFO)
        log.propagate = False
        log.addHandler(logging.FileHandler({path!r}))
        quiet = logging.getLogger("guard-test-quiet")
        quiet.propagate = False
        quiet.addHandler(logging.NullHandler())
        """
    )
    try:
        v = guard("log.info('epoch start')\ny = f()\n", 2, ns)
        assert kinds(v) == {(1, "file_write", "log.info('epoch start')")}
        assert repr(path) in v.summary()
        assert guard("log.debug('below its level')\ny = f()\n", 2, ns).safe
        assert guard("quiet.warning('nowhere')\ny = f()\n", 2, ns).safe
        # a handler added to a logger from before the cell: every line then written twice
        v = guard("log.addHandler(logging.FileHandler('b.log'))\ny = f()\n", 2, ns)
        assert {k for _, k, _ in kinds(v)} == {"mutate_global"}
    finally:
        for h in list(ns["log"].handlers):
            ns["log"].removeHandler(h)
            h.close()
        logging.getLogger("guard-test-quiet").handlers.clear()


@pytest.mark.parametrize(
    ("sql", "writes"),
    [
        ("WITH t AS (SELECT 1 AS x) INSERT INTO runs SELECT x FROM t", True),
        ("with recent as (select * from runs) delete from runs where id in recent", True),
        ("WITH t AS (SELECT 1) UPDATE runs SET n = (SELECT * FROM t)", True),
        ("WITH t AS (SELECT 'INSERT' AS word) SELECT word FROM t", False),
        ("WITH t AS (SELECT 1) SELECT * FROM t", False),
    ],
)
def test_sql_with_a_common_table_expression(sql: str, writes: bool) -> None:
    import sqlite3

    ns = notebook("", db=sqlite3.connect(":memory:"))
    try:
        v = guard(f"db.execute({sql!r})\ny = f()\n", 2, ns)
        assert (not v.safe) == writes
        if writes:
            assert v.effects[0].kind == "database"
    finally:
        ns["db"].close()


def test_a_bound_method_kept_before_the_cell() -> None:
    """``add = L.append`` in an earlier cell: ``add(x)`` appends to ``L``; ``fit = trainer.fit``:
    the method is read as written; ``show = print`` is nothing."""
    ns = notebook(
        """\
        L = []
        add = L.append
        history = []
        class Trainer:
            def fit(self):
                history.append(1)
        trainer = Trainer()
        fit = trainer.fit
        show = print
        """
    )
    v = guard("add(1)\ny = f()\n", 2, ns)
    assert kinds(v) == {(1, "append", "L")}
    assert v.question() == "Re-run anyway? The cell would append to `L` again."
    assert kinds(guard("fit()\ny = f()\n", 2, ns)) == {(1, "append", "history")}
    assert guard("show(1)\ny = f()\n", 2, ns).safe
    # a method whose object no notebook name holds is named through the alias
    ns2 = notebook("add = [].append\n")
    assert kinds(guard("add(1)\ny = f()\n", 2, ns2)) == {(1, "append", "add.__self__")}


def test_an_alias_through_a_container() -> None:
    ns = notebook("train_log = []\nval_log = []\n")
    cell = "logs = {'train': train_log, 'val': val_log}\nlogs['train'].append(1)\ny = f()\n"
    v = guard(cell, 3, ns)
    assert kinds(v) == {(2, "append", "logs['train']")}
    assert "part of `train_log`" in v.effects[0].why
    cell = "for h in (train_log, val_log):\n    h.append(1)\ny = f()\n"
    assert kinds(guard(cell, 3, ns)) == {(2, "append", "h")}
    cell = "bufs = [train_log]\nbufs[0].append(2)\nbufs.append([])\ny = f()\n"
    assert kinds(guard(cell, 4, ns)) == {(2, "append", "bufs[0]")}  # not the cell's own list


def test_a_thread_started_before_the_oom() -> None:
    ns = notebook(
        """\
        import threading
        from concurrent.futures import ThreadPoolExecutor
        pool = ThreadPoolExecutor(1)
        def work():
            pass
        class Prefetcher(threading.Thread):
            pass
        """
    )
    try:
        cell = "t = threading.Thread(target=work)\nt.start()\ny = f()\n"
        v = guard(cell, 3, ns)
        assert kinds(v) == {(2, "thread", "t.start()")}
        assert "may still be running" in v.effects[0].why
        for started in ("threading.Thread(target=work).start()", "pool.submit(work)"):
            assert [e.kind for e in guard(f"{started}\ny = f()\n", 2, ns).effects] == ["thread"]
        cell = "p = Prefetcher()\np.start()\ny = f()\n"
        assert [e.kind for e in guard(cell, 3, ns).effects] == ["thread"]
        # made, not started
        assert guard("t = threading.Thread(target=work)\ny = f()\n", 2, ns).safe
    finally:
        ns["pool"].shutdown()


def test_run_i_runs_code_in_the_notebook() -> None:
    ns = notebook("")
    v = guard("%run -i setup.py\ny = f()\n", 2, ns)
    assert kinds(v) == {(1, "exec", "`setup.py`")}
    assert "`%run -i`" in v.effects[0].why
    assert guard("%run -e -i other.py\ny = f()\n", 2, ns).effects[0].kind == "exec"
    assert guard("%run setup.py\ny = f()\n", 2, ns).safe  # its own namespace


def test_objects_that_lie_about_themselves_run_nothing() -> None:
    """The namespace is read by type: an object whose `__class__` and attributes raise (or count
    how often they are asked) is judged by what the cell says, and nothing of it runs."""
    asked: list[str] = []

    class Hostile:
        @property  # type: ignore[misc]
        def __class__(self) -> type:
            asked.append("__class__")
            raise RuntimeError("no")

        def __getattr__(self, name: str) -> Any:
            asked.append(name)
            raise RuntimeError(name)

        def __iter__(self) -> Any:
            asked.append("__iter__")
            return iter(())

    ns = notebook("", h=Hostile(), log=Hostile())
    cell = "for b in h:\n    y = f(b)\nlog.info('x')\nadd = h.append\nadd(1)\nz = f()\n"
    v = guard(cell, 6, ns, earlier=False)
    assert not any(e.kind == "unknown" for e in v.effects), v.summary()
    assert kinds(v) == {(5, "append", "h")}
    assert asked == []


# ---- first-pass failures judged by what ran ------------------------------------------------------------

EPOCHS = """\
for epoch in range(2):
    for i, (inputs, labels) in enumerate(loader):
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        history.append(loss.item())
"""
EPOCH_NAMES = ("loader", "optimizer", "model", "criterion", "history")


def _names(*names: str, **values: Any) -> dict[str, Any]:
    return {"__name__": "__main__", **dict.fromkeys(names), **values}


def test_a_first_pass_whose_loop_variables_existed_before_the_cell() -> None:
    """The cell ran before (a fix settled it): `epoch`, `i`, `loss` exist, the optimizer has
    state, so the failure record says earlier passes ran. The loop variables at the failure say
    the first pass of each: nothing after the failing line ran."""
    ns = _names(*EPOCH_NAMES, "epoch", "i", "inputs", "labels", "outputs", "loss")
    for line in (4, 6):  # the forward, the first backward
        v = guard(EPOCHS, line, ns, earlier=True, values={"epoch": 0, "i": 0})
        assert v.safe, v.summary()
    # the second pass of the inner loop: its step and append ran once
    v = guard(EPOCHS, 4, ns, earlier=True, values={"epoch": 0, "i": 1})
    assert {k for _, k, _ in kinds(v)} == {"optimizer_step", "append"}
    assert "earlier passes ran all of it" in v.summary()
    # without the values, the record's word stands
    assert not guard(EPOCHS, 4, ns, earlier=True).safe


def test_a_fine_tune_failing_in_its_first_backward_names_the_gradients_it_left() -> None:
    """ResNet fine-tuning with `zero_grad()` after the step: the first backward ran out of memory
    part way. Nothing after it ran (no step); what stays is part of that batch's gradients in
    `.grad`, which the re-run's first backward adds to."""
    cell = """\
    model.train()
    for epoch in range(3):
        for inputs, labels in dataloader:
            outputs = model(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        scheduler.step()
    """
    ns = _names("model", "dataloader", "criterion", "optimizer", "scheduler")
    v = guard(cell, 6, ns, earlier=False, values={"epoch": 0})
    assert kinds(v) == {(6, "backward", "loss")}
    assert "leaving part of the failed batch's gradients in `.grad`" in v.effects[0].why
    assert "those the failed backward left in `.grad`" in v.summary()
    assert "updates the weights" not in v.summary() and "schedule" not in v.summary()


GRAD_ACCUM = """\
accum_steps = 4
for i, (x, y) in enumerate(loader):
    loss = criterion(model(x), y) / accum_steps
    loss.backward()
    if (i + 1) % accum_steps == 0:
        optimizer.step()
        optimizer.zero_grad()
"""


def test_gradient_accumulation_after_no_optimizer_step() -> None:
    """Failing at the second micro-batch: the step (every 4th) never ran, so it is not named; the
    first micro-batch's gradients, never zeroed, stay in `.grad` and are named."""
    ns = _names("loader", "criterion", "model", "optimizer")
    v = guard(GRAD_ACCUM, 3, ns, earlier=True, values={"i": 1, "accum_steps": 4})
    assert kinds(v) == {(4, "backward", "loss")}
    assert "updates the weights" not in v.summary()
    assert "`.grad`" in v.summary() and "`.grad`" in v.question()
    # past a step (i = 5: the step at i = 3 ran), the step counts too
    v = guard(GRAD_ACCUM, 3, ns, earlier=True, values={"i": 5, "accum_steps": 4})
    assert {k for _, k, _ in kinds(v)} >= {"optimizer_step"}
    # zeroed before the loop: nothing of the first micro-batch is left for the re-run to add to
    zeroed = "optimizer.zero_grad()\n" + GRAD_ACCUM
    assert guard(zeroed, 4, ns, earlier=True, values={"i": 1, "accum_steps": 4}).safe


def _constant(path: str, name: str) -> str:
    """A string constant of a test module, read without importing it (it needs torch)."""
    with open(path, encoding="utf-8") as f:
        for node in ast.parse(f.read()).body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == name for t in node.targets
            ):
                assert isinstance(node.value, ast.Constant)
                return str(node.value.value)
    raise LookupError(name)


NANOGPT_VALUES = {
    "iter_num": 0, "local_iter_num": 0, "eval_interval": 2, "master_process": True,
    "always_save_checkpoint": False, "best_val_loss": 1e9, "eval_only": False, "decay_lr": True,
    "learning_rate": 1e-3, "grad_clip": 1.0, "log_interval": 1, "gradient_accumulation_steps": 2,
    "max_iters": 2, "ddp": False, "running_mfu": -1.0, "batch_size": 256,
}  # fmt: skip


def test_nanogpt_failing_at_iteration_0_cites_no_line_that_never_ran() -> None:
    """karpathy/nanoGPT's train loop (tests/test_real_code.py), failing in `estimate_loss()` at
    iteration 0, where the failure record says earlier passes ran (a loop inside `estimate_loss`
    is unknown). `local_iter_num`, set to 0 before the loop and added to once at its end, is 0:
    the first pass. The lr it set is set again to the same value; no step, no checkpoint ran."""
    loop = _constant(os.path.join(HERE, "test_real_code.py"), "NANOGPT_LOOP")
    line = next(i for i, t in enumerate(loop.splitlines(), 1) if "estimate_loss()" in t)
    pre = (
        "get_batch", "time", "model", "ddp", "get_lr", "optimizer", "estimate_loss", "torch",
        "os", "scaler", "ctx", "raw_model", "config", "model_args", "out_dir", "checkpoint",
    )  # fmt: skip
    ns = _names(*pre, **NANOGPT_VALUES)
    frames = [("estimate_loss", 103), ("GPT.forward", 183)]
    v = guard(loop, line, ns, earlier=True, values=NANOGPT_VALUES, frames=frames)
    assert v.safe, v.summary()
    # two passes in (local_iter_num 2): the steps and the checkpoint's branch may have run
    later = NANOGPT_VALUES | {"iter_num": 2, "local_iter_num": 2}
    v = guard(loop, line, ns, earlier=True, values=later, frames=frames)
    assert "updates the weights again" in v.summary() and "torch.save" in v.summary()


def test_a_counter_a_continue_may_skip_tells_nothing() -> None:
    cell = """\
    n = 0
    while True:
        if skip:
            continue
        y = model(x)
        opt.step()
        n += 1
    """
    ns = _names("model", "x", "opt", "skip")
    v = guard(cell, 5, ns, earlier=None, values={"n": 0, "skip": False})
    assert "opt.step()" in v.summary()  # n = 0 may follow passes that continued


# ---- what a rehearsal would do that nothing undoes ---------------------------------------------------


def test_a_rehearsal_that_would_advance_an_iterator_is_asked_about() -> None:
    """The failing pass was the first: nothing ran that a re-run repeats, but a rehearsal runs two
    passes, and `next(it)` after the failing line takes from an iterator no rollback puts back."""
    ns = notebook("it = iter(range(100))\nmodel = None\nlog = []\n")
    cell = "for s in range(3):\n    y = model(s)\n    b = next(it)\n    log.append(b)\n"
    v = guard(cell, 2, ns, earlier=False, values={"s": 0})
    assert [(e.lineno, e.kind, e.rehearsal) for e in v.effects] == [(3, "iterator", True)]
    assert v.summary() == (
        "this cell's rehearsals would run line 3 `b = next(it)` (advances `it`, skipping what it "
        "took), which no rollback puts back and nothing stops."
    )
    assert v.question() == (
        "Re-run anyway? Its rehearsals would advance `it`, skipping what it took, which nothing "
        "undoes."
    )
    # the append is undone by the rollback, a file write stopped by the audit hooks: not asked
    cell = "for s in range(3):\n    y = model(s)\n    log.append(s)\n    torch.save(y, 'a.pt')\n"
    assert guard(cell, 2, ns, earlier=False, values={"s": 0}).safe


def test_a_rehearsal_reads_notebook_functions_whole_and_stops_at_the_loop() -> None:
    ns = notebook(
        """\
        import threading
        def fetch():
            return next(stream)
        def start():
            threading.Thread(target=print).start()
        stream = iter(range(100))
        model = None
        """
    )
    cell = "for s in range(3):\n    y = model(s)\n    b = fetch()\nstart()\n"
    v = guard(cell, 2, ns, earlier=False, values={"s": 0})
    # fetch() is inside the loop; start() after it, where the rehearsal never gets to
    assert [(e.lineno, e.kind) for e in v.ahead] == [(3, "iterator")]
    # a cell without a loop runs whole in a rehearsal that fits: the thread counts
    v = guard("y = model(1)\nstart()\n", 1, ns)
    assert [(e.lineno, e.kind) for e in v.ahead] == [(2, "thread")]
    # what the failed run did and what a rehearsal would do, both said
    v = guard("b = fetch()\ny = model(b)\nb = fetch()\n", 2, ns)
    assert [e.rehearsal for e in v.effects] == [False, True]
    assert v.summary().startswith("this cell already ran 1 line")
    assert "Its rehearsals would run line 3" in v.summary()
    assert "; its rehearsals would" in v.question()


# ---- through the user's surface: %gpumem retry batch on the simulated GPU -----------------------------

SETUP = """\
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1024)
).cuda()
opt = torch.optim.Adam(model.parameters())
"""
TRAIN = """\
batch_size = 256
for step in range(3):
    x = torch.randn(batch_size, 32, 1024, device="cuda")
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


@pytest.fixture
def sim(shell: Any) -> Any:
    pytest.importorskip("torch")
    shell.run_cell("%gpumem simulate 160MiB")
    assert shell.run_cell(SETUP).success
    return shell


@pytest.mark.slow
def test_retry_after_a_fix_when_the_rerun_cell_fails_on_its_first_batch(
    sim: Any, capsys: Any, run: Any
) -> None:
    """JupyterLab's case in a terminal: the training cell fails, Reduce batch fixes it, the user runs
    the cell again at the old batch and it fails on the first batch. `step`, `x`, `loss` exist from
    the fixed run and Adam has state; the guard reads `step` = 0 at the failure and does not ask
    about `opt.step()`, which never ran."""
    import jupyter_gpumem

    assert not sim.run_cell(TRAIN).success
    sim.run_cell("%gpumem retry batch")
    assert "Fits at batch" in capsys.readouterr().out
    assert sim.user_ns["opt"].state  # the fixed run stepped
    assert not sim.run_cell(TRAIN).success
    failed = jupyter_gpumem.last_failure(sim)
    assert failed is not None and failed.plain_values is not None
    assert failed.plain_values["step"] == 0
    out = run(sim, "%gpumem retry batch", store_history=False).out
    assert "opt.step()" not in out and "Re-run anyway?" not in out, out
    assert "Fits at batch" in out, out


@pytest.mark.slow
def test_retry_stops_before_appending_through_a_bound_method(sim: Any, run: Any) -> None:
    sim.run_cell("seen = []\nremember = seen.append\n")
    cell = TRAIN.replace("batch_size = 256\n", "batch_size = 256\nremember(batch_size)\n")
    assert not sim.run_cell(cell).success
    assert sim.user_ns["seen"] == [256]
    out = run(sim, "%gpumem retry batch", store_history=False).out
    assert "append to `seen` again" in out and "--force` re-runs it anyway" in out, out
    assert sim.user_ns["seen"] == [256], "not re-run"


@pytest.mark.slow
def test_retry_asks_before_a_rehearsal_takes_from_a_generator(sim: Any, run: Any) -> None:
    """The generator is made before the cell and a notebook function takes from it after the
    failing line: the failed run took nothing, a rehearsal would, and no rollback gives it back."""
    sim.run_cell(
        "def batches():\n"
        "    n = 0\n"
        "    while True:\n"
        "        n += 1\n"
        "        yield n\n"
        "stream = batches()\n"
        "def next_batch():\n"
        "    return next(stream)\n"
    )
    cell = TRAIN.replace("    opt.step()\n", "    opt.step()\n    b = next_batch()\n")
    assert not sim.run_cell(cell).success
    out = run(sim, "%gpumem retry batch", store_history=False).out
    assert "rehearsals would" in out and "`stream`" in out, out
    assert "Fits at batch" not in out
    assert next(sim.user_ns["stream"]) == 1, "no rehearsal took from it"


TRAIN_MODEL = """\
def train_model(model, criterion, optimizer, scheduler, num_epochs=25):
    best_acc = 0.0
    for epoch in range(num_epochs):
        for phase in ['train', 'val']:
            if phase == 'train':
                model.train()
            else:
                model.eval()
            running_loss = 0.0
            for inputs, labels in dataloaders[phase]:
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == 'train'):
                    outputs = model(inputs)
                    loss = criterion(outputs, labels)
                    if phase == 'train':
                        loss.backward()
                        optimizer.step()
                running_loss += loss.item() * inputs.size(0)
            if phase == 'train':
                scheduler.step()
            epoch_acc = running_loss / dataset_sizes[phase]
            if phase == 'val' and epoch_acc > best_acc:
                best_acc = epoch_acc
                torch.save(model.state_dict(), best_model_params_path)
    return model
"""


def test_a_notebook_function_s_loops_are_read_from_its_frame_s_values() -> None:
    """pytorch/tutorials' transfer-learning `train_model` (its checkpoint directory aside), failing
    in the first backward of epoch 0's training phase. The record says earlier passes ran (it
    cannot tell for the loader's loop); the function's frame says `epoch` 0 and `phase` 'train':
    the scheduler's step and the checkpoint under `phase == 'val'` never ran. Given only the
    cell's values, the function's loops are not known, and those lines count."""
    ns = notebook(TRAIN_MODEL, dataloaders=None, torch=None, dataset_sizes=None)
    ns.update(_names("model_ft", "criterion", "optimizer_ft", "exp_lr_scheduler"))
    cell = "model_ft = train_model(model_ft, criterion, optimizer_ft, exp_lr_scheduler)\n"
    line = 1 + next(i for i, t in enumerate(TRAIN_MODEL.splitlines()) if "loss.backward()" in t)
    frames = [("train_model", line)]
    local = {"epoch": 0, "phase": "train", "num_epochs": 25, "best_acc": 0.0}
    v = analyse_rerun(
        cell, failed_lineno=1, preexisting=set(ns), namespace=ns, earlier_passes=False,
        failed_frames=frames, frame_values=[local],
    )  # fmt: skip
    assert v.safe, v.summary()
    # the loader's loop may have run earlier passes: their steps count, not the scheduler's
    v = analyse_rerun(
        cell, failed_lineno=1, preexisting=set(ns), namespace=ns, earlier_passes=True,
        failed_frames=frames, frame_values=[local],
    )  # fmt: skip
    said = v.summary()
    assert "optimizer.step()" in said and "scheduler" not in said and "torch.save" not in said
    v = analyse_rerun(
        cell, failed_lineno=1, preexisting=set(ns), namespace=ns, earlier_passes=True,
        failed_frames=frames,
    )  # fmt: skip
    assert "torch.save" in v.summary()


def test_an_attribute_of_the_notebook_s_own_module(tmp_path: Any, monkeypatch: Any) -> None:
    """`helpers.py` beside the notebook keeps its state across cells (the import system holds the
    module): a count the failed run added to is added to again. A library's module is settings."""
    import importlib
    import json
    import sys

    (tmp_path / "guard_helpers.py").write_text("count = 0\nseen = []\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    helpers = importlib.import_module("guard_helpers")
    try:
        ns = notebook("", helpers=helpers, json=json)
        v = guard("helpers.count += 1\nhelpers.seen.append(1)\ny = f()\n", 3, ns)
        assert kinds(v) == {(1, "augassign_global", "helpers.count"), (2, "append", "helpers.seen")}
        assert guard("helpers.count = 0\ny = f()\n", 2, ns).safe  # set again to the same
        assert guard("json.x = json.x + 1\ny = f()\n", 2, ns).safe
    finally:
        sys.modules.pop("guard_helpers", None)


CLOSURE_STEP = """\
for i in range(steps):
    def closure():
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        return loss
    optimizer.step(closure)
"""


def test_a_step_that_failed_inside_its_closure_before_any_update() -> None:
    """`optimizer.step(closure)` that ran out of memory in the closure's forward: torch.optim's
    optimizers evaluate the closure before they change any weight, and an LBFGS that has not
    iterated (`n_iter` 0) has changed none; judged by the failure's frames, not by what a step
    could do. An LBFGS that had iterated, or a failure in the step itself, is still named."""
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(3))
    lbfgs = torch.optim.LBFGS([p])
    ns = _names("criterion", "model", "x", "y", steps=1, optimizer=lbfgs)
    inside = [("closure", 4)]
    assert guard(CLOSURE_STEP, 7, ns, values={"i": 0, "steps": 1}, frames=inside).safe
    ns["optimizer"] = torch.optim.Adam([p])
    assert guard(CLOSURE_STEP, 7, ns, values={"i": 0, "steps": 1}, frames=inside).safe
    # an LBFGS past its first iteration: its later evaluations follow an update
    lbfgs.state[p].update(n_iter=3, func_evals=4)
    ns["optimizer"] = lbfgs
    v = guard(CLOSURE_STEP, 7, ns, values={"i": 0, "steps": 1}, frames=inside)
    assert kinds(v) == {(7, "optimizer_step", "optimizer")}, v.summary()
    assert "part of it" in v.effects[0].why
    # the failure was not in the closure (no notebook frame below the step, or another one)
    ns["optimizer"] = torch.optim.Adam([p])
    for frames in ([], [("helper", 2)]):
        v = guard(CLOSURE_STEP, 7, ns, values={"i": 0, "steps": 1}, frames=frames)
        assert kinds(v) == {(7, "optimizer_step", "optimizer")}, v.summary()

    # an optimizer that is not torch's (its own step may update before it evaluates)
    class Mine(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:
            return closure()

    ns["optimizer"] = Mine([p], lr=0.1)
    v = guard(CLOSURE_STEP, 7, ns, values={"i": 0, "steps": 1}, frames=inside)
    assert kinds(v) == {(7, "optimizer_step", "optimizer")}, v.summary()
    # a lambda given as the closure, keyword form
    cell = "optimizer.step(closure=lambda: criterion(model(x), y))\n"
    ns["optimizer"] = torch.optim.Adam([p])
    assert guard(cell, 1, ns, frames=[("<lambda>", 1)]).safe

"""The side-effect guard: which lines of a failed cell already did what a re-run would do again.

Each case is a cell, the line it failed on, the names that existed before it ran, and the effects
expected as ``(line, kind, name)``. Decided here: a name the cell binds from scratch is recreated by
the re-run; a line after the failing one counts only inside a loop around it; the failing statement's
own effect did not happen, except ``X.step()`` / ``.backward()``, which may have run part way;
with ``earlier_passes=False`` a loop around the failing line ran only up to it; given the namespace,
notebook functions the cell calls are read, up to their own failing line when a frame names it, and
an ``if`` whose plain test the values at the failure answer counts only the branch that ran.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import linecache
import textwrap
from typing import Any

import pytest

from jupyter_gpumem.guard.analyse import GuardVerdict, SideEffect, analyse_rerun

TRAIN = """\
for x, y in loader:
    opt.zero_grad()
    x, y = x.cuda(), y.cuda()
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    step += 1
    losses.append(loss.item())
"""
TRAIN_NAMES = {"loader", "opt", "model", "loss_fn", "step", "losses", "x", "y", "loss", "torch"}


def found(
    cell: str, failed: int | None, pre: set[str] | frozenset[str] = frozenset()
) -> set[tuple[int, str, str]]:
    v = analyse_rerun(textwrap.dedent(cell), failed_lineno=failed, preexisting=pre)
    return {(e.lineno, e.kind, e.name) for e in v.effects}


CASES = [
    # augmented assignment
    ("step += 1\ny = model(x)", 2, {"step"}, {(1, "augassign_global", "step")}),
    ("total -= 2\ny = f()", None, {"total"}, {(1, "augassign_global", "total")}),
    ("stats['n'] += 1\nf()", 2, {"stats"}, {(1, "augassign_global", "stats['n']")}),
    ("cfg.seen += 1\nf()", 2, {"cfg"}, {(1, "augassign_global", "cfg.seen")}),
    ("acc = 0\nacc += 1\nf()", 3, {"acc"}, set()),  # created by the cell
    ("step += 1", 1, set(), set()),  # never existed: not ours to judge
    ("y = model(x)\nstep += 1", 1, {"step"}, set()),  # after the failing line
    ("step += model(x).sum()", 1, {"step"}, set()),  # the failing statement itself
    # rebinding from its own value
    ("x = x + 1\nf()", 2, {"x"}, {(1, "global_rebind", "x")}),
    ("data = data[:-1]\nf()", 2, {"data"}, {(1, "global_rebind", "data")}),
    ("model = model.half()\nf()", 2, {"model"}, {(1, "global_rebind", "model")}),
    ("a, b = b, a + b\nf()", 2, {"a", "b"}, {(1, "global_rebind", "b")}),
    ("x = x.to(device)\nmodel = model.cuda().eval()\nf()", 3, {"x", "model"}, set()),
    ("x = 1\nx = x + 1\nf()", 3, {"x"}, set()),
    ("y = x + 1\nf()", 2, {"x", "y"}, set()),
    # mutation of pre-existing objects
    # set to a value made without the object: set again to the same (nanoGPT's
    # `param_group['lr'] = lr`); made from it, changed again
    ("d[k] = v\nf()", 2, {"d", "k", "v"}, set()),
    ("cfg.lr = 0.1\nf()", 2, {"cfg"}, set()),
    ("d[k] = d[k] + v\nf()", 2, {"d", "k", "v"}, {(1, "mutate_global", "d[k]")}),
    ("n = cfg.n\ncfg.n = n + 1\nf()", 3, {"cfg"}, {(2, "mutate_global", "cfg.n")}),
    ("d.update(a=1)\nf()", 2, {"d"}, {(1, "mutate_global", "d")}),
    (
        "s.add(3)\nq.pop()\nf()",
        3,
        {"s", "q"},
        {(1, "mutate_global", "s"), (2, "mutate_global", "q")},
    ),
    ("w.mul_(0.9)\nf()", 2, {"w"}, {(1, "mutate_global", "w")}),
    ("param.data.copy_(src)\nf()", 2, {"param", "src"}, {(1, "mutate_global", "param.data")}),
    (
        "nn.init.zeros_(model.fc.weight)\nf()",
        2,
        {"nn", "model"},
        {(1, "mutate_global", "model.fc.weight")},
    ),
    ("w = model.fc.weight\nw.add_(1)\nf()", 3, {"model"}, {(2, "mutate_global", "w")}),
    (
        "for p in model.parameters():\n    p.data.mul_(0.5)\nf()",
        3,
        {"model"},
        {(2, "mutate_global", "p.data")},
    ),
    ("model.train()\nmodel.eval()\nmodel.to('cuda')\nf()", 4, {"model"}, set()),
    ("torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)\nf()", 2, {"torch", "model"}, set()),
    ("for p in model.parameters():\n    p.grad = None\nf()", 3, {"model"}, set()),
    (
        "torch.backends.cudnn.benchmark = True\nos.environ['A'] = '1'\nf()",
        3,
        {"torch", "os"},
        set(),
    ),
    ("d = {}\nd['a'] = 1\nd.update(b=2)\nf()", 4, {"d"}, set()),
    ("t = torch.zeros(3)\nt.add_(1)\nf()", 3, {"torch"}, set()),
    # appends
    ("history.append(1)\nf()", 2, {"history"}, {(1, "append", "history")}),
    ("logs['loss'].extend(xs)\nf()", 2, {"logs", "xs"}, {(1, "append", "logs['loss']")}),
    (
        "d.setdefault('k', []).append(1)\nf()",
        2,
        {"d"},
        {(1, "mutate_global", "d"), (1, "append", "d.setdefault('k', [])")},
    ),
    ("h = history\nh.append(1)\nf()", 3, {"history"}, {(2, "append", "h")}),
    ("history = []\nhistory.append(1)\nf()", 3, {"history"}, set()),
    ("history.append(model(x))", 1, {"history", "model", "x"}, set()),  # the failing statement
    ("f()\nhistory.append(1)", 1, {"history"}, set()),  # after the failing line
    # optimizer, scheduler, scaler steps
    ("opt.step()\nf()", 2, {"opt"}, {(1, "optimizer_step", "opt")}),
    ("scheduler.step()\nf()", 2, {"scheduler"}, {(1, "optimizer_step", "scheduler")}),
    (
        "scaler.step(opt)\nscaler.update()\nf()",
        3,
        {"scaler", "opt"},
        {(1, "optimizer_step", "scaler"), (2, "mutate_global", "scaler")},
    ),
    ("opt.zero_grad()\nf()", 2, {"opt"}, set()),
    ("f()\nopt.step()", 1, {"opt"}, set()),
    ("opt.step()", 1, {"opt"}, {(1, "optimizer_step", "opt")}),  # may have updated some weights
    ("opt.step(); y = model(x)", 1, {"opt", "model", "x"}, {(1, "optimizer_step", "opt")}),
    (
        "model = Net()\nopt = torch.optim.SGD(model.parameters(), lr=lr)\nopt.step()\nf()",
        4,
        {"Net", "torch", "lr"},
        set(),
    ),
    (
        "opt = torch.optim.SGD(model.parameters(), lr=lr)\nopt.step()\nf()",
        3,
        {"model", "torch", "lr"},
        {(2, "optimizer_step", "opt")},
    ),
    # backward
    ("loss = model(x).sum()\nloss.backward()\nf()", 3, {"model", "x"}, {(2, "backward", "loss")}),
    (
        "opt.zero_grad()\nloss = model(x).sum()\nloss.backward()\nf()",
        4,
        {"model", "x", "opt"},
        set(),
    ),
    ("model.zero_grad()\nmodel(x).sum().backward()\nf()", 3, {"model", "x"}, set()),
    (
        "for x in data:\n    model(x).sum().backward()\n    opt.step()\n    opt.zero_grad()\n",
        2,
        {"model", "data", "opt"},
        {(3, "optimizer_step", "opt")},
    ),
    ("net = Net()\nnet(torch.ones(3)).sum().backward()\nf()", 3, {"Net", "torch"}, set()),
    (
        "net = Net()\nnet(x).sum().backward()\nf()",
        3,
        {"Net", "x"},
        {(2, "backward", "net(x).sum()")},
    ),
    # files
    ("open('log.txt', 'a').close()\nf()", 2, set(), {(1, "file_write", "open('log.txt', 'a')")}),
    (
        "with open(path, mode='w') as fh:\n    fh.write(s)\nf()",
        3,
        {"path", "s"},
        {(1, "file_write", "open(path, mode='w')")},
    ),
    ("with open(path, 'rb') as fh:\n    data = fh.read()\nf()", 3, {"path"}, set()),
    ("open(path)\nopen(path, 'r+')\nf()", 3, {"path"}, {(2, "file_write", "open(path, 'r+')")}),
    ("Image.open('x.png')\nf()", 2, {"Image"}, set()),
    (
        "Path('a.txt').write_text('hi')\nf()",
        2,
        {"Path"},
        {(1, "file_write", "Path('a.txt').write_text('hi')")},
    ),
    (
        "torch.save(model.state_dict(), 'ckpt.pt')\nf()",
        2,
        {"torch", "model"},
        {(1, "file_write", "torch.save(model.state_dict(), 'ckpt.pt')")},
    ),
    ("np.savez('a.npz', x=x)\nf()", 2, {"np", "x"}, {(1, "file_write", "np.savez('a.npz', x=x)")}),
    (
        "json.dump(cfg, fh)\ns = json.dumps(cfg)\nf()",
        3,
        {"json", "cfg", "fh"},
        {(1, "file_write", "json.dump(cfg, fh)")},
    ),
    (
        "df.to_csv('out.csv')\ns = df.to_csv()\nf()",
        3,
        {"df"},
        {(1, "file_write", "df.to_csv('out.csv')")},
    ),
    (
        "os.remove('a')\nos.makedirs('d', exist_ok=True)\nf()",
        3,
        {"os"},
        {(1, "file_write", "os.remove('a')")},
    ),
    (
        "shutil.copy('a', 'b')\nshutil.which('ls')\nf()",
        3,
        {"shutil"},
        {(1, "file_write", "shutil.copy('a', 'b')")},
    ),
    (
        "log_file.write('x')\nsys.stdout.write('y')\nf()",
        3,
        {"log_file", "sys"},
        {(1, "file_write", "log_file.write('x')")},
    ),
    ("buf = io.StringIO()\nbuf.write('x')\nf()", 3, {"io"}, set()),
    # deletes
    ("del old\nf()", 2, {"old"}, {(1, "delete_global", "old")}),
    ("tmp = 1\ndel tmp\nf()", 3, {"tmp"}, set()),
    (
        "del d['k'], cfg.x\nf()",
        2,
        {"d", "cfg"},
        {(1, "mutate_global", "d['k']"), (1, "mutate_global", "cfg.x")},
    ),
    # calls out of the notebook
    (
        "subprocess.run(['ls'])\nos.system('rm x')\nf()",
        3,
        {"subprocess", "os"},
        {(1, "io_call", "subprocess.run(['ls'])"), (2, "io_call", "os.system('rm x')")},
    ),
    (
        "writer.add_scalar('loss', 1.0, step)\nf()",
        2,
        {"writer", "step"},
        {(1, "io_call", "writer.add_scalar('loss', 1.0, step)")},
    ),
    ("wandb.log({'loss': 1})\nf()", 2, {"wandb"}, {(1, "io_call", "wandb.log({'loss': 1})")}),
    # iterators, heaps, queues
    ("b = next(it)\nf()", 2, {"it"}, {(1, "iterator", "it")}),
    ("b = next(batches, None)\nf()", 2, {"batches"}, {(1, "iterator", "batches")}),
    ("b = gen.__next__()\nf()", 2, {"gen"}, {(1, "iterator", "gen")}),
    ("x = next(iter(loader))\nf()", 2, {"loader"}, set()),  # a fresh iterator
    ("it = iter(loader)\nx = next(it)\nf()", 3, {"loader", "it"}, set()),
    ("p = next(model.parameters())\nf()", 2, {"model"}, set()),
    ("heapq.heappush(h, 3)\nf()", 2, {"heapq", "h"}, {(1, "append", "h")}),
    (
        "heappush(h, 3)\nheapq.heapify(g)\nf()",
        3,
        {"h", "g"},
        {(1, "append", "h"), (2, "mutate_global", "g")},
    ),
    ("h = []\nheapq.heappush(h, 3)\nx = heapq.nlargest(2, g)\nf()", 4, {"g", "h"}, set()),
    ("q.put(x)\nq.put_nowait(y)\nf()", 3, {"q", "x", "y"}, {(1, "queue", "q"), (2, "queue", "q")}),
    ("item = q.get()\nv = d.get('k')\nf()", 3, {"q", "d"}, {(1, "queue", "q")}),
    # setattr, globals(), exec
    ("setattr(cfg, 'lr', 0.1)\nf()", 2, {"cfg"}, set()),
    ("setattr(cfg, 'lr', cfg.lr / 2)\nf()", 2, {"cfg"}, {(1, "mutate_global", "cfg.lr")}),
    ("delattr(model, name)\nf()", 2, {"model", "name"}, {(1, "mutate_global", "model")}),
    ("setattr(Net(), 'a', 1)\nf()", 2, {"Net"}, set()),
    ("globals()['n'] += 1\nf()", 2, {"n"}, {(1, "augassign_global", "n")}),
    ("globals()['n'] = globals()['n'] + 1\nf()", 2, {"n"}, {(1, "global_rebind", "n")}),
    ("globals()[key] = 0\nf()", 2, {"key"}, {(1, "mutate_global", "globals()[key]")}),
    ("globals().update(cfg)\nf()", 2, {"cfg"}, {(1, "exec", "globals().update(cfg)")}),
    ("del globals()['old']\nf()", 2, {"old"}, {(1, "delete_global", "old")}),
    ("globals()['n'] = 0\nn += 1\nf()", 3, {"n"}, set()),  # made by the cell
    ("exec(code)\nf()", 2, {"code"}, {(1, "exec", "exec")}),
    ("eval('step.__iadd__(1)')\nf()", 2, {"step"}, {(1, "exec", "eval")}),
    ("y = eval('2 * 3')\nf()", 2, set(), set()),
    (
        "get_ipython().run_cell('x += 1')\nf()",
        2,
        set(),
        {(1, "exec", "get_ipython().run_cell('x += 1')")},
    ),
    ("model.eval()\nf()", 2, {"model"}, set()),
    # print to a file, out=
    ("print(loss, file=logf)\nf()", 2, {"logf", "loss"}, {(1, "file_write", "logf")}),
    ("print(loss, file=sys.stderr)\nprint(loss)\nf()", 3, {"loss", "sys"}, set()),
    ("torch.add(acc, 1, out=acc)\nf()", 2, {"torch", "acc"}, {(1, "mutate_global", "acc")}),
    ("np.multiply(a, 2, out=buf[0])\nf()", 2, {"np", "a", "buf"}, {(1, "mutate_global", "buf[0]")}),
    ("t = torch.empty(3)\ntorch.add(acc, 1, out=t)\nf()", 3, {"torch", "acc"}, set()),
    # databases
    (
        "db.execute('INSERT INTO runs VALUES (?)', (1,))\nf()",
        2,
        {"db"},
        {(1, "database", "db.execute('INSERT INTO runs VALUES (?)', (1,))")},
    ),
    (
        "cur.executemany(sql, rows)\nf()",
        2,
        {"cur", "sql", "rows"},
        {(1, "database", "cur.executemany(sql, rows)")},
    ),
    (
        "cursor.execute(query)\nf()",
        2,
        {"cursor", "query"},
        {(1, "database", "cursor.execute(query)")},
    ),
    ("conn.commit()\nf()", 2, {"conn"}, {(1, "database", "conn.commit()")}),
    ("rows = db.execute('  SELECT * FROM runs').fetchall()\nf()", 2, {"db"}, set()),
    ("rows = db.execute(f'select * from {t}')\nf()", 2, {"db", "t"}, set()),
    ("pool.execute(job)\nf()", 2, {"pool", "job"}, set()),
    # a bound method kept in a name
    ("add = L.append\nadd(1)\nf()", 3, {"L"}, {(2, "append", "L")}),
    ("step = opt.step\nstep()\nf()", 3, {"opt"}, {(2, "optimizer_step", "opt")}),
    ("add = L.append\nadd = print\nadd(1)\nf()", 4, {"L"}, set()),
    # deleting a name the cell did not make, even one missing from the names before it
    ("del recent\nf()", 2, set(), {(1, "delete_global", "recent")}),
    (
        "for b in data:\n    del out\n    out = model(b)\n",
        3,
        {"data", "model"},
        {(2, "delete_global", "out")},
    ),
    # harmless
    ("print(step)\ndisplay(model)\nlogger.info('x')\nf()", 4, {"step", "model", "logger"}, set()),
    ("helper(history)\nf()", 2, {"history", "helper"}, set()),  # calls are not looked into
]


@pytest.mark.parametrize(("cell", "failed", "pre", "expected"), CASES)
def test_effects(
    cell: str, failed: int | None, pre: set[str], expected: set[tuple[int, str, str]]
) -> None:
    assert found(cell, failed, pre) == expected


def test_training_loop_failing_inside_the_loop_counts_the_whole_loop() -> None:
    v = analyse_rerun(TRAIN, failed_lineno=4, preexisting=TRAIN_NAMES)
    assert [(e.lineno, e.kind, e.name) for e in v.effects] == [
        (6, "optimizer_step", "opt"),
        (7, "augassign_global", "step"),
        (8, "append", "losses"),
    ]
    assert v.in_loop and not v.safe
    assert v.summary() == (
        "this cell already ran 3 lines with side effects before it failed at line 4, inside a "
        "loop whose earlier passes ran all of it: line 6 `opt.step()` (updates the weights again), "
        "line 7 `step += 1` (adds to `step` again), line 8 `losses.append(loss.item())` "
        "(appends to `losses` again)."
    )
    assert v.question() == (
        "Re-run anyway? The cell would update the weights again, add to `step` again and append "
        "to `losses` again."
    )


def test_training_loop_with_everything_created_in_the_cell_is_safe() -> None:
    cell = """\
    import torch
    model = Net().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    criterion = torch.nn.CrossEntropyLoss()
    losses = []
    step = 0
    for x, y in loader:
        opt.zero_grad()
        loss = criterion(model(x.cuda()), y.cuda())
        loss.backward()
        opt.step()
        step += 1
        losses.append(loss.item())
    """
    assert found(cell, 9, {"Net", "loader", "torch", "losses", "step", "model", "opt"}) == set()


def test_inference_cell_is_safe() -> None:
    cell = "with torch.no_grad():\n    out = model(x)\n    preds = out.argmax(-1)\n"
    v = analyse_rerun(cell, failed_lineno=2, preexisting={"torch", "model", "x", "out"})
    assert v.safe and v.effects == ()
    assert v.summary() == "this cell changed nothing that a re-run would change again."
    assert v.question() == "Re-run the cell?"


def test_unknown_failing_line_reads_the_whole_cell() -> None:
    assert found("f()\nstep += 1", None, {"step"}) == {(2, "augassign_global", "step")}
    v = analyse_rerun("f()\nstep += 1", failed_lineno=None, preexisting={"step"})
    assert v.summary().startswith(
        "this cell may have run 1 line with side effects before it failed"
    )
    # a line number outside the cell is as good as none
    assert found("f()\nstep += 1", 99, {"step"}) == {(2, "augassign_global", "step")}


def test_branches_and_try() -> None:
    # bound in one branch only: the other branch may have left it pre-existing
    cell = "if fresh:\n    acc = 0\nacc += 1\nf()"
    assert found(cell, 4, {"acc", "fresh"}) == {(3, "augassign_global", "acc")}
    cell = "if c:\n    acc = 0\nelse:\n    acc = 1\nacc += 1\nf()"
    assert found(cell, 6, {"acc", "c"}) == set()
    # the failing line picks the branch: the other one never ran
    cell = "if c:\n    y = model(x)\nelse:\n    step += 1\n"
    assert found(cell, 2, {"step", "c", "model", "x"}) == set()
    cell = "if c:\n    step += 1\nelse:\n    y = model(x)\n"
    assert found(cell, 4, {"step", "c", "model", "x"}) == set()
    cell = "try:\n    step += 1\n    y = model(x)\nexcept KeyError:\n    pass\n"
    assert found(cell, 3, {"step", "model", "x"}) == {(2, "augassign_global", "step")}
    cell = "try:\n    step += 1\nexcept KeyError as e:\n    y = model(x)\nfinally:\n    n += 1\n"
    assert found(cell, 4, {"step", "n", "model", "x"}) == {(2, "augassign_global", "step")}
    assert found(cell, 6, {"step", "n", "model", "x"}) == {(2, "augassign_global", "step")}


def test_loops() -> None:
    # after the loop, outside it: not run
    cell = "for b in batches:\n    y = model(b)\nstep += 1\n"
    assert found(cell, 2, {"step", "model", "batches"}) == set()
    # a nested loop: the outer loop's later lines ran in earlier passes too
    cell = "for e in range(3):\n    for b in data:\n        y = model(b)\n    epoch += 1\n"
    assert found(cell, 3, {"epoch", "model", "data"}) == {(4, "augassign_global", "epoch")}
    # the failing statement in a loop ran completely in earlier passes
    cell = "while True:\n    history.append(model(x))\n"
    assert found(cell, 2, {"history", "model", "x"}) == {(2, "append", "history")}
    # the loop header (the iterator) failed: the body ran in earlier passes
    cell = "for b in loader:\n    step += 1\n"
    assert found(cell, 1, {"step", "loader"}) == {(2, "augassign_global", "step")}
    # failing in the else: the body ran to the end
    cell = "for b in xs:\n    n += 1\nelse:\n    y = model(x)\n"
    assert found(cell, 4, {"n", "xs", "model", "x"}) == {(2, "augassign_global", "n")}
    # a rebind by the loop makes the name the cell's own
    cell = "for step in range(10):\n    step += 1\n    y = model(x)\n"
    assert found(cell, 3, {"step", "model", "x"}) == set()


def test_failing_inside_a_function_defined_in_the_cell_counts_everything_after() -> None:
    cell = "def go():\n    return model(x)\nstep += 1\ngo()\n"
    assert found(cell, 2, {"step", "model", "x"}) == {(3, "augassign_global", "step")}


def test_a_function_the_cell_defines_is_read_where_it_is_called() -> None:
    cell = "def bump():\n    global step\n    step += 1\nbump()\nf()\n"
    assert found(cell, 5, {"step"}) == {(4, "augassign_global", "step")}
    assert found(cell.replace("bump()\n", ""), 4, {"step"}) == set()  # defined, never called


def test_side_effect_fields_and_messages() -> None:
    v = analyse_rerun(
        "x = 1\nstep += 1  # count\ny = model(x)", failed_lineno=3, preexisting={"step"}
    )
    (e,) = v.effects
    assert e == SideEffect(
        2,
        "augassign_global",
        "step",
        "step += 1  # count",
        "adds to `step`, which existed before the cell: a re-run does it again",
        "add to `step` again",
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.lineno = 3  # type: ignore[misc]
    assert v.summary() == (
        "this cell already ran 1 line with side effects before it failed at line 3: "
        "line 2 `step += 1  # count` (adds to `step` again)."
    )


@pytest.mark.parametrize(
    ("cell", "pre", "again", "says"),
    [
        ("del old", {"old"}, "find `old` already deleted", "finds `old` already deleted"),
        ("scheduler.step()", {"scheduler"}, "advance the schedule again", "advances the"),
        ("open('log.txt', 'a')", set(), "append to 'log.txt' again", "appends to 'log.txt'"),
        ("open('new.txt', 'x')", set(), "fail to create 'new.txt' again", "fails to create"),
        ("x = x * 2", {"x"}, "rebind `x` from its own value again", "rebinds `x` from"),
        ("w.mul_(0.9)", {"w"}, "change `w` in place again", "changes `w` in place again"),
        (
            "loss.backward()",
            {"loss"},
            "add its gradients to those left in `.grad`",
            "adds its gradients to those left in `.grad`",
        ),
        ("q *= 2", {"q"}, "multiply `q` again", "multiplies `q` again"),
        ("s |= {1}", {"s"}, "merge into `s` again", "merges into `s` again"),
        ("d.popitem()", {"d"}, "pop from `d` again", "pops from `d` again"),
    ],
)
def test_phrases(cell: str, pre: set[str], again: str, says: str) -> None:
    v = analyse_rerun(cell + "\nf()", failed_lineno=2, preexisting=pre)
    assert [e.again for e in v.effects] == [again]
    assert f"line 1 `{cell}` ({says}" in v.summary()
    assert v.question() == f"Re-run anyway? The cell would {again}."


def test_summary_lists_four_lines_and_counts_the_rest() -> None:
    cell = "".join(f"n{i} += 1\n" for i in range(6)) + "f()\n"
    v = analyse_rerun(cell, failed_lineno=7, preexisting={f"n{i}" for i in range(6)})
    assert len(v.effects) == 6
    s = v.summary()
    assert s.startswith(
        "this cell already ran 6 lines with side effects before it failed at line 7:"
    )
    assert "line 4 `n3 += 1`" in s and "line 5" not in s and s.endswith(", and 2 more.")
    assert v.question().endswith("add to `n2` again and 3 more things again.")


def test_summary_groups_effects_on_one_line_and_shortens_long_lines() -> None:
    cell = "scaler.step(opt); scaler.update(); log('" + "x" * 80 + "')\nf()"
    v = analyse_rerun(cell, failed_lineno=2, preexisting={"scaler", "opt", "log"})
    s = v.summary()
    assert "1 line with side effects" in s
    assert "(updates the weights again; updates `scaler` again)" in s
    assert "…" in s and len(s) < 250


def test_backticks_in_source_do_not_break_the_message() -> None:
    v = analyse_rerun("notes.append('`x`')\nf()", failed_lineno=2, preexisting={"notes"})
    assert "`notes.append(''x'')`" in v.summary()


def test_non_ascii_source() -> None:
    cell = "# données ✓\nhistorique.append('é')\nschritt += 1\ny = modèle(x)\n"
    v = analyse_rerun(cell, failed_lineno=4, preexisting={"historique", "schritt", "modèle", "x"})
    assert [(e.lineno, e.kind, e.name) for e in v.effects] == [
        (2, "append", "historique"),
        (3, "augassign_global", "schritt"),
    ]
    assert "historique.append('é')" in v.summary()


def test_windows_line_endings_keep_line_numbers() -> None:
    assert found("x = 1\r\nstep += 1\r\nf()", 3, {"step"}) == {(2, "augassign_global", "step")}


def test_magics_and_shell_lines_keep_line_numbers() -> None:
    cell = """\
    %matplotlib inline
    %time step += 1
    !rm -rf out
    !nvidia-smi
    files = !ls
    model?
    y = model(x)
    history.append(1)
    """
    v = analyse_rerun(
        textwrap.dedent(cell), failed_lineno=7, preexisting={"step", "model", "x", "history"}
    )
    assert [(e.lineno, e.kind, e.text) for e in v.effects] == [
        (2, "augassign_global", "%time step += 1"),
        (3, "io_call", "!rm -rf out"),
    ]
    assert "line 3 `!rm -rf out` (runs the shell command again)" in v.summary()


def test_magics_inside_a_loop() -> None:
    cell = "for b in data:\n    y = model(b)\n    %time opt.step()\n    !echo hi >> log.txt\n"
    assert found(cell, 2, {"data", "model", "opt"}) == {
        (3, "optimizer_step", "opt"),
        (4, "io_call", "shell command"),
    }


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("x = %time f(step)\nstep = 2\ny = model(x)\n", set()),
        ("%timeit -n 3 -r 1 step += 1\ny = model(x)\n", {(1, "augassign_global", "step")}),
        ("out = !rm -rf out\ny = model(x)\n", {(1, "io_call", "shell command")}),
        ("%sx rm -rf out\ny = model(x)\n", {(1, "io_call", "shell command")}),
        ("out = %sx ls\ny = model(x)\n", set()),
        # IPython's tokenizer, not a regex: `!rm` inside a string is text
        (
            's = """\n!rm -rf out\n"""\n%time step += 1\ny = model(x)\n',
            {(4, "augassign_global", "step")},
        ),
        # a magic continued with `\\` moves the cell's lines: not read, so asked about
        ("%time f(a, \\\n  b)\ny = model(x)\n", {(3, "unknown", "")}),
        ("x = %time step += 1\ny = model(x)\n", {(2, "unknown", "")}),
    ],
)
def test_ipython_syntax_read_as_ipython_reads_it(
    cell: str, expected: set[tuple[int, str, str]]
) -> None:
    failed = cell.count("\n")
    assert found(cell, failed, {"step", "model", "x", "a", "b"}) == expected


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("%%time\nstep += 1\ny = model(x)\n", {(2, "augassign_global", "step")}),
        ("%%capture out\nhistory.append(1)\ny = model(x)\n", {(2, "append", "history")}),
        ("%%writefile train.py\nprint(1)\n", {(1, "file_write", "train.py")}),
        ("%%bash\nrm -rf out\n", {(1, "io_call", "bash")}),
        ("%%html\n<b>hi</b>\n", set()),
        ("%%sql\nDELETE FROM t\n", {(3, "unknown", "")}),
    ],
)
def test_cell_magics(cell: str, expected: set[tuple[int, str, str]]) -> None:
    assert found(cell, 3, {"step", "history", "model", "x"}) == expected


def test_unreadable_cell_asks() -> None:
    v = analyse_rerun("x = (\nstep += 1\n", failed_lineno=2, preexisting={"step"})
    assert not v.safe
    assert [e.kind for e in v.effects] == ["unknown"]
    assert v.summary() == "could not read the cell; re-running may repeat its effects."
    assert v.question().startswith("Re-run anyway? The cell would run again from the top")


@pytest.mark.parametrize(
    ("cell", "failed", "kinds"),
    [
        ("x = " + "(" * 5000 + "1" + ")" * 5000, 1, ["unknown"]),  # past the parser's nesting
        ("y = x" + ".a" * 5000 + "\nf()", 2, ["unknown"]),  # past the recursion limit
        ("\x00", 1, ["unknown"]),
        ("%%", 1, ["unknown"]),  # a cell magic without a name: not read, so asked about
        ("", 1, []),
        ("\n\n", 1, []),
        ("pass", 1, []),
        ("%", 1, []),
        ("?", 1, []),
        ("!", 1, []),  # the failing line: it did not run
        ("!\nf()", 2, ["io_call"]),
        ("async def f(): pass\nawait f()", 1, []),
    ],
)
def test_hostile_cells_are_read_or_asked_about(cell: str, failed: int, kinds: list[str]) -> None:
    v = analyse_rerun(cell, failed_lineno=failed, preexisting={"x"})
    assert [e.kind for e in v.effects] == kinds
    if kinds == ["unknown"]:
        assert v.summary().startswith("could not read the cell")


def test_top_level_await_and_walrus() -> None:
    assert found("await client.step()\nf()", 2, {"client"}) == {(1, "optimizer_step", "client")}
    assert found("if (n := n + 1) > 3:\n    pass\nf()", 3, {"n"}) == {(1, "global_rebind", "n")}


EPOCHS = """\
for epoch in range(3):
    for xb, yb in loader:
        out = model(xb.cuda())
        loss = F.cross_entropy(out, yb.cuda())
        opt.zero_grad()
        loss.backward()
        opt.step()
"""
EPOCH_NAMES = {"loader", "model", "F", "opt"}


def test_first_pass_of_the_loops_counts_only_the_lines_before_the_failing_one() -> None:
    v = analyse_rerun(EPOCHS, failed_lineno=3, preexisting=EPOCH_NAMES, earlier_passes=False)
    assert v.safe and not v.in_loop
    assert v.summary() == "this cell changed nothing that a re-run would change again."
    for earlier in (True, None):
        v = analyse_rerun(EPOCHS, failed_lineno=3, preexisting=EPOCH_NAMES, earlier_passes=earlier)
        assert [(e.lineno, e.kind, e.name) for e in v.effects] == [(7, "optimizer_step", "opt")]
        assert v.in_loop and "inside a loop whose earlier passes ran all of it" in v.summary()


def test_first_pass_still_counts_what_ran_before_the_failing_line() -> None:
    v = analyse_rerun(TRAIN, failed_lineno=5, preexisting=TRAIN_NAMES, earlier_passes=False)
    assert v.effects == ()  # zero_grad ran first: the backward that failed added nothing
    v = analyse_rerun(TRAIN, failed_lineno=7, preexisting=TRAIN_NAMES, earlier_passes=False)
    assert [(e.lineno, e.kind) for e in v.effects] == [(6, "optimizer_step")]
    assert v.summary().startswith(
        "this cell already ran 1 line with side effects before it failed at line 7: line 6"
    )
    # lines before the loop ran; the loop's header failed before its first pass
    cell = "step += 1\nfor b in loader:\n    history.append(b)\n"
    v = analyse_rerun(cell, failed_lineno=2, preexisting={"step", "loader", "history"})
    assert {e.lineno for e in v.effects} == {1, 3}
    v = analyse_rerun(
        cell, failed_lineno=2, preexisting={"step", "loader", "history"}, earlier_passes=False
    )
    assert [e.lineno for e in v.effects] == [1]
    # a loop that finished before the failing line ran all of its passes
    cell = "for b in xs:\n    n += 1\ny = model(x)\n"
    v = analyse_rerun(
        cell, failed_lineno=3, preexisting={"n", "xs", "model", "x"}, earlier_passes=False
    )
    assert [e.lineno for e in v.effects] == [2]


# ---- notebook functions the cell calls ------------------------------------------------------------

_CELLS = itertools.count()


def notebook(*cells: str, **values: Any) -> dict[str, Any]:
    """A user namespace after running ``cells``, each kept in linecache as IPython keeps them."""
    ns: dict[str, Any] = {"__name__": "__main__", **values}
    for cell in cells:
        src = textwrap.dedent(cell)
        if "import torch" in src:
            pytest.importorskip("torch")  # the torch-free CI runs (Python 3.10, 3.13)
        name = f"<ipython-input-{next(_CELLS)}-guard>"
        linecache.cache[name] = (len(src), None, src.splitlines(True), name)
        exec(compile(src, name, "exec"), ns)
    return ns


TRAIN_FN = """\
import torch.nn.functional as F

def train(model, opt, loader):
    for xb, yb in loader:
        out = model(xb)
        loss = F.cross_entropy(out, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
"""


def called(
    cell: str,
    failed: int | None,
    ns: dict[str, Any],
    pre: set[str],
    frames: list[tuple[str, int]] | None = None,
    earlier: bool | None = None,
) -> GuardVerdict:
    return analyse_rerun(
        textwrap.dedent(cell),
        failed_lineno=failed,
        preexisting=pre | {"__name__"},
        namespace=ns,
        failed_frames=frames,
        earlier_passes=earlier,
    )


def effects(v: GuardVerdict) -> set[tuple[int, str, str]]:
    return {(e.lineno, e.kind, e.name) for e in v.effects}


def test_a_notebook_function_called_before_the_failing_line_ran_all_of_it() -> None:
    ns = notebook(TRAIN_FN, model=object(), opt=object(), loader=[])
    pre = {"train", "model", "opt", "loader", "F"}
    v = called("x = 1\ntrain(model, opt, loader)\ny = model(x)\n", 3, ns, pre)
    assert effects(v) == {(2, "optimizer_step", "opt")}
    (e,) = v.effects
    assert e.text == "train(model, opt, loader)"
    assert e.why == (
        "calls `train`, whose line 9 `opt.step()` updates the weights: a re-run does it again"
    )
    assert v.summary() == (
        "this cell already ran 1 line with side effects before it failed at line 3: line 2 "
        "`train(model, opt, loader)` (calls `train`, whose line 9 `opt.step()` updates the "
        "weights again)."
    )
    assert v.question() == (
        "Re-run anyway? The cell would call `train`, whose line 9 `opt.step()` updates the "
        "weights again."
    )
    # without the namespace the call is not looked into, as before
    assert found("x = 1\ntrain(model, opt, loader)\ny = model(x)\n", 3, pre) == set()


def test_a_notebook_function_failing_part_way_counts_what_ran_before_its_failing_line() -> None:
    ns = notebook(TRAIN_FN, model=object(), opt=object(), loader=[])
    pre = {"train", "model", "opt", "loader", "F"}
    cell = "train(model, opt, loader)\n"
    line = 5  # `out = model(xb)`, as a line of the cell that defined `train`
    # where it stopped is unknown: all of it counts
    assert effects(called(cell, 1, ns, pre)) == {(1, "optimizer_step", "opt")}
    # it stopped at `out = model(xb)` in the first pass: nothing ran
    v = called(cell, 1, ns, pre, frames=[("train", line)], earlier=False)
    assert v.safe
    # in a later pass: the loop's earlier passes stepped the optimizer
    v = called(cell, 1, ns, pre, frames=[("train", line)])
    assert effects(v) == {(1, "optimizer_step", "opt")}
    # a frame of another function says nothing about this one
    v = called(cell, 1, ns, pre, frames=[("other", line)], earlier=False)
    assert effects(v) == {(1, "optimizer_step", "opt")}


def test_a_parameter_given_an_object_made_in_the_cell_is_the_cell_s_own() -> None:
    ns = notebook(TRAIN_FN, Net=object, torch=None, loader=[])
    cell = """\
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, opt, loader)
    f()
    """
    assert called(cell, 4, ns, {"train", "Net", "torch", "loader", "F"}).safe


def test_globals_in_a_notebook_function() -> None:
    ns = notebook("def bump():\n    global step\n    step += 1\n", step=0)
    assert effects(called("bump()\nf()", 2, ns, {"bump", "step"})) == {
        (1, "augassign_global", "step")
    }
    # made by the cell before the call: the re-run makes it again
    assert called("step = 0\nbump()\nf()", 3, ns, {"bump", "step"}).safe
    # a local that shadows a global is the function's own
    ns = notebook("def log():\n    history = []\n    history.append(1)\n", history=[])
    assert called("log()\nf()", 2, ns, {"log", "history"}).safe
    ns = notebook("def log(x):\n    history.append(x)\n", history=[])
    assert effects(called("log(1)\nf()", 2, ns, {"log", "history"})) == {(1, "append", "history")}


def test_methods_of_notebook_classes() -> None:
    cls = """\
    class Trainer:
        def __init__(self, model, opt):
            self.model, self.opt = model, opt

        def fit(self):
            self.step()

        def step(self):
            self.opt.step()
    """
    ns = notebook(cls, model=object(), opt=object())
    ns["trainer"] = ns["Trainer"](ns["model"], ns["opt"])
    pre = {"Trainer", "trainer", "model", "opt"}
    v = called("trainer.fit()\nf()", 2, ns, pre)
    assert effects(v) == {(1, "optimizer_step", "self.opt")}
    assert v.effects[0].why.startswith(
        "calls `Trainer.fit`, whose line 6 `self.step()` calls `Trainer.step`, whose line 9 "
        "`self.opt.step()` updates the weights"
    )
    # an instance made in the cell from pre-existing parts still steps the pre-existing optimizer
    ns["t"] = ns["Trainer"](ns["model"], ns["opt"])  # what the failed run left
    v = called("t = Trainer(model, opt)\nt.fit()\nf()", 3, ns, pre)
    assert effects(v) == {(2, "optimizer_step", "self.opt")}
    # ... but not one made from parts made in the cell
    ns["t"] = ns["Trainer"](object(), object())
    assert called("t = Trainer(Net(), Opt())\nt.fit()\nf()", 3, ns, pre | {"Net", "Opt"}).safe


def test_notebook_calls_are_followed_transitively_and_recursion_ends() -> None:
    ns = notebook(
        "def inner(x):\n    history.append(x)\n",
        "def outer(x):\n    inner(x)\n",
        "def again(n):\n    if n:\n        again(n - 1)\n    seen.add(n)\n",
        history=[],
        seen=set(),
    )
    pre = {"inner", "outer", "again", "history", "seen"}
    v = called("outer(1)\nf()", 2, ns, pre)
    assert effects(v) == {(1, "append", "history")}
    assert v.effects[0].again == (
        "call `outer`, whose line 2 `inner(x)` calls `inner`, whose line 2 "
        "`history.append(x)` appends to `history` again"
    )
    assert effects(called("again(3)\nf()", 2, ns, pre)) == {(1, "mutate_global", "seen")}


def test_functions_that_cannot_be_read_are_not_looked_into() -> None:
    ns: dict[str, Any] = {"history": []}
    exec("def lost(x):\n    history.append(x)\n", ns)  # no source kept anywhere
    ns["dumps"] = json.dumps  # defined in a module, not in the notebook
    ns["lam"] = notebook("lam = lambda x: history.append(x)\n", history=[])["lam"]
    pre = {"lost", "dumps", "lam", "history"}
    assert called("lost(1)\ndumps(history)\nlam(1)\nf()", 4, ns, pre).safe


def test_a_function_defined_in_the_cell_itself() -> None:
    cell = "def bump():\n    global step\n    step += 1\nbump()\nf()\n"
    ns = notebook(cell.replace("f()", "pass"), step=0)
    assert effects(called(cell, 5, ns, {"step"})) == {(4, "augassign_global", "step")}


def test_notebook_functions_in_a_real_shell(bare_shell: Any) -> None:
    bare_shell.run_cell("history = []\ndef log(x):\n    history.append(x)\n")
    v = analyse_rerun(
        "log(1)\ny = model(x)\n",
        failed_lineno=2,
        preexisting=set(bare_shell.user_ns),
        namespace=bare_shell.user_ns,
    )
    assert effects(v) == {(1, "append", "history")}


# ---- which branch of an `if` ran, from the values at the failure ----------------------------------

SAVE = """\
lr = 0.1
if iter_num > 0:
    torch.save(model, path)
else:
    history.append(lr)
y = model(x)
"""
SAVE_NAMES = {"iter_num", "torch", "model", "path", "history", "x"}


def branch(
    cell: str, failed: int, values: dict[str, Any], earlier: bool | None = False
) -> set[Any]:
    """The effects found, given the namespace at the failure: ``values``, every one pre-existing."""
    ns = {"__name__": "__main__", **values}
    return effects(called(cell, failed, ns, set(values), earlier=earlier))


def saves(found: set[tuple[int, str, str]]) -> bool:
    return any(kind == "file_write" for _, kind, _ in found)


def test_a_branch_not_taken_at_the_failure_did_not_run() -> None:
    # (a type alias in the namespace passes for a class with isinstance: it reads as nothing)
    ns = dict.fromkeys(SAVE_NAMES, None) | {"iter_num": 0, "history": [], "Ids": list[int]}
    assert branch(SAVE, 6, ns) == {(5, "append", "history")}  # the else ran, not the save
    # with earlier passes unknown, a test outside any loop ran once all the same
    assert branch(SAVE, 6, ns, earlier=None) == {(5, "append", "history")}
    # taken: the save ran and counts, the else did not run
    ns["iter_num"] = 3
    assert branch(SAVE, 6, ns) == {(3, "file_write", "torch.save(model, path)")}
    # elif chains, boolean operators, arithmetic, `in`, `is None`, constants
    cell = (
        "if iter_num % 2 == 0 and not done or mode in ('a', 'b'):\n    history.append(1)\n"
        "elif tag is None and -k < 0.5:\n    torch.save(model, path)\nf()\n"
    )
    ns = {"iter_num": 1, "done": False, "mode": "c", "tag": None, "k": 2.0, "history": []}
    assert branch(cell, 5, ns | {"torch": None, "model": None, "path": "p"}) == {
        (4, "file_write", "torch.save(model, path)")
    }
    assert branch(cell, 5, ns | {"iter_num": 2, "torch": None, "model": None, "path": "p"}) == {
        (2, "append", "history")
    }


def test_nanogpt_s_checkpoint_on_the_first_pass_did_not_run() -> None:
    cell = """\
    while True:
        lr = get_lr(iter_num)
        if iter_num % eval_interval == 0 and master_process:
            if losses['val'] < best_val_loss or always_save_checkpoint:
                best_val_loss = losses['val']
                if iter_num > 0:
                    torch.save(checkpoint, path)
        if iter_num == 0 and eval_only:
            break
        logits, loss = model(X, Y)
        iter_num += 1
    """
    ns = {"iter_num": 0, "eval_interval": 2, "master_process": True, "eval_only": False,
          "losses": {}, "best_val_loss": 1e9, "always_save_checkpoint": False, "get_lr": None,
          "torch": None, "checkpoint": None, "path": "p", "model": None, "X": 0, "Y": 0}  # fmt: skip
    assert not saves(branch(cell, 10, ns))
    # a later pass (iter_num += 1 ran): every line of the loop may have run, the save too
    assert saves(branch(cell, 10, ns | {"iter_num": 4}, earlier=True))
    assert saves(branch(cell, 10, ns | {"iter_num": 4}, earlier=None))


@pytest.mark.parametrize(
    ("cell", "values"),
    [
        # a call, an attribute, an item: not evaluated
        ("if should_save():\n    torch.save(m, p)\nf()\n", {"should_save": lambda: False}),
        ("if cfg.save:\n    torch.save(m, p)\nf()\n", {"cfg": type("C", (), {"save": False})}),
        ("if flags['save']:\n    torch.save(m, p)\nf()\n", {"flags": {"save": False}}),
        ("if (n := 0):\n    torch.save(m, p)\nf()\n", {"n": 0}),
        # values that are not plain: a list, a subclass of int (numpy's scalars are), a missing name
        ("if seen == []:\n    torch.save(m, p)\nf()\n", {"seen": [1]}),
        ("if n > 0:\n    torch.save(m, p)\nf()\n", {"n": type("I", (int,), {})(0)}),
        ("if ghost > 0:\n    torch.save(m, p)\nf()\n", {}),
        # comparisons Python would refuse, identity of numbers, sizes that take time
        ("if n > 'a':\n    torch.save(m, p)\nf()\n", {"n": 0}),
        ("if n is 1000:\n    torch.save(m, p)\nf()\n", {"n": 1000}),
        ("if n // 0:\n    torch.save(m, p)\nf()\n", {"n": 1}),
        ("if n * n < 0:\n    torch.save(m, p)\nf()\n", {"n": 2**70}),
        ("if n ** 2 > 0:\n    torch.save(m, p)\nf()\n", {"n": 0}),
        # rebound between the test and the failure: the test saw another value
        ("if step == 0:\n    torch.save(m, p)\nstep = 5\nf()\n", {"step": 5}),
        ("if step == 0:\n    torch.save(m, p)\nstep += 1\nf()\n", {"step": 1}),
        (
            "if step == 0:\n    torch.save(m, p)\nfor step in range(3):\n    pass\nf()\n",
            {"step": 2},
        ),
        ("if step == 0:\n    torch.save(m, p)\ndel step\nf()\n", {}),
        ("if step == 0:\n    torch.save(m, p)\nexec(code)\nf()\n", {"step": 1, "code": ""}),
        ("if step == 0:\n    torch.save(m, p)\nglobals().update(g)\nf()\n", {"step": 1, "g": {}}),
        ("if step == 0:\n    torch.save(m, p)\n%run bump.py\nf()\n", {"step": 1}),
        # a finished loop around the test ran it with every value the loop gave
        ("for i in range(3):\n    if i == 0:\n        torch.save(m, p)\nf()\n", {"i": 2}),
        ("while n < 3:\n    if n == 0:\n        torch.save(m, p)\n    n += 1\nf()\n", {"n": 3}),
    ],
)
def test_a_test_that_cannot_be_told_still_counts(cell: str, values: dict[str, Any]) -> None:
    ns = {"torch": None, "m": None, "p": "p", "f": None, **values}
    assert saves(branch(cell, cell.count("\n"), ns))


def test_a_test_rebound_in_earlier_passes_still_counts() -> None:
    # before the loop, but the loop's earlier passes changed `n` after the test read it
    cell = "if n == 0:\n    torch.save(m, p)\nfor b in xs:\n    y = model(b)\n    n += 1\n"
    ns = {"n": 3, "torch": None, "m": None, "p": "p", "xs": [], "model": None}
    assert saves(branch(cell, 4, ns, earlier=True))
    assert saves(branch(cell, 4, ns, earlier=None))
    # in the first pass the loop had not come back to `n += 1`: the test saw 3
    assert not saves(branch(cell, 4, ns))
    # without the namespace nothing is evaluated
    assert saves(found(cell, 4, set(ns)))


def test_a_test_a_notebook_function_may_rebind_still_counts() -> None:
    cell = "if step == 0:\n    torch.save(m, p)\nbump()\nf()\n"
    ns = notebook(
        "def bump():\n    global step\n    step += 1\n", step=1, torch=None, m=None, p="p"
    )
    assert saves(effects(called(cell, 4, ns, set(ns) - {"__name__"}, earlier=False)))
    # a method of a notebook class reached through an instance only, a function using
    # `globals()`, a generator in flight: may too; a function that binds nothing does not
    cls = "class T:\n    def go(self):\n        global step\n        step = 1\n"
    ns = notebook(cls, step=1, torch=None, m=None, p="p")
    ns["t"] = ns.pop("T")()
    assert saves(effects(called(cell, 4, ns, set(ns) - {"__name__"}, earlier=False)))
    gen = "def steps():\n    global step\n    while True:\n        step += 1\n        yield\n"
    ns = notebook(gen, step=1, torch=None, m=None, p="p")
    ns["it"] = ns.pop("steps")()
    next(ns["it"])
    assert saves(effects(called(cell, 4, ns, set(ns) - {"__name__"}, earlier=False)))
    for code, counts in (("def bump():\n    globals()['step'] = 1\n", True),
                         ("def bump():\n    return 1\n", False)):  # fmt: skip
        ns = notebook(code, step=1, torch=None, m=None, p="p")
        v = called(cell, 4, ns, set(ns) - {"__name__"}, earlier=False)
        assert saves(effects(v)) == counts


def test_a_test_inside_a_notebook_function_on_the_failing_path() -> None:
    fn = """\
    def train(model, x, every):
        if epoch > 0:
            torch.save(model, path)
        if every > 0:
            history.append(1)
        return model(x)
    """
    ns = notebook(fn, epoch=0, torch=None, path="p", history=[], model=None, x=None)
    pre = set(ns) - {"__name__"}
    line = 6  # `return model(x)`, as a line of the cell that defined `train`
    v = called("train(model, x, 0)\n", 1, ns, pre, frames=[("train", line)], earlier=False)
    # `epoch`, a global of the notebook: 0, no save; `every`, the function's own: not evaluated
    assert effects(v) == {(1, "append", "history")}
    ns["epoch"] = 2
    v = called("train(model, x, 0)\n", 1, ns, pre, frames=[("train", line)], earlier=False)
    assert saves(effects(v))
    # a call that ran before the failing line: where its tests stood then is not known
    ns["epoch"] = 0
    v = called("train(model, x, 0)\nf()\n", 2, ns, pre, earlier=False)
    assert saves(effects(v))


def test_the_first_pass_s_loop_variable_is_the_one_at_the_failure() -> None:
    cell = "for step in range(n):\n    if step > 0:\n        torch.save(m, p)\n    y = model(x)\n"
    ns = {"step": 0, "n": 3, "torch": None, "m": None, "p": "p", "model": None, "x": None}
    assert not saves(branch(cell, 4, ns))
    assert saves(branch(cell, 4, ns | {"step": 1}))
    # `step` is the pass's own: 0 is the first pass, whatever else says there were earlier ones
    assert not saves(branch(cell, 4, ns, earlier=True))
    assert saves(branch(cell, 4, ns | {"step": 2}, earlier=True))


def test_a_closure_s_names_are_not_the_notebook_s_globals() -> None:
    fn = """\
    def make(epoch):
        def train(x):
            if epoch > 0:
                torch.save(x, path)
            return model(x)
        return train
    """
    ns = notebook(fn, epoch=0, torch=None, path="p", model=None, x=None)
    ns["train"] = ns["make"](5)  # its `epoch` is 5, the global 0
    pre = set(ns) - {"__name__"}
    v = called("train(x)\n", 1, ns, pre, frames=[("make.<locals>.train", 5)], earlier=False)
    assert saves(effects(v))


@pytest.mark.parametrize(("at_failure", "later", "ran"), [(3, 0, True), (0, 3, False)])
def test_an_if_test_is_read_as_it_was_at_the_failure(
    shell: Any, at_failure: int, later: int, ran: bool
) -> None:
    """A cell run after the failure rebinds the test's name: the guard still reads the value it
    held when the cell failed. Were it read now, `iter_num = 0` after a failure at 3 would hide
    the append that ran, and a re-run would append again without a word."""
    pytest.importorskip("torch")
    import jupyter_gpumem
    from jupyter_gpumem.fixes import ladder as rescue

    shell.run_cell("%gpumem simulate 64MiB")
    shell.run_cell(f"import torch\nsaved = []\niter_num = {at_failure}")
    cell = (
        "if iter_num > 0:\n"
        "    saved.append(iter_num)\n"
        "x = torch.empty(2**30, dtype=torch.uint8, device='cuda')\n"
    )
    assert not shell.run_cell(cell).success
    assert shell.run_cell(f"iter_num = {later}").success
    verdict = rescue.guard(jupyter_gpumem.last_failure(shell), shell.user_ns)
    assert [e.lineno for e in verdict.effects] == ([2] if ran else []), verdict.summary()

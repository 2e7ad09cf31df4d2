"""One reading of a cell's source: what the guard, the batch search and the failure record share."""

from __future__ import annotations

import ast

import pytest

from jupyter_gpumem.cells import source as cellsource
from jupyter_gpumem.cells.source import ipython_call, read


def test_plain_python_is_its_own_reading() -> None:
    src = "x = 1\ny = f(x)\n"
    r = read(src)
    assert r.python == src and r.magic is None and r.why is None and not r.changed
    assert r.tree is not None and [s.lineno for s in r.tree.body] == [1, 2]


def test_readings_are_cached_and_new_trees_are_not_shared() -> None:
    src = "a = 1\nb = 2\n"
    assert read(src) is read(src)
    tree = read(src).new_tree()
    assert tree is not None and tree is not read(src).tree
    tree.body.clear()
    assert read(src).tree is not None and len(read(src).tree.body) == 2


def test_ipython_syntax_keeps_the_cells_lines() -> None:
    r = read("%time step += 1\nx = 1\n!ls\nfiles = !ls\nmodel?\n")
    assert r.changed == {1, 3, 4, 5}
    assert r.tree is not None
    calls = [ipython_call(s.value) for s in r.tree.body if isinstance(s, (ast.Expr, ast.Assign))]
    assert [(c.kind, c.name, c.arg) if c else None for c in calls] == [
        ("magic", "time", "step += 1"),
        None,
        ("shell", "", "ls"),
        ("shell", "", "ls"),
        ("magic", "pinfo", "model"),
    ]
    assert [s.lineno for s in r.tree.body] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("source", "magic", "python"),
    [
        ("%%time\nstep += 1\n", "time", "\nstep += 1\n"),
        ("%%capture out\n%%time\nx = 1\n", "capture", "\n\nx = 1\n"),
        ("%%mprun -f f\nf()\n", "mprun", "\nf()\n"),
    ],
)
def test_python_cell_magics_read_their_body_on_the_cells_lines(
    source: str, magic: str, python: str
) -> None:
    r = read(source)
    assert (r.magic, r.python, r.why) == (magic, python, None)
    assert r.tree is not None and r.tree.body[-1].lineno == source.count("\n")


def test_what_is_not_python_says_why() -> None:
    assert read("%%bash\nls\n").why == "this cell runs the cell magic %%bash, not Python"
    assert read("%%bash\nls\n").tree is None
    why = read("%%time\nx = 1\ny = (\n").why
    assert why is not None and why.startswith("this cell does not parse (line 3: ")  # the cell's
    assert read("%time f(a, \\\n  b)\n").why == (
        "IPython syntax in this cell moves its lines: cannot read or edit it line by line"
    )
    for hostile in ["", "%", "!", "?", "%%", "\x00", "x = (\n"]:
        read(hostile)  # never raises


def test_cell_magic_is_read_as_ipython_reads_it() -> None:
    assert cellsource.cell_magic("%%time -n 3\nx\n") == "time"
    assert cellsource.cell_magic("%%\nx\n") == ""
    assert cellsource.cell_magic(" %%time\nx\n") is None
    assert cellsource.cell_magic("x = 1\n") is None


def test_lines_are_numbered_as_python_numbers_them() -> None:
    assert cellsource.lines("a\r\nb\rc\x0cd\n") == ["a", "b", "c\x0cd", ""]
    assert cellsource.lines_with_ends("a\r\nb\n") == ["a\r\n", "b\n"]


def test_names() -> None:
    assert cellsource.dotted(ast.parse("a.b.c", mode="eval").body) == "a.b.c"
    assert cellsource.dotted(ast.parse("a().b", mode="eval").body) is None
    assert cellsource.short("x" * 70) == "x" * 59 + "…"
    assert cellsource.short("abc", 3) == "abc"


def test_ipython_call_reads_only_what_ipython_writes() -> None:
    def call(text: str) -> cellsource.IPythonCall | None:
        return ipython_call(ast.parse(text, mode="eval").body)

    assert call("get_ipython().system('ls')") == cellsource.IPythonCall("shell", "", "ls")
    assert call("get_ipython().show_usage()") == cellsource.IPythonCall("help", "", "")
    assert call("get_ipython().system(cmd)") is None
    assert call("shell.system('ls')") is None
    assert call("get_ipython().run_cell('x')") is None


# ---- the names a cell uses: one reading for the failure record, the snapshot and Move to CPU ----


def _notebook(code: str) -> dict[str, object]:
    ns: dict[str, object] = {"__name__": "__main__"}
    exec(compile(code, "<cell>", "exec"), ns)
    return ns


def test_names_used_are_the_cells_scopes_read_by_the_symbol_table() -> None:
    src = (
        "import os\n"
        "x = trainer.model.fc(batch)\n"
        "def f(a):\n"
        "    global g\n"
        "    g = a + y\n"
        "    return [q for q in rows]\n"
        "lam = lambda t: t + u\n"
        "class C:\n"
        "    k = m\n"
        "del old\n"
    )
    names = cellsource.names_used(src)
    # a chain by its root, globals of functions, lambdas, classes; no parameter, no local
    assert {
        "os",
        "x",
        "trainer",
        "batch",
        "f",
        "g",
        "y",
        "rows",
        "lam",
        "u",
        "C",
        "m",
        "old",
    } <= names
    assert not {"a", "q", "t", "k", "model", "fc"} & names


def test_names_used_reach_the_notebook_code_the_cell_calls() -> None:
    """`trainer.fit()` uses what `Trainer.fit` reads, `step()` what its helper reads; a bound
    method and a partial lead to their functions. Nothing of a module's code is read."""
    ns = _notebook(
        "import functools, json\n"
        "class Trainer:\n"
        "    def fit(self):\n"
        "        return helper() + self.model\n"
        "def helper():\n"
        "    return cfg\n"
        "def step(n):\n"
        "    return history\n"
        "trainer = Trainer()\n"
        "fit = trainer.fit\n"
        "part = functools.partial(step, 1)\n"
    )
    assert {"trainer", "helper", "cfg"} <= cellsource.names_used("trainer.fit()\n", ns)
    assert {"fit", "helper", "cfg"} <= cellsource.names_used("fit()\n", ns)
    assert {"part", "history"} <= cellsource.names_used("part()\n", ns)
    assert "model" not in cellsource.names_used("trainer.fit()\n", ns)  # an attribute, not a name
    assert cellsource.names_used("json.dumps(1)\n", ns) == {"json"}


def test_names_used_fall_back_where_the_symbol_table_refuses() -> None:
    """Top-level `await` parses but the compiler refuses it; a cell that does not parse is read
    by its words. Neither raises."""
    assert cellsource.names_used("x = await fetch(url)\n") == {"x", "fetch", "url"}
    assert {"model", "x"} <= cellsource.names_used("y = model(x\n")
    assert {"step"} <= cellsource.names_used("%time step += 1\n")

"""The guard's vocabulary: which calls, methods and modules change something, what IPython
syntax does (``%time x += 1`` adds, ``!rm`` runs a command, ``model?`` nothing), and the small
readings of one expression the walk is made of. Plain data and pure functions of ``ast`` nodes."""

from __future__ import annotations

import ast
import re

from jupyter_gpumem.cells import source as cellsource
from jupyter_gpumem.guard.verdict import SideEffect, quoted

# ---- reading IPython cells -------------------------------------------------------------------------

SHELL = "__gpumem_shell__"  # stands for a `!command` line, so it counts only where it ran
RUN_IN_NAMESPACE = "__gpumem_run_i__"  # stands for `%run -i script.py`, given the script
STMT_MAGICS = cellsource.STATEMENT_MAGICS  # line magics running a statement
OPTIONS = cellsource.MAGIC_OPTIONS  # `%timeit -n 3 -r 2 f()`: the options
RUN_OPTIONS = re.compile(r"^(?:-[A-Za-z]+\s+)*")  # `%run -i -e script.py`: the flags
HARMLESS_SHELL = re.compile(
    r"^\s*(?:nvidia-smi|ls|pwd|cat|head|tail|echo|which|df|du|free|nvcc|uname|hostname|date|"
    r"whoami|wc|grep|ps|nproc|lscpu|pip3? +(?:install|list|show|freeze))\b[^>;&]*$"
)


def read_cell(source: str) -> ast.Module | SideEffect | None:
    """The cell's syntax tree (``cells.source``'s reading, its IPython syntax as the Python effects
    it has), or a whole-cell effect; None for a cell that cannot be read."""
    reading = cellsource.read(source)
    name = reading.magic
    if name is not None and name not in cellsource.PYTHON_CELL_MAGICS:
        text = cellsource.lines(source)[0].strip()
        if name in ("writefile", "file"):
            path = text.split()[-1]
            why = f"writes `{path}`; a re-run writes it again"
            return SideEffect(1, "file_write", path, text, why, f"write `{path}` again")
        if name in cellsource.SHELL_CELL_MAGICS:
            why = "runs a script; a re-run runs it again"
            return SideEffect(1, "io_call", name, text, why, "run the script again")
        if name in cellsource.TEXT_CELL_MAGICS:
            return ast.Module(body=[], type_ignores=[])
        return None
    tree = reading.new_tree()
    if tree is None or not reading.changed:
        return tree
    try:
        return ast.fix_missing_locations(IPythonEffects(reading.changed).visit(tree))
    except (SyntaxError, ValueError):  # `%time` of something that is not Python
        return None


class IPythonEffects(ast.NodeTransformer):
    """IPython's calls on the lines it rewrote, as Python with the same effects we look for:
    ``%time step += 1`` is ``step += 1``, ``!rm -rf out`` a shell command, ``%matplotlib`` and
    ``model?`` nothing."""

    def __init__(self, changed: frozenset[int]) -> None:
        self.changed = changed

    def call(self, node: ast.expr) -> cellsource.IPythonCall | None:
        return cellsource.ipython_call(node) if node.lineno in self.changed else None

    def visit_Expr(self, node: ast.Expr) -> ast.AST | list[ast.stmt]:
        call = self.call(node.value)
        if call is None:
            return node
        if call.kind == "magic" and call.name in STMT_MAGICS:
            stmt = OPTIONS.sub("", call.arg.strip())
            if not stmt:
                return ast.copy_location(ast.Pass(), node)
            body = ast.parse(stmt).body
            for s in body:
                ast.increment_lineno(s, node.lineno - 1)
            return body
        value = self.value(call, node.value)
        if isinstance(value, ast.Constant):
            return ast.copy_location(ast.Pass(), node)
        return ast.copy_location(ast.Expr(value=value), node)

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        call = self.call(node.value)
        if call is None:
            return node
        if call.kind == "magic" and call.name in STMT_MAGICS:
            stmt = OPTIONS.sub("", call.arg.strip())
            if stmt:
                value = ast.increment_lineno(ast.parse(stmt, mode="eval").body, node.lineno - 1)
            else:
                value = ast.copy_location(ast.Constant(None), node.value)
        else:
            value = self.value(call, node.value)
        node.value = value
        return node

    @staticmethod
    def value(call: cellsource.IPythonCall, at: ast.expr) -> ast.expr:
        """A shell command that changes things is a call of ``SHELL``, ``%run -i script.py`` one
        of ``RUN_IN_NAMESPACE`` given the script; anything else nothing."""
        if call.kind == "magic" and call.name == "run":
            arg = call.arg.strip()
            flags = RUN_OPTIONS.match(arg)
            if flags is not None and "i" in flags.group(0).replace("-", ""):
                script = ast.Constant(arg[flags.end() :].strip() or "a script")
                marker = ast.Call(ast.Name(RUN_IN_NAMESPACE, ast.Load()), [script], [])
                return ast.copy_location(marker, at)
        shell = call.kind == "shell" or (call.kind == "magic" and call.name in ("sx", "system"))
        if not shell or HARMLESS_SHELL.match(call.arg):
            return ast.copy_location(ast.Constant(None), at)
        return ast.copy_location(ast.Call(ast.Name(SHELL, ast.Load()), [], []), at)


# ---- what counts ----------------------------------------------------------------------------------

ADDS = {"append", "extend", "insert", "appendleft", "extendleft"}
CHANGES = {
    "pop": "pop from", "popleft": "pop from", "popitem": "pop from", "remove": "remove from",
    "discard": "discard from", "clear": "clear", "update": "update", "add": "add to",
    "setdefault": "set a default in", "sort": "sort", "reverse": "reverse", "rotate": "rotate",
    "__setitem__": "set an item of", "__delitem__": "delete an item of", "__iadd__": "add to",
    "addHandler": "add a handler to", "removeHandler": "remove a handler from",
    "addFilter": "add a filter to",
}  # fmt: skip
INPLACE = re.compile(r"^[a-z][a-z0-9_]*(?<!_)_$")  # torch's in-place methods: add_, mul_, copy_
NOT_DATA = {"requires_grad_", "share_memory_", "retain_grad_"}
VIEWS = {"detach", "view", "view_as", "narrow", "select", "squeeze", "unsqueeze", "t", "get",
          "setdefault"}  # fmt: skip
SAME = {"to", "cuda", "cpu", "eval", "train", "detach", "contiguous"}  # twice is once
MODULES = {
    "torch", "nn", "F", "init", "optim", "np", "numpy", "pd", "pandas", "os", "sys", "shutil",
    "json", "pickle", "math", "random", "time", "re", "io", "pathlib", "subprocess", "itertools",
    "functools", "collections", "plt", "matplotlib", "sns", "tqdm", "wandb", "mlflow", "logging",
    "gc", "warnings", "joblib", "yaml", "csv", "glob", "copy", "datetime", "tempfile", "requests",
    "torchvision", "transformers", "accelerate", "jax", "jnp", "tf", "scipy", "sklearn", "cv2",
    "gzip", "bz2", "lzma", "codecs", "tarfile", "zipfile", "h5py", "einops",
}  # fmt: skip
SAVES = {"save", "savez", "savez_compressed", "savetxt", "save_file", "save_pretrained",
          "save_model", "savefig", "tofile", "write_text", "write_bytes", "touch", "unlink",
          "rmdir", "symlink_to", "hardlink_to"}  # fmt: skip
EXPORTS = re.compile(r"^to_(?:csv|parquet|json|pickle|excel|hdf|feather|netcdf|sql|zarr|stata)$")
OS_WRITES = {"remove", "unlink", "rename", "renames", "replace", "rmdir", "removedirs",
              "makedirs", "mkdir", "symlink", "link", "truncate", "chmod", "chown"}  # fmt: skip
IO_CALLS = {"os.system", "os.popen", "subprocess.run", "subprocess.call", "subprocess.Popen",
             "subprocess.check_call", "subprocess.check_output", "requests.post", "requests.put",
             "requests.patch", "requests.delete", "wandb.log", "mlflow.log_metric",
             "mlflow.log_metrics", "mlflow.log_param", "mlflow.log_params",
             "mlflow.log_artifact"}  # fmt: skip
IO_METHODS = {"add_scalar", "add_scalars", "add_histogram", "add_image", "add_figure",
               "add_text", "log_metrics", "log_hyperparams"}  # fmt: skip
SHUTIL_READS = {"which", "disk_usage", "get_terminal_size"}
STD_STREAMS = ("sys.stdout", "sys.stderr")
HEAPQ = {"heappush", "heappop", "heapify", "heapreplace", "heappushpop", "heappush_max",
          "heappop_max", "heapify_max", "heapreplace_max", "heappushpop_max"}  # fmt: skip
RUN_CELL = {"run_cell", "run_line_magic", "run_cell_magic"}  # get_ipython().run_cell(...)
SQL_CALLS = {"execute", "executemany", "executescript", "commit"}
LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "exception": 40,
              "critical": 50, "fatal": 50, "log": 0}  # fmt: skip
THREAD_CALLS = {"_thread.start_new_thread", "_thread.start_new"}
# calls a `for` header takes items through, and how many leading arguments are not iterated
WRAPPERS = {"enumerate": 0, "zip": 0, "tqdm": 0, "islice": 0, "chain": 0, "map": 1,
            "filter": 1, "starmap": 1, "cycle": 0}  # fmt: skip
SQL_READS = {"SELECT", "WITH", "PRAGMA", "EXPLAIN", "SHOW", "DESCRIBE", "DESC", "VALUES"}
SQL_WRITES = {"INSERT", "UPDATE", "DELETE", "REPLACE", "UPSERT", "MERGE", "CREATE", "DROP",
               "ALTER", "TRUNCATE", "COPY", "GRANT", "REVOKE", "VACUUM"}  # fmt: skip
DB_NAME = re.compile(r"cur|conn|\bcon\b|db|sql|session|engine")
PARTLY = " (on the failing line: it may have done part of it before running out of memory)"
OPEN_MODE = re.compile(r"^[rwxabtU+]{1,4}(?::\w*)?$")
STATE_KW = {"params", "parameters", "model", "module", "optimizer"}
AUG_VERBS = {ast.Add: "add to", ast.Sub: "subtract from", ast.Mult: "multiply",
              ast.Div: "divide", ast.FloorDiv: "divide", ast.Mod: "reduce",
              ast.BitOr: "merge into", ast.MatMult: "multiply"}  # fmt: skip


# ---- small helpers --------------------------------------------------------------------------------


def shown(node: ast.AST | None) -> str:
    return "" if node is None else quoted(ast.unparse(node))


def chain_root(node: ast.AST | None, *, calls: bool) -> str | None:
    """The name an attribute/item/view chain starts from (``calls``: any method call too)."""
    while node is not None:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, (ast.Attribute, ast.Subscript, ast.Starred)):
            node = node.value
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and (calls or node.func.attr in VIEWS)
        ):
            node = node.func.value
        else:
            return None
    return None


def arg_of(c: ast.Call, pos: int, kw: str) -> ast.expr | None:
    for k in c.keywords:
        if k.arg == kw:
            return k.value
    return c.args[pos] if len(c.args) > pos else None


def reads_name(node: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node))


def same_object(value: ast.expr, name: str) -> bool:
    """``x.to(device)``, ``model.cuda().eval()``: doing it twice is doing it once."""
    while isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute):
        if value.func.attr not in SAME:
            return False
        value = value.func.value
    return isinstance(value, ast.Name) and value.id == name


def mutates(method: str) -> bool:
    return (
        method in ADDS
        or method in CHANGES
        or bool(INPLACE.match(method) and method not in NOT_DATA)
    )


def has_grad(node: ast.AST) -> bool:
    """``p.grad...``: gradients, which the next backward recomputes."""
    return any(isinstance(n, ast.Attribute) and n.attr == "grad" for n in ast.walk(node))


def zeroes(node: ast.AST) -> bool:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr == "zero_grad" or (node.func.attr == "zero_" and has_grad(node.func))
    return isinstance(node, ast.Assign) and any(
        isinstance(t, ast.Attribute) and t.attr == "grad" for t in node.targets
    )


def takes_from_queue(c: ast.Call, attr: str) -> bool:
    """``q.put(x)``, ``q.put_nowait(x)``, ``q.get_nowait()``, ``q.get()`` (a dict's get needs a key)."""
    if attr in ("put", "put_nowait", "get_nowait"):
        return True
    return attr == "get" and not c.args and all(k.arg in ("block", "timeout") for k in c.keywords)


def pure(node: ast.expr) -> bool:
    """A string constant holding an expression with no calls: ``eval("2 * 3")``."""
    if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
        return False
    try:
        tree = ast.parse(node.value, mode="eval")
    except (SyntaxError, ValueError):
        return False
    return not any(isinstance(n, (ast.Call, ast.NamedExpr, ast.Await)) for n in ast.walk(tree))


def sql_text(node: ast.expr) -> str | None:
    """The constant SQL text ``node`` starts with."""
    while isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
        node = node.left
    if isinstance(node, ast.JoinedStr) and node.values:
        node = node.values[0]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
        node = node.args[0]  # text("INSERT ...") in SQLAlchemy
    if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
        return None
    return node.value


def sql_verb(node: ast.expr) -> str | None:
    """The first keyword of the SQL text ``node`` starts with, when it starts with a constant."""
    text = sql_text(node)
    if text is None:
        return None
    text = re.sub(r"^(?:\s+|--[^\n]*\n?|/\*.*?\*/|\()*", "", text, flags=re.S)
    m = re.match(r"[A-Za-z]+", text)
    return m.group(0).upper() if m else None


SQL_WRITE_WORD = re.compile(r"\b(?:INSERT|UPDATE|DELETE|REPLACE|MERGE|UPSERT)\b", re.I)
SQL_LITERAL = re.compile(r"'(?:[^']|'')*'")


def sql_writes(node: ast.expr) -> bool:
    """A ``WITH`` statement that ends in a write: ``WITH t AS (...) INSERT INTO ...`` (the words
    in its string literals aside)."""
    text = sql_text(node)
    return text is not None and bool(SQL_WRITE_WORD.search(SQL_LITERAL.sub("''", text)))

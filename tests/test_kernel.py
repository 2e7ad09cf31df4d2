"""The extension in a real ipykernel, driven by jupyter_client, as a notebook would use it."""

from __future__ import annotations

import pytest

from tests.conftest import Kernel

pytestmark = pytest.mark.kernel


def test_oom_in_a_real_kernel_diagnosis_and_memory_back(kernel: Kernel) -> None:
    k = kernel
    assert k.run("%load_ext jupyter_gpumem")["reply"]["status"] == "ok"
    k.run("%gpumem simulate 1GiB")
    k.run("import torch\nkeep = torch.empty(100 * 2**20, dtype=torch.uint8, device='cuda')")
    r = k.run(
        "def step():\n"
        "    acts = torch.empty(400 * 2**20, dtype=torch.uint8, device='cuda')\n"
        "    return acts, torch.empty(800 * 2**20, dtype=torch.uint8, device='cuda')\n"
        "step()"
    )
    # the cell is reported as failed, with torch's own error
    assert r["reply"]["status"] == "error"
    assert r["reply"]["ename"] == "OutOfMemoryError"
    errors = [o for o in r["outputs"] if o["type"] == "error"]
    assert len(errors) == 1 and "Tried to allocate 800.00 MiB" in errors[0]["evalue"]
    displays = [o for o in r["outputs"] if o["type"] == "display_data"]
    assert displays, r["outputs"]
    bundle = displays[-1]["data"]
    assert "text/html" in bundle
    plain = bundle["text/plain"]
    assert "Tried to allocate 800 MiB" in plain
    assert "of 1.00 GiB" in plain
    assert "acts in step()" in plain
    assert "Freed 400 MiB that the failed cell pinned" in plain
    # outputs come in order: the traceback, then the diagnosis
    kinds = [o["type"] for o in r["outputs"]]
    assert kinds.index("error") < kinds.index("display_data")
    after = k.run("print(torch.cuda.memory_allocated() // 2**20)")
    assert Kernel.text(after).strip() == "100"


def test_zero_division_is_exactly_ipythons_own(kernel: Kernel) -> None:
    k = kernel
    without = k.run("1/0")
    k.run("%load_ext jupyter_gpumem")
    with_ext = k.run("1/0")
    strip = [o for o in with_ext["outputs"] if o["type"] == "error"]
    base = [o for o in without["outputs"] if o["type"] == "error"]
    assert len(strip) == len(base) == 1
    assert strip[0]["ename"] == base[0]["ename"] == "ZeroDivisionError"
    # the tracebacks differ only in the cell number
    import re

    norm = re.compile(r"In\[\d+\]|line \d+|Cell In\[\d+\]")
    assert [norm.sub("", t) for t in strip[0]["traceback"]] == [
        norm.sub("", t) for t in base[0]["traceback"]
    ]
    assert len(with_ext["outputs"]) == len(without["outputs"])


def test_retry_and_oomsafe_in_a_real_kernel(kernel: Kernel) -> None:
    """tests/test_fixes.py's cell in a real kernel: Reduce batch sizes it (no loop) for two runs in
    a row, at >= 95% of the largest batch that fits twice, bisected on fresh simulated cards in
    this process (120 when measured; 216 fits one run)."""
    from tests.test_fixes import largest_fit

    best = largest_fit(runs=2)
    k = kernel
    k.run("%load_ext jupyter_gpumem\n%gpumem simulate 160MiB")
    k.run(
        "import torch\nmodel = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(),"
        " torch.nn.Linear(2048, 1024)).cuda()"
    )
    cell = (
        "batch_size = 256\n"
        'x = torch.randn(batch_size, 32, 1024, device="cuda")\n'
        "out = model(x).sum()\n"
    )
    r = k.run(cell)
    assert r["reply"]["status"] == "error"
    retry = Kernel.text(k.run("%gpumem retry batch"))
    assert "Fits at batch" in retry and "To make it permanent: change line 1 to" in retry
    value = int(Kernel.text(k.run("print(batch_size)")).strip())
    assert 0.95 * best <= value <= best, (value, best)
    k.run("del x, out, batch_size")
    safe = k.run("%%oomsafe --fixes batch\n" + cell.replace("256", "300"))
    assert safe["reply"]["status"] == "ok"
    text = Kernel.text(safe)
    assert "oomsafe: Fits at batch" in text
    k.run("step = 0")
    guarded = k.run("%%oomsafe\nstep += 1\n" + cell.replace("256", "300"))
    assert "stopped before re-running" in Kernel.text(guarded)
    assert Kernel.text(k.run("print(step)")).strip() == "1"


def test_retry_offers_apply_to_cell_for_the_failed_cells_own_line(kernel: Kernel) -> None:
    """In a notebook (cellId in the request's metadata, as JupyterLab 4 sends it), the fix's
    change comes with the bundle the lab extension draws as an "Apply to cell" button."""
    k = kernel
    k.run("%load_ext jupyter_gpumem\n%gpumem simulate 160MiB\nimport torch")
    cell = 'batch_size = 64\nx = torch.randn(batch_size, 2 << 20, device="cuda")'
    msg = k.kc.session.msg(
        "execute_request",
        {
            "code": cell,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
    )
    msg["metadata"]["cellId"] = "cell-abc"
    k.kc.shell_channel.send(msg)
    reply = k.kc.get_shell_msg(timeout=60)
    while reply["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
        reply = k.kc.get_shell_msg(timeout=60)
    assert reply["content"]["status"] == "error"
    r = k.run("%gpumem retry batch", timeout=120)
    bundles = [o["data"] for o in r["outputs"] if o["type"] == "display_data"]
    offers = [b for b in bundles if "application/vnd.jupyter-gpumem.change+json" in b]
    assert offers, Kernel.text(r)
    change = offers[0]["application/vnd.jupyter-gpumem.change+json"]
    assert change["cell_id"] == "cell-abc" and change["line"] == 1
    assert change["old"] == "batch_size = 64"
    assert change["new"].startswith("batch_size = ") and change["new"] != change["old"]

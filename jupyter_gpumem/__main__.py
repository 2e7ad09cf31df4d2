"""``python -m jupyter_gpumem demo``: watch the extension catch a real out-of-memory error.

A real IPython shell loads the extension and runs the cells a notebook user would. On a machine
with a CUDA GPU the card is capped to 1 GiB (``%gpumem limit``); elsewhere a simulated 1 GiB GPU
stands in, and the OOM is the same ``torch.OutOfMemoryError``.
"""

from __future__ import annotations

import argparse
import sys

SETUP = """\
import torch
leftover = torch.randn(64, 1024, 1024, device="cuda")   # 256 MiB from an earlier experiment
model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)]).to("cuda")

def forward(batch_size):
    x = torch.randn(batch_size, 2048, device="cuda")
    return model(x).sum()
"""
FAILING = "loss = forward(batch_size=16384)   # activations of 8 layers: 1 GiB"
AFTER = 'print(f"allocated now: {torch.cuda.memory_allocated() / 2**20:.0f} MiB")'


def _rule(title: str) -> None:
    print(f"\n\033[1m── {title} {'─' * max(0, 70 - len(title))}\033[0m")


def _cell(shell: object, source: str) -> None:
    first, *rest = source.rstrip().splitlines()
    print("  In : " + first)
    for line in rest:
        print(" ...: " + line)
    shell.run_cell(source, store_history=True)  # type: ignore[attr-defined]


def demo() -> int:
    try:
        import torch
    except ImportError:
        print("The demo needs torch: pip install torch", file=sys.stderr)
        return 1
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance(colors="nocolor")
    _rule("1. load the extension")
    _cell(shell, "%load_ext jupyter_gpumem")
    if torch.cuda.is_available():
        _rule("2. a real GPU: cap this process to 1 GiB to rehearse a small card")
        _cell(shell, "import torch; torch.zeros(1, device='cuda'); %gpumem limit 1GiB")
    else:
        _rule("2. no GPU here: a simulated 1 GiB GPU stands in")
        _cell(shell, "%gpumem simulate 1GiB")
    _rule("3. a model, and a tensor left over from an earlier cell")
    _cell(shell, SETUP)
    _cell(shell, "%gpumem status")
    _rule("4. a cell that runs out of memory")
    _cell(shell, FAILING)
    _rule("5. the next cell: the memory the failed call pinned is already back")
    _cell(shell, AFTER)
    print(
        "\nWithout jupyter_gpumem, the failed call's activations stay allocated until the kernel "
        "restarts;\ntorch.cuda.empty_cache() frees none of them. In Jupyter the diagnosis comes "
        "with fix buttons."
    )
    _cell(shell, "%unload_ext jupyter_gpumem")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jupyter_gpumem")
    parser.add_argument("command", choices=["demo"], help="demo: catch and explain a real OOM")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo()
    return 2


if __name__ == "__main__":
    sys.exit(main())

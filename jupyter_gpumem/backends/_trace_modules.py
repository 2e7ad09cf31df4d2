"""Which model module's forward is running, per thread, for tracing allocations to modules.

Global ``nn.Module`` forward hooks keep a per-thread stack of the modules whose forward is running,
so an allocation knows the module it came from (``layer4.1.conv2``) as a token: the id of the
outermost module and the path below it, read from ``named_modules`` once per model (again when a
module is added). On CUDA the token travels with each allocation as the allocator's user metadata
(``_set_memory_metadata``), where torch has it. The hooks cost a few microseconds per module call,
which is why tracing can leave them out.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

ModuleToken = tuple[int, str]  # (id of the outermost module running, path below it)

_META = "jupyter_gpumem:"  # prefix of the user metadata we attach on CUDA
_local = threading.local()
_roots: dict[int, tuple[weakref.ref[Any], dict[int, str]]] = {}  # id(root) -> (root, id -> path)
_hooks: list[Any] = []
_set_metadata: Any = None  # torch's _set_memory_metadata while CUDA tracing is on


def _path_in(root: Any, module: Any) -> str:
    entry = _roots.get(id(root))
    if entry is None or entry[0]() is not root:
        entry = _roots[id(root)] = (weakref.ref(root), {})
    names = entry[1]
    path = names.get(id(module))
    if path is None:  # first call, or a module added since: read the tree again, once
        names.update({id(m): name for name, m in root.named_modules()})
        path = names.setdefault(id(module), type(module).__name__)
    return path


def _enter(module: Any, _args: Any) -> None:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    if stack:
        root = stack[-1][0]
        token = (id(root), _path_in(root, module))
    else:
        root, token = module, (id(module), "")
        _path_in(module, module)
    stack.append((root, token, module))
    if _set_metadata is not None:
        _set_metadata(f"{_META}{token[0]}:{token[1]}")


def _leave(module: Any, _args: Any, _output: Any) -> None:
    stack = getattr(_local, "stack", None)
    while stack:  # always_call hooks run on errors too; pop to this module whatever happened
        if stack.pop()[2] is module:
            break
    if _set_metadata is not None:
        _set_metadata(f"{_META}{stack[-1][1][0]}:{stack[-1][1][1]}" if stack else "")


def current_module() -> ModuleToken | None:
    """The module whose forward runs on this thread, innermost, as a token."""
    stack = getattr(_local, "stack", None)
    return stack[-1][1] if stack else None


def module_root(token: ModuleToken) -> Any:
    """The outermost module of a token, while it is alive (else None)."""
    entry = _roots.get(token[0])
    return None if entry is None else entry[0]()


def add_hooks(torch: Any, set_metadata: Any = None) -> None:
    """Track which module's forward runs, on every thread; with ``set_metadata`` (torch's
    ``_set_memory_metadata``, CUDA tracing), tag each allocation with it too."""
    global _set_metadata
    _set_metadata = set_metadata
    register = torch.nn.modules.module
    _hooks.append(register.register_module_forward_pre_hook(_enter))
    try:
        _hooks.append(register.register_module_forward_hook(_leave, always_call=True))
    except TypeError:  # torch 2.0: no always_call; _leave still pops past what an error skipped
        _hooks.append(register.register_module_forward_hook(_leave))


def remove_hooks() -> None:
    """Take the hooks off and stop tagging allocations. Safe to call again."""
    global _set_metadata
    for handle in _hooks:
        handle.remove()
    _hooks.clear()
    _local.__dict__.pop("stack", None)
    if _set_metadata is not None:
        try:
            _set_metadata("")
        except Exception:
            pass
    _set_metadata = None


def forget_models() -> None:
    """Forget the models seen (their module paths), when tracing stops."""
    _roots.clear()


def token(meta: object) -> ModuleToken | None:
    """The module token in an allocation's user metadata (CUDA), None when it has none of ours."""
    if not isinstance(meta, str) or not meta.startswith(_META):
        return None
    root, _, path = meta[len(_META) :].partition(":")
    try:
        return int(root), path
    except ValueError:
        return None

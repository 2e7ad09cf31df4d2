"""Rehearsals cannot touch the world: the first write that would leave the kernel's memory ends one.

A rehearsal (a probe of a fix) runs the user's code for real and is rolled back afterwards; a
rollback can put back what lives in the kernel's memory, never a line appended to a file, a row
sent to a database or a command run by the shell. So while a rehearsal runs, a Python audit hook
(``sys.addaudithook``: installed once per process, since an audit hook cannot be removed, and
idle outside a rehearsal) raises :class:`WorldTouched` at the first such event on the rehearsal's
thread: ``open`` for writing, appending or creating, removing, renaming or making files and
folders, ``shutil``'s copies and moves, starting a process (``subprocess``, ``os.system``, the
pseudo-terminal IPython's ``!cmd`` runs in), connecting or sending on a socket, opening an
SQLite database. The rehearsal ends there with what it measured; reading files stays allowed.

What the hook cannot see (writes through a file object opened before the rehearsal:
``print(..., file=f)``, a ``csv.writer``, a logging handler's stream) is undone by the
transaction, which puts such files back to their size and position (``transaction``).

Other threads are not stopped (a DataLoader's workers, IPython's history): only the thread that
runs the rehearsal, and the threads that run code in its context (``asyncio.to_thread`` in a cell
that awaits, ``contextvars.copy_context().run``: a context variable marks them). Python's own
caches (``__pycache__``) and torch.compile's are allowed.

A fix's real run is not stopped, but journaled (``journaling``): each file it opens for writing is
noted with its size (and, when it is truncated, its content) before the open happens, so that a
real run that fails and is rolled back takes its lines back out (``take_journal().undo()``);
what cannot be undone (a removed file, a command run) is named.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shlex
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

from jupyter_gpumem.cells.loop import RehearsalDone

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_ALLOWED_PARTS = ("__pycache__", "torchinductor_", os.sep + ".triton" + os.sep)

# event -> how many of its first arguments name what it touches
_EVENTS: dict[str, int] = {
    "os.remove": 1,
    "os.rename": 2,
    "os.rmdir": 1,
    "os.mkdir": 1,
    "os.truncate": 1,
    "os.link": 2,
    "os.symlink": 2,
    "os.chmod": 1,
    "os.chown": 1,
    "os.utime": 1,
    "shutil.copyfile": 2,
    "shutil.copymode": 2,
    "shutil.copystat": 2,
    "shutil.copytree": 2,
    "shutil.rmtree": 1,
    "shutil.move": 2,
    "shutil.chown": 1,
    "shutil.make_archive": 1,
    "shutil.unpack_archive": 2,
    "subprocess.Popen": 0,
    "os.system": 1,
    "os.exec": 1,
    "os.spawn": 2,
    "os.posix_spawn": 1,
    "os.forkpty": 0,
    "pty.spawn": 1,
    "os.kill": 2,
    "os.killpg": 2,
    "socket.connect": 0,
    "socket.sendto": 0,
    "socket.sendmsg": 0,
    "socket.bind": 0,
    "sqlite3.connect": 1,
    "webbrowser.open": 1,
    "os.putenv": 2,  # os.environ[...] = ...: seen by child processes, and kept
    "os.unsetenv": 1,
}


class WorldTouched(RehearsalDone):
    """Raised into a rehearsal at its first write outside the kernel's memory."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


# what runs in this context: "rehearsal" or "journal" while one does, so the threads a cell hands
# its work to in the same context (asyncio.to_thread) are stopped or journaled as its own thread is
_RUN: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "jupyter_gpumem_run", default=None
)


class _State:
    thread: int | None = None  # the rehearsal's thread, while one runs
    stopped: str | None = None  # what the running rehearsal was stopped before
    journal_thread: int | None = None  # a real run's thread, while one runs
    journal: Journal | None = None  # what the last real run wrote


_SHELL_EVENTS = ("subprocess.Popen", "os.forkpty", "os.system", "pty.spawn")
_WRITES_ONLY = ("echo", "printf", "true", ":")  # shell commands whose only effect is their output
_KEEP_CONTENT = 64 << 20  # a file truncated by a real run is copied first up to this size


@dataclass
class _FileBefore:
    path: str
    existed: bool
    size: int
    content: bytes | None  # kept where the run truncated it


class Journal:
    """What one real run did outside memory: files it wrote (as they were before), and what it
    did that no journal can take back."""

    def __init__(self) -> None:
        self.files: dict[str, _FileBefore] = {}
        self.other: list[str] = []

    def record(self, event: str, args: tuple[Any, ...], what: str) -> None:
        if event == "open":
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            truncates = (isinstance(mode, str) and ("w" in mode)) or bool(
                isinstance(flags, int) and flags & os.O_TRUNC
            )
            self._file(os.fsdecode(args[0]), truncates)
            return
        command = _shell_command() if event in _SHELL_EVENTS else None
        if command is not None and self._shell(command):
            return  # `!echo ... >> log.txt`: only writes files, each noted
        if what not in self.other:
            self.other.append(what)

    def _shell(self, command: str) -> bool:
        """Note the files a shell command redirects into; True when that is all it does."""
        try:
            lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
            tokens = list(lexer)
        except ValueError:
            return False
        only_writes, first = True, True
        for i, token in enumerate(tokens):
            if token in (">", ">>") and i + 1 < len(tokens):
                self._file(tokens[i + 1], token == ">")
            elif token in (";", "&&", "||", "|", "&"):
                first = True
                continue
            elif first and token not in _WRITES_ONLY:
                only_writes = False
            first = False
        return only_writes

    def _file(self, name: str, truncates: bool) -> None:
        path = os.path.abspath(name)
        if path in self.files:
            return
        try:
            size = os.stat(path).st_size
        except OSError:
            self.files[path] = _FileBefore(path, False, 0, None)
            return
        content = None
        if truncates and size <= _KEEP_CONTENT:
            with open(path, "rb") as f:
                content = f.read()
        self.files[path] = _FileBefore(path, True, size, content)

    def undo(self) -> list[str]:
        """Put the files back as they were; returns what could not be."""
        problems = []
        for before in self.files.values():
            try:
                _put_file(before)
            except OSError as exc:
                problems.append(f"`{before.path}` could not be put back ({exc.strerror})")
        problems += [f"{what} ran in a real run that failed: not undone" for what in self.other]
        return problems


def _put_file(before: _FileBefore) -> None:
    if not before.existed:
        if os.path.exists(before.path):
            os.remove(before.path)
    elif before.content is not None:
        with open(before.path, "wb") as f:
            f.write(before.content)
    elif os.path.exists(before.path) and os.stat(before.path).st_size > before.size:
        os.truncate(before.path, before.size)


_state = _State()
_recording = threading.local()  # this thread is noting a journal entry
_installed = False
_install_lock = threading.Lock()


def _install() -> None:
    global _installed
    with _install_lock:
        if not _installed:
            sys.addaudithook(_hook)
            _installed = True


def _hook(event: str, args: tuple[Any, ...]) -> None:
    state = _state  # None while the interpreter exits (module globals cleared): nothing to judge
    if state is None or (state.thread is None and state.journal_thread is None):
        return
    if event != "open" and event not in _EVENTS:
        return
    # judged by the run's context, not the thread: the cell's own code and what it hands on in
    # its context (asyncio.to_thread, its tasks) is the run's; a task an earlier cell started,
    # which runs on the same thread while an await cell's re-run drives the loop, is not
    run = _RUN.get()
    journaled = run == "journal" and _state.journal_thread is not None
    if journaled and _state.journal is not None:
        if getattr(_recording, "on", False):
            return  # the journal's own reads of the files it notes
        _recording.on = True
        try:
            what = describe(event, args)
            if what is not None:
                _state.journal.record(event, args, what)
        finally:
            _recording.on = False
        return
    if run != "rehearsal" or _state.thread is None:
        return
    what = describe(event, args)
    if what is None:
        return
    if _state.stopped is None:
        _state.stopped = what
    raise WorldTouched(what)


def describe(event: str, args: tuple[Any, ...]) -> str | None:
    """The call as code (``open('log.txt', 'a')``), or None when the event leaves the world alone."""
    if event == "open":
        return _describe_open(args)
    if event in ("subprocess.Popen", "os.forkpty", "os.system", "pty.spawn"):
        command = _shell_command() or _command(event, args)
        return f"running `{command}`" if command else f"`{event}`"
    if event.startswith("socket."):
        address = args[1] if len(args) > 1 else None
        return f"`{event}({address!r})`"
    n = _EVENTS[event]
    shown = ", ".join(repr(_plain(a)) for a in args[:n])
    return f"`{event}({shown})`"


def _describe_open(args: tuple[Any, ...]) -> str | None:
    path, mode, flags = (*args, None, None, None)[:3]
    if path is None or isinstance(path, int):
        return None  # a descriptor already open: nothing new is reached
    writes = isinstance(mode, str) and any(c in mode for c in "wax+")
    if not writes and isinstance(flags, int):
        writes = bool(flags & _WRITE_FLAGS)
    if not writes:
        return None
    text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    if text == os.devnull or any(part in text for part in _ALLOWED_PARTS):
        return None
    if isinstance(mode, str):
        return f"`open({text!r}, {mode!r})`"
    return f"`os.open({text!r}, ...)` for writing"


def _plain(value: Any) -> Any:
    return os.fsdecode(value) if isinstance(value, (bytes, os.PathLike)) else value


def _command(event: str, args: tuple[Any, ...]) -> str | None:
    if event == "subprocess.Popen" and len(args) > 1:
        argv = args[1]
        if isinstance(argv, (list, tuple)):
            return " ".join(str(a) for a in argv)
        return str(argv)
    if args and isinstance(args[0], (str, bytes)):
        return str(_plain(args[0]))
    return None


def _shell_command() -> str | None:
    """The command IPython's ``!cmd`` / ``%sx`` is running, read from its own frame's locals."""
    frame: FrameType | None = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return None
        if frame.f_code.co_name in ("system", "system_piped", "system_raw", "getoutput"):
            cmd = frame.f_locals.get("cmd")
            if isinstance(cmd, str):
                return cmd.strip()
        frame = frame.f_back
    return None


@contextlib.contextmanager
def rehearsing() -> Iterator[_State]:
    """While the block runs on this thread, the first write outside memory raises WorldTouched;
    ``.stopped`` says what it was (None if nothing was stopped)."""
    _install()
    previous = (_state.thread, _state.stopped)
    _state.thread, _state.stopped = threading.get_ident(), None
    token = _RUN.set("rehearsal")
    result = _State()
    try:
        yield result
    finally:
        _RUN.reset(token)
        result.stopped = _state.stopped
        _state.thread, _state.stopped = previous
        result.thread = None


@contextlib.contextmanager
def journaling() -> Iterator[Journal]:
    """While a real run runs on this thread, note what it writes (``take_journal`` reads it)."""
    _install()
    journal = Journal()
    _state.journal, _state.journal_thread = journal, threading.get_ident()
    token = _RUN.set("journal")
    try:
        yield journal
    finally:
        _RUN.reset(token)
        _state.journal_thread = None


def take_journal() -> Journal | None:
    """The last real run's journal, once: a rollback undoes it, anything else forgets it."""
    journal, _state.journal = _state.journal, None
    return journal


def stopped_text(what: str) -> str:
    """What a rehearsal's line says: ``stopped before `open('log.txt', 'a')```."""
    return f"stopped before {what}"

"""A user's tokenizer.json runs in a child process that can be stopped: the bound on what a
tokenizer can cost in time, memory and threads.

Why a process: tokenizing is the `tokenizers` library's Rust code driven by a user's file. A
pre-tokenizer `Split` or normalizer `Replace` holds a regex the library runs by backtracking
(`(a+)+b` takes tens of milliseconds per run of twenty "a"s, and one line holds thousands of
runs), a WordPiece model may set no bound on a word's characters, a post-processor may add any
number of tokens to each line, a vocabulary may be as large as the file allows. Each can take
hours or gigabytes inside one call that releases the GIL and never returns to Python, so no
Python timeout can stop it. The API and the workers therefore never load a tokenizer themselves: a
child (`python -m engines.ingest.bounded_tokenize`) loads it with its address space capped
(RLIMIT_AS: `memory_bytes`) and its threads fixed (RAYON_NUM_THREADS), and the parent waits for
each answer with a deadline. Past the deadline the child is killed (SIGKILL) and the upload or the
job is refused with `tokenizer_too_slow`; a child that runs out of memory (a MemoryError, or the
Rust allocator's abort) is `tokenizer_out_of_memory`. Nothing is half-stored: the child writes only
into the rows files the parent made and removes (engines.ingest.texts.write_text_npz).

Deadlines: loading the tokenizer.json, then tokenizing, each within `timeout_s`; with
`each_chunk` (a tokenize_texts job), each chunk of lines (512 lines, or 8 MiB of text:
engines.ingest.text_rows) within `timeout_s`, so a long JSONL is not refused for its length.

The child gets the parent's death signal (PR_SET_PDEATHSIG, Linux) so none outlives it, and
messages are JSON over a socket pair, 1 MiB at most (no pickle: the child runs a user's file). A
child serves one tokenizer and is killed; one spare is kept started, as Python and its imports
take a tenth of a second, so an upload finds one ready. Children are started from one long-lived
thread, because the death signal follows the thread that started a child, and a request's
thread may end while a spare waits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any

from engines.errors import InvalidDatasetError
from engines.ingest.text_rows import (
    CHUNK_LINES,
    ProgressFn,
    RowsRequest,
    TextResult,
    TokenizerFacts,
    fill_rows,
    load_tokenizer,
    tokenizer_facts,
)

_MODULE = "engines.ingest.bounded_tokenize"
#: Threads the library may use to tokenize a chunk (its Rayon pool) in one child.
THREADS = 4
_MAX_MESSAGE = 1024 * 1024
_MAX_DETAIL = 2000
#: The child's exit status when Python ran out of memory (the Rust allocator aborts: SIGABRT).
_MEMORY_EXIT = 75
_CHILD_ENV = {
    "RAYON_NUM_THREADS": str(THREADS),
    "TOKENIZERS_PARALLELISM": "true",
    "MALLOC_ARENA_MAX": "2",  # each malloc arena reserves 64 MiB of address space: RLIMIT_AS counts it
    "RUST_BACKTRACE": "0",
}
_KEPT_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONHOME")
#: Where `engines` is imported from: the child finds it there whether or not it is installed.
_ROOT = str(Path(__file__).resolve().parents[2])


# ---------------------------------------------------------------- the parent's side


@dataclass
class _Child:
    process: subprocess.Popen[bytes]
    connection: Connection

    def stop(self) -> None:
        """Killed (a child is used once, and may be inside a call that never returns) and its socket
        closed; reaped by `reap`."""
        if self.process.poll() is None:
            self.process.kill()
        self.connection.close()

    def reap(self) -> None:
        self.process.wait()


def _child_env() -> dict[str, str]:
    """Only what the child needs: not the server's settings and credentials (OPTIFORGE_*, the
    database's and the object store's), which the child, running a user's file, has no use for."""
    path = os.environ.get("PYTHONPATH")
    env = {name: os.environ[name] for name in _KEPT_ENV if name in os.environ}
    return {**env, **_CHILD_ENV, "PYTHONPATH": _ROOT + (os.pathsep + path if path else "")}


def _spawn() -> _Child:
    ours, theirs = socket.socketpair()
    with theirs:
        process = subprocess.Popen(
            # -P: the working directory is not on the child's path (engines is found at _ROOT)
            [sys.executable, "-P", "-m", _MODULE, str(theirs.fileno()), str(os.getpid())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # stderr is the parent's: a crash's message lands in its log
            env=_child_env(),
        )
    return _Child(process, Connection(ours.detach()))


class _Spares:
    """One child kept started per process, and the thread that starts (and reaps) every child: the
    next spare is started, and a used child reaped, off the request's path."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.spare: Future[_Child] | None = None
        self.starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer-starter")

    def take(self) -> _Child:
        with self.lock:
            taken = self.spare or self.starter.submit(_spawn)
            self.spare = self.starter.submit(_spawn)
        child = taken.result()
        if child.process.poll() is not None:  # the spare died waiting (killed from outside)
            self.release(child)
            child = self.starter.submit(_spawn).result()
        return child

    def release(self, child: _Child) -> None:
        child.stop()
        self.starter.submit(child.reap)


_spares: _Spares | None = None
_spares_lock = threading.Lock()


def _process_spares() -> _Spares:
    """This process's spares; in a forked process (a Celery pool worker) its own, not its parent's."""
    global _spares
    with _spares_lock:
        if _spares is None or _spares.pid != os.getpid():
            _spares = _Spares()
        return _spares


class TokenizerProcess:
    """A tokenizer.json loaded in a bounded child process (see the module's docstring); a context
    manager, whose exit kills the child. Its loading starts at once: the caller can read the JSONL
    meanwhile, and waits only when it asks for `facts()`."""

    def __init__(self, path: Path, *, max_bytes: int, timeout_s: float, memory_bytes: int):
        self.timeout_s, self.memory_bytes = timeout_s, memory_bytes
        self._closed = False
        self._facts: TokenizerFacts | None = None
        self._spares = _process_spares()
        self._child = self._spares.take()
        self._load_deadline = time.monotonic() + timeout_s
        self._send({"load": {"path": str(path), "max_bytes": max_bytes, "memory_bytes": memory_bytes}})

    def __enter__(self) -> TokenizerProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill the child (again: harmless); it is reaped in the background."""
        if not self._closed:
            self._closed = True
            self._spares.release(self._child)

    def facts(self) -> TokenizerFacts:
        """The vocabulary's size and the pad ids, once the child has loaded the tokenizer.json
        (its refusal, `invalid_tokenizer` or a bound, raised here)."""
        if self._facts is None:
            reply = self._reply(self._load_deadline, "load the tokenizer.json", None, each_chunk=False)
            self._facts = TokenizerFacts.from_dict(reply)
        return self._facts

    def fill_rows(
        self, request: RowsRequest, *, progress: ProgressFn | None = None, each_chunk: bool = False
    ) -> TextResult:
        """engines.ingest.text_rows.fill_rows in the child: the request's files hold the rows when it
        returns; `progress` is called here after each chunk (and may raise, e.g. Cancelled: the
        child is then killed by `close`)."""
        self.facts()
        self._send({"rows": request.to_dict()})
        reply = self._reply(time.monotonic() + self.timeout_s, "tokenize the lines", progress, each_chunk)
        return TextResult(**reply)

    def _send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the child is gone: the next reply says why
            self._child.connection.send_bytes(json.dumps(message).encode())

    def _reply(
        self, deadline: float, doing: str, progress: ProgressFn | None, each_chunk: bool
    ) -> dict[str, Any]:
        connection = self._child.connection
        while True:
            try:
                if not connection.poll(max(0.0, deadline - time.monotonic())):
                    self.close()
                    raise self._too_slow(doing, each_chunk)
                message = json.loads(connection.recv_bytes(_MAX_MESSAGE))
            except (EOFError, OSError):
                raise self._ended(doing) from None
            if "progress" in message:
                if progress is not None:
                    progress(*message["progress"])
                if each_chunk:
                    deadline = time.monotonic() + self.timeout_s
                continue
            if "error" in message:
                error = dict(message["error"])
                raise InvalidDatasetError(str(error.pop("detail")), code=str(error.pop("code")), extra=error)
            if "failed" in message:
                self.close()
                raise RuntimeError(f"the tokenizer process failed: {message['failed']}")
            return dict(message["ok"])

    def _too_slow(self, doing: str, each_chunk: bool) -> InvalidDatasetError:
        span = (
            f" (a chunk of at most {CHUNK_LINES} lines)"
            if each_chunk and doing.startswith("tokenize")
            else ""
        )
        return InvalidDatasetError(
            f"the tokenizer took more than {self.timeout_s:g} s to {doing}{span} and was stopped: a "
            "pre-tokenizer Split or normalizer Replace pattern that backtracks (such as (a+)+b), or a "
            "model with no bound on a word's length, makes tokenizing slow. Upload the tokenizer.json "
            "the model was trained with, unchanged, or shorter lines",
            code="tokenizer_too_slow",
            extra={"timeout_s": self.timeout_s},
        )

    def _ended(self, doing: str) -> Exception:
        """Why the child ended without an answer: out of memory (Python's MemoryError, the Rust
        allocator's abort, the kernel's kill), or a failure of this code (a RuntimeError: a 500)."""
        try:
            status = self._child.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            status = None
        self.close()
        if status == _MEMORY_EXIT or (status is not None and status < 0):
            return InvalidDatasetError(
                f"the tokenizer needed more than {self.memory_bytes // (1024 * 1024)} MiB of memory to "
                f"{doing} (or the tokenizers library crashed on it) and was stopped: upload a smaller "
                "tokenizer (vocabulary, merges, added tokens) or shorter lines",
                code="tokenizer_out_of_memory",
                extra={"memory_limit_bytes": self.memory_bytes},
            )
        return RuntimeError(f"the tokenizer process ended with status {status} while asked to {doing}")


# ---------------------------------------------------------------- the child's side


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the parent dies, however it dies (Linux); elsewhere the closed socket ends the
    child at its next message."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the signal was asked for
        os._exit(0)


def _limit_memory(nbytes: int) -> None:
    """RLIMIT_AS: allocations past it fail (Python's MemoryError, the Rust allocator's abort). Only
    where the platform has it (Linux; macOS does not enforce it): elsewhere time is the one bound."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = nbytes if hard == resource.RLIM_INFINITY else min(nbytes, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _send_from_child(connection: Connection, message: dict[str, Any]) -> None:
    connection.send_bytes(json.dumps(message).encode())


def _serve(connection: Connection) -> None:
    """Answer the parent's messages (a load, then rows) until it closes the socket."""
    tokenizer: Any = None

    def progress(done: int, total: int) -> None:
        _send_from_child(connection, {"progress": [done, total]})

    while True:
        try:
            message = json.loads(connection.recv_bytes(_MAX_MESSAGE))
        except EOFError:
            return
        try:
            if "load" in message:
                load = message["load"]
                _limit_memory(int(load["memory_bytes"]))
                tokenizer = load_tokenizer(Path(load["path"]), int(load["max_bytes"]))
                reply = tokenizer_facts(tokenizer).to_dict()
            else:
                reply = fill_rows(tokenizer, RowsRequest.from_dict(message["rows"]), progress).to_dict()
        except InvalidDatasetError as exc:
            error = exc.to_dict()
            error["detail"] = str(error["detail"])[:_MAX_DETAIL]
            _send_from_child(connection, {"error": error})
            continue
        _send_from_child(connection, {"ok": reply})


def main(argv: list[str]) -> None:
    descriptor, parent = int(argv[1]), int(argv[2])
    _die_with_parent(parent)
    import tokenizers  # noqa: F401  (imported while the child waits as a spare, as numpy is)

    connection = Connection(descriptor)
    try:
        _serve(connection)
    except MemoryError:
        os._exit(_MEMORY_EXIT)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            _send_from_child(connection, {"failed": f"{type(exc).__name__}: {str(exc)[:_MAX_DETAIL]}"})
        raise


if __name__ == "__main__":
    main(sys.argv)

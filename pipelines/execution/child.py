"""The block's side of its child process: what the fork server prepares once
(`server_prepare`), and what a child does once its block arrives (`child_main`): read
the spec, run the block, send the result. The supervising side is in process.py.

A child never uses the database. Its stdout and stderr are pipes the supervisor reads;
its `logger` lines and its result travel as JSON lines on a third pipe.
"""

from __future__ import annotations

import faulthandler
import io
import json
import logging
import os
import pickle
import resource
import shutil
import signal
import sys
import tempfile
import types
from collections.abc import Callable

from pipelines.execution.libc import libc_function
from pipelines.execution.spec import BlockSpec, ExecutionResult

# Heavy libraries a child may import. When a child reports it used one, the fork server
# imports it too, so that later children find it loaded instead of paying the import
# (pandas' is far dearer than a small block) each time.
PRELOADABLE = ("numpy", "pandas", "pyarrow", "pyarrow.parquet", "duckdb")


class _PipeLogHandler(logging.Handler):
    """Sends a block's `logger` records to the parent as JSON lines on the message pipe."""

    def __init__(self) -> None:
        super().__init__()
        self.fd = -1

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            _write_all(self.fd, (json.dumps({"t": "log", "ts": record.created, "level": record.levelname, "msg": message}) + "\n").encode())
        except Exception:  # noqa: BLE001 - logging must never break the block
            self.handleError(record)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# The block's `logger`, built once in the fork server: a child only names it and points
# its handler at its own pipe. On this kind of machine every page a child writes to
# costs a copy, and building a logger and a formatter from scratch touches dozens.
_block_logger = logging.Logger("millrace.block", logging.DEBUG)
_pipe_handler = _PipeLogHandler()
_pipe_handler.setFormatter(logging.Formatter("%(message)s"))
_block_logger.addHandler(_pipe_handler)


def server_prepare(run: Callable[..., ExecutionResult]) -> None:
    """Run once in the fork server, before its first fork: whatever every child needs
    and can inherit is made here, once, instead of in each child.

    The child's stdout and stderr objects are bound to descriptor numbers 1 and 2,
    which become the block's pipes when it comes (the server itself never prints), and
    a crash in C code dumps the Python stack into the block's own stderr (its log). A
    trivial block run warms the caches (compiled regexes, the executor's code paths)."""
    global _stdout, _stderr
    _stdout = sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    _stderr = sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    faulthandler.enable(file=sys.stderr)
    signal.signal(signal.SIGURG, _on_sigurg)
    # Restart system calls the signal interrupts, so that it never lands in the middle of
    # a write to these same streams (whose handler would then re-enter them).
    signal.siginterrupt(signal.SIGURG, False)
    # Unpickling a spec imports what its values need: kwargs carry datetimes, and an
    # import in every child would cost more than the rest of a small block.
    import datetime  # noqa: F401

    warm_up(run)


_stdout: io.TextIOWrapper | None = None
_stderr: io.TextIOWrapper | None = None
_buffered = False


def _on_sigurg(signum: int, frame: object) -> None:
    """SIGURG, which the supervisor sends every process.FLUSH_EVERY seconds once a
    block has written process.CHATTY_LINES lines. The first switches the child's stdout
    and stderr from line buffering to block buffering, the next ones flush them. Line
    buffering costs a system call per line, which made a block printing a flood of
    lines much slower than printing them to a file (see the README's performance
    section); most blocks print far fewer lines and keep it, so each line shows at once
    with no timer or thread in the child.

    Python runs a handler at the first place that checks for signals, and in a block
    that prints without pause that is inside the write itself, where the stream refuses
    a nested call (and flushing the text layer there would drop the text it took out
    to write). The work is then done at the block's next function call instead, by a
    one-shot profile hook, which runs between bytecodes, never inside the stream. SIGURG
    because its default action is to do nothing: a block that resets it is not killed
    by it."""
    if not _switch_or_flush() and sys.getprofile() is None:
        sys.setprofile(_at_next_call)


def _at_next_call(frame: types.FrameType, event: str, arg: object) -> None:
    # Not in the handler itself (setting the hook there is an event already), which may
    # be running in the middle of the write; and until it works, at every call.
    if frame.f_code is not _on_sigurg.__code__ and _switch_or_flush():
        sys.setprofile(None)


def _switch_or_flush() -> bool:
    """Switch the streams to block buffering, or flush them once switched; False when
    one was in the middle of a write."""
    global _buffered
    done = True
    for stream in (_stdout, _stderr):
        try:
            stream.buffer.flush()  # type: ignore[union-attr]
        except RuntimeError:  # "reentrant call": in the middle of a write
            done = False
            continue
        except (ValueError, OSError, AttributeError):
            continue  # closed as the block ends
        try:
            if _buffered:
                stream.flush()  # type: ignore[union-attr]
            else:
                stream.reconfigure(line_buffering=False)  # type: ignore[union-attr]
        except (RuntimeError, ValueError, OSError, AttributeError):
            done = False
    _buffered = _buffered or done
    return done


def _limit_memory(megabytes: int | None) -> None:
    """Cap the data the child may hold (heap and anonymous mappings, RLIMIT_DATA): past
    it an allocation fails, which Python raises as MemoryError in the block, instead of
    the machine running out of memory. Mapped files and address space merely reserved
    do not count."""
    if not megabytes:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = megabytes * 1024 * 1024
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def child_main(spec_fd: int, msg_fd: int, run: Callable[..., ExecutionResult]) -> None:
    """Body of a block's child process once its block arrives: read the spec, run it,
    send the result, exit. Never returns. Its stdout and stderr (fds 1 and 2) are
    already the pipes, its stdin the server's /dev/null.

    A spec with `keep_alive` (a run in one process) does not end the child: it marks
    the end of the block's output on stdout and stderr, sends the result and waits for
    the next spec, with the same `context`; the end of the spec pipe ends it.

    Nothing is warmed up in the child beforehand: every page the child writes to
    costs a copy, and a trial block run before the real one only added copies (more
    page faults and CPU a block, for a smaller latency gain than the lost CPU costs
    on a small machine; see the README's performance section)."""
    code = 0
    context: dict = {}
    try:
        while True:
            spec = _read_spec(spec_fd)
            if spec is None:  # the parent gave up before sending all of it, or is done
                break
            if not spec.keep_alive:
                os.close(spec_fd)
            if spec.environ is not None:
                _set_environ(spec.environ)
            _block_logger.name = f"millrace.block.{spec.block_uuid}"
            _pipe_handler.fd = msg_fd
            _limit_memory(spec.memory_limit_mb)
            result = run(spec, _block_logger, context)
            result.metrics["peak_memory_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            result.metrics["loaded"] = [m for m in PRELOADABLE if m in sys.modules]
            payload = json.dumps({"t": "result", "result": result.__dict__}, default=str) + "\n"
            # Output first, result last: once the parent has the result it has everything.
            _flush_output()
            if spec.keep_alive:
                _flush_c_stdio()
                os.write(1, END_MARK)
                os.write(2, END_MARK)
                _write_all(msg_fd, payload.encode())
                continue
            os.close(1)
            os.close(2)
            _write_all(msg_fd, payload.encode())
            os.close(msg_fd)  # the parent sees the end now, not after the process teardown
            break
    except BaseException:  # noqa: BLE001 - whatever happens, the child must end here
        code = 70
    finally:
        os._exit(code)


def _flush_output() -> None:
    """Flush the block's output streams, ours and whatever the block put in their place."""
    for stream in {id(s): s for s in (sys.stdout, sys.stderr, _stdout, _stderr) if s is not None}.values():
        try:
            stream.flush()
        except (ValueError, OSError, AttributeError):
            pass  # a stream the block closed or replaced with something odd


# The line a child that runs several blocks writes on its stdout and its stderr after a
# block's last output: lines before it are that block's. (A NUL does not occur in text.)
END_MARK = b"\0millrace: end of block output\n"


_fflush = libc_function("fflush")


def _flush_c_stdio() -> None:
    """Flush what C code (a library's printf) left in the C library's buffers: between
    blocks of one process, it belongs to the block that wrote it."""
    if _fflush is not None:
        _fflush(None)


def _set_environ(environ: dict[str, str]) -> None:
    """Make the child's environment `environ`, changing only what differs: the fork
    server started with the orchestrator's environment, so usually nothing does, and
    each change is a system call."""
    for key in [k for k in os.environ if k not in environ]:
        del os.environ[key]
    for key, value in environ.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _read_spec(fd: int) -> BlockSpec | None:
    """The next spec: an 8-byte length, then the pickle. Read by length, not to the end
    of the pipe, so the child starts before the parent has closed its end, and a child
    that runs several blocks reads exactly one spec at a time. None at the end of the
    pipe or of a spec cut short (the parent gave up)."""
    head = _read_exactly(fd, 8)
    if head is None:
        return None
    body = _read_exactly(fd, int.from_bytes(head, "big"))
    return None if body is None else pickle.loads(body)


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks = []
    while size > 0:
        chunk = os.read(fd, min(size, 1 << 16))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def warm_up(run: Callable[..., ExecutionResult]) -> None:
    """Exercise the executor on a trivial block that stores an output (in a temporary
    directory, removed after), so that the code paths and caches a block needs are warm
    in the fork server before it forks."""
    scratch = tempfile.mkdtemp(prefix="millrace-warm-")
    spec = BlockSpec("warm-up", "warm_up", "custom", "python", "@custom\ndef warm_up(*args, **kwargs):\n    return 1\n", data_dir=scratch, output_prefix="warm")
    try:
        run(spec, logging.Logger("warm-up"), {})
    except Exception:  # noqa: BLE001 - only an optimisation
        pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

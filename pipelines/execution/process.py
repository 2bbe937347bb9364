"""Run a block in a child process and supervise it.

The child comes from the fork server (forkserver.py), which forks it in a millisecond
or two, where starting a new interpreter and importing the executor costs a hundred.
The child leads its own process group, so a timeout or a cancel kills the block together
with any processes it started, and a crash in user code (a segfault, `os._exit`) ends
only the child. Memory the block used goes back when the child exits.

The spec arrives on a pipe. The child's stdout and stderr are pipes read here line by
line; its `logger` and its final result travel as JSON lines on a third pipe. The child
never uses the database.
"""

from __future__ import annotations

import faulthandler
import fcntl
import io
import json
import logging
import os
import pickle
import resource
import selectors
import shutil
import signal
import sys
import tempfile
import time
import types
from collections.abc import Callable

from pipelines.execution.forkserver import ForkServer, ForkServerError, libc_function
from pipelines.execution.spec import (
    CANCELLED,
    FAILED,
    INTERRUPTED,
    BlockSpec,
    ExecutionResult,
    LogChunk,
    LogLine,
)

# Called with new log lines: LogLine objects (the block's logger) and LogChunk objects
# (lines of stdout or stderr read together); the caller batches them into its store.
LogSink = Callable[[list[LogLine | LogChunk]], None]
# Called every `tick` seconds while the child runs. True: go on. False (the block run
# was cancelled or lost its claim) or INTERRUPTED (its worker is shutting down): kill
# the child, and end the block with that status.
Tick = Callable[[], bool | str]


_MAX_LINE = 64 * 1024
# Past this many lines of stdout and stderr, a block's output is buffered (see
# `_buffer_output`).
CHATTY_LINES = 1000
# How often the output of such a block is flushed to the pipes.
FLUSH_EVERY = 0.2
# The size its pipes get then (Linux's default limit for an unprivileged process).
_CHATTY_PIPE = 1024 * 1024
# Heavy libraries a child may import. When a child reports it used one, the fork server
# imports it too, so that later children find it loaded instead of paying the import
# (half a second for pandas) each time.
_PRELOADABLE = ("numpy", "pandas", "pyarrow", "pyarrow.parquet", "duckdb")


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
    """SIGURG, which the supervisor sends every FLUSH_EVERY seconds once a block has
    written CHATTY_LINES lines. The first switches the child's stdout and stderr from
    line buffering to block buffering, the next ones flush them. Line buffering costs
    a system call per line, which made a block printing 200,000 lines three times
    slower than printing them to a file; most blocks print far fewer lines and keep it,
    so each line shows at once with no timer or thread in the child.

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


def _child_main(spec_fd: int, msg_fd: int, run: Callable[..., ExecutionResult]) -> None:
    """Body of a block's child process once its block arrives: read the spec, run it,
    send the result, exit. Never returns. Its stdout and stderr (fds 1 and 2) are
    already the pipes, its stdin the server's /dev/null.

    A spec with `keep_alive` (a run in one process) does not end the child: it marks
    the end of the block's output on stdout and stderr, sends the result and waits for
    the next spec, with the same `context`; the end of the spec pipe ends it.

    Nothing is warmed up in the child beforehand: on this kind of machine every page
    the child writes to costs a copy, and a trial block run before the real one only
    added copies (measured: 80 more page faults and 2 ms more CPU a block, for a
    smaller latency gain than the lost CPU costs on two cores)."""
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
            result.metrics["loaded"] = [m for m in _PRELOADABLE if m in sys.modules]
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


# One fork server per orchestrating process and `run` function.
_servers: dict[str, ForkServer] = {}


def _server(run: Callable[..., ExecutionResult]) -> ForkServer:
    """The fork server for `run`, a module-level function the server imports by name."""
    path = f"{run.__module__}:{run.__qualname__}"
    server = _servers.get(path)
    if server is None or not server.alive():
        if server is not None and server.owner == os.getpid():
            server.close()
        server = ForkServer(path)
        _servers[path] = server
    return server


# What a pipe holds before a write blocks (Linux's default), less a margin.
_PIPE_BUFFER = 60 * 1024


def _spawn(run: Callable[..., ExecutionResult], payload: bytes) -> tuple[ForkServer, int, int, int, int, int]:
    """A started child: (server, pid, spec_w, out_r, err_r, msg_r). The start of the
    spec (all of it, usually) is in the pipe before the child wakes, so it need not
    wait for the round trip that tells us its pid."""
    for attempt in (1, 2):
        server = _server(run)
        server.forget_exits()
        spec_r, spec_w = os.pipe()
        os.write(spec_w, payload[:_PIPE_BUFFER])
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        msg_r, msg_w = os.pipe()
        try:
            pid = server.spawn([spec_r, out_w, err_w, msg_w])
        except ForkServerError:
            for fd in (spec_r, spec_w, out_r, out_w, err_r, err_w, msg_r, msg_w):
                os.close(fd)
            server.close()
            if attempt == 2:
                raise
            continue
        for fd in (spec_r, out_w, err_w, msg_w):
            os.close(fd)
        return server, pid, spec_w, out_r, err_r, msg_r
    raise AssertionError("unreachable")


def _payload(spec: BlockSpec, run: Callable[..., ExecutionResult]) -> bytes:
    """The spec as the child reads it. The child keeps the environment it inherited
    unless it is sent another: the caller's, when it has changed since the server began."""
    environ = spec.environ
    if environ is None and _server(run).environ_changed():
        environ = dict(os.environ)
    spec.environ, caller_environ = environ, spec.environ
    try:
        pickled = pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        spec.environ = caller_environ
    return len(pickled).to_bytes(8, "big") + pickled


def _send(fd: int, data: bytes | memoryview) -> bool:
    """Write all of `data` to the spec pipe; False if the child has gone."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        return False  # the child died; the supervisor reports how
    return True


def run_in_child(
    spec: BlockSpec,
    run: Callable[..., ExecutionResult],
    *,
    on_log: LogSink,
    on_tick: Tick | None = None,
    tick: float = 2.0,
) -> ExecutionResult:
    """Run `run(spec, logger, context)` in a child process and supervise it until it
    ends, its timeout passes, or `on_tick` asks to stop."""
    payload = _payload(spec, run)
    started = time.monotonic()
    server, pid, spec_w, out_r, err_r, msg_r = _spawn(run, payload)
    try:
        _send(spec_w, memoryview(payload)[min(len(payload), _PIPE_BUFFER):])
    finally:
        os.close(spec_w)
    pipes = _Pipes(out_r, err_r, msg_r)
    result, _ = _supervise(spec, pid, pipes, started, on_log, on_tick, tick)
    if result is None:
        result = _result(server.exit_status(pid), started)
    _preload(server, result)
    return result


def _preload(server: ForkServer, result: ExecutionResult) -> None:
    loaded = [m for m in (result.metrics.pop("loaded", None) or []) if m not in _preloaded]
    if loaded:
        _preloaded.update(loaded)
        server.preload(loaded)


class Session:
    """One child process that runs several blocks one after another, for a pipeline
    run with `run_pipeline_in_one_process` (Mage's option): its blocks share that
    process's memory, the `context` dict included. A block that kills the process (a
    crash, a timeout, a cancel) ends the session, and the next block starts a new one.
    `close()` ends it; so does the caller's exit (the fork server kills what it forked)."""

    def __init__(self) -> None:
        self._child: tuple[ForkServer, int, int, _Pipes] | None = None  # server, pid, spec_w, pipes

    @property
    def pid(self) -> int | None:
        return self._child[1] if self._child else None

    def run(
        self, spec: BlockSpec, run: Callable[..., ExecutionResult], *,
        on_log: LogSink, on_tick: Tick | None = None, tick: float = 2.0,
    ) -> ExecutionResult:
        spec.keep_alive = True
        payload = _payload(spec, run)
        started = time.monotonic()
        if self._child is not None and not _send(self._child[2], payload):
            # The process ended between two blocks (killed from outside): the spec never
            # reached it and nothing of this block ran; it runs in a new process.
            self.close()
        if self._child is None:
            server, pid, spec_w, out_r, err_r, msg_r = _spawn(run, payload)
            self._child = (server, pid, spec_w, _Pipes(out_r, err_r, msg_r))
            # A child that dies before it has all of it ends without a result: the
            # supervisor sees that.
            _send(spec_w, memoryview(payload)[min(len(payload), _PIPE_BUFFER):])
        server, pid, _, pipes = self._child
        result, alive = _supervise(spec, pid, pipes, started, on_log, on_tick, tick, session=True)
        if result is None:
            result = _result(server.exit_status(pid), started)
        if not alive:
            self.close()
        _preload(server, result)
        return result

    def close(self) -> None:
        if self._child is None:
            return
        _, pid, spec_w, pipes = self._child
        self._child = None
        os.close(spec_w)  # the child reads the end of its specs and exits
        pipes.close()
        _kill_group(pid)  # with whatever its blocks started and left behind


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


def start_server(run: Callable[..., ExecutionResult]) -> None:
    """Start the fork server now, so that it is ready when the first block comes."""
    _server(run)


# Heavy modules the fork server has been asked to import already.
_preloaded: set[str] = set()


# After the child has sent its result, how long to keep reading output that
# processes it started may still write to inherited stdout before we stop listening.
_GRACE = 0.2
# The longest the output of a block that has ended is read for.
_DRAIN_MAX = 30.0


class _Pipes:
    """The read ends of a child's stdout, stderr and message pipes, with what has been
    read of each but not yet split into lines (kept from one block to the next when
    the child runs several)."""

    def __init__(self, out_r: int, err_r: int, msg_r: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.buffers = {out_r: b"", err_r: b"", msg_r: b""}
        self.levels = {out_r: "INFO", err_r: "WARNING"}
        self.out_r, self.err_r, self.msg_r = out_r, err_r, msg_r
        self.marked: set[int] = set()  # the output pipes whose end-of-block mark came
        self.results: list[dict] = []  # the block's result, once it has come
        self.lines = 0  # lines of stdout and stderr read so far
        self.next_flush = 0.0  # when to send the next SIGURG (see `_on_sigurg`)
        self.last_read = 0.0  # when output last came
        for fd in self.buffers:
            os.set_blocking(fd, False)
            self.selector.register(fd, selectors.EVENT_READ)

    def enlarge(self) -> None:
        """Give a chatty block's output pipes room for more than a second of its lines
        (Linux; 64 KiB by default), so that it goes on printing while its lines are being
        stored instead of waiting on a full pipe."""
        for fd in (self.out_r, self.err_r):
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _CHATTY_PIPE)
            except (OSError, AttributeError):
                pass  # past the user's share of pipe memory, or not Linux: the default stays

    def close(self) -> None:
        for fd in list(self.selector.get_map() or {}):
            os.close(fd)
        self.selector.close()


def _supervise(
    spec, pid, pipes: _Pipes, started, on_log, on_tick, tick, *, session: bool = False,
) -> tuple[ExecutionResult | None, bool]:
    """Read the child's pipes until it has finished the block, enforcing its timeout
    and calling `on_tick`. Returns the result (None if the child ended without one)
    and whether the child is still there for another block (`session` only).

    A child that runs one block closes stdout and stderr before it writes its result,
    so the result is the last thing to arrive and nothing waits for the process
    teardown. A child that runs several marks the end of each block's output on both
    instead, and stays."""
    selector = pipes.selector
    out_r, err_r, msg_r = pipes.out_r, pipes.err_r, pipes.msg_r
    pipes.marked.clear()
    result: dict | None = None
    killed_because = ""
    deadline = started + spec.timeout if spec.timeout else None
    next_tick = started + tick
    ended_at: float | None = None  # when the message pipe closed (the child is done)
    pending: list = []
    read_some = False
    alive = False
    try:
        while selector.get_map():
            if session and result is not None and ended_at is None and {out_r, err_r} <= pipes.marked:
                alive = True  # the block is done and its output all read
                break
            now = time.monotonic()
            waits = [next_tick - now]
            if deadline is not None and not killed_because:
                waits.append(deadline - now)
            if ended_at is not None:
                # What the block wrote before it ended may still be in the pipes (a
                # chatty block's are large): read on while it comes, and then only as
                # long as a process the block started might still be writing.
                quiet_since = max(ended_at, pipes.last_read)
                if now >= quiet_since + _GRACE or now >= ended_at + _DRAIN_MAX:
                    break
                waits.append(quiet_since + _GRACE - now)
            elif pipes.lines > CHATTY_LINES:
                waits.append(pipes.next_flush - now)
            for key, _mask in selector.select(timeout=max(0.0, min(waits))):
                fd = key.fd
                chunk = os.read(fd, 65536)
                if chunk:
                    read_some = True
                    pipes.buffers[fd] = _split_lines(fd, pipes.buffers[fd] + chunk, pipes, pending)
                    continue
                selector.unregister(fd)
                os.close(fd)
                if pipes.buffers[fd]:
                    _take_line(fd, pipes.buffers[fd], pipes, pending)
                    pipes.buffers[fd] = b""
                if fd == msg_r:
                    ended_at = time.monotonic()
                    # Anything the block started and left behind goes with it.
                    _kill_group(pid)
            if pipes.results:
                result = pipes.results.pop()
            if pending:
                on_log(pending)
                pending = []
            now = time.monotonic()
            if read_some:  # quiet is counted from here: storing lines is not quiet
                pipes.last_read, read_some = now, False
            if pipes.lines > CHATTY_LINES and ended_at is None and now >= pipes.next_flush:
                if not pipes.next_flush:
                    pipes.enlarge()
                pipes.next_flush = now + FLUSH_EVERY
                _signal(pid, signal.SIGURG)
            if deadline is not None and now >= deadline and not killed_because and ended_at is None:
                killed_because = f"Timed out after {spec.timeout:g} s; the block's processes were killed"
                _kill_group(pid)
            if now >= next_tick:
                next_tick = now + tick
                if on_tick is not None and not killed_because and ended_at is None:
                    verdict = on_tick()
                    if verdict is not True:
                        killed_because = INTERRUPTED if verdict == INTERRUPTED else "cancelled"
                        _kill_group(pid)
    finally:
        if not alive:
            if not session:
                pipes.close()
            _kill_group(pid)
    duration = time.monotonic() - started
    if killed_because == "cancelled":
        return ExecutionResult(status=CANCELLED, error="Cancelled; the block's processes were killed", metrics={"duration": duration}), False
    if killed_because == INTERRUPTED:
        error = "Interrupted: its worker is shutting down; the block's processes were killed"
        return ExecutionResult(status=INTERRUPTED, error=error, metrics={"duration": duration}), False
    if killed_because:
        return ExecutionResult(status=FAILED, error=killed_because, metrics={"duration": duration}), False
    if result is not None:
        return ExecutionResult(**result), alive
    return None, False  # ended without a result: the caller asks how


def _split_lines(fd: int, data: bytes, pipes: _Pipes, pending: list) -> bytes:
    """Take the complete lines out of `data`, return the incomplete rest. Output lines
    longer than _MAX_LINE are cut; result and logger messages never are."""
    if fd == pipes.msg_r:
        *lines, rest = data.split(b"\n")
        for line in lines:
            _take_line(fd, line, pipes, pending)
        return rest
    end = data.rfind(b"\n")
    if end < 0:
        if len(data) <= _MAX_LINE:
            return data
        end = len(data)
    _take_output(fd, data[:end], pipes, pending)
    return data[end + 1:]


_MARK_TEXT = END_MARK.rstrip(b"\n").decode()


def _take_output(fd: int, data: bytes, pipes: _Pipes, pending: list) -> None:
    """Complete lines of stdout or stderr (without the last newline), the whole read as
    one chunk."""
    text = data.decode("utf-8", errors="replace")
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    if _MARK_TEXT in text:  # a block of a run in one process ended here
        pipes.marked.add(fd)
        messages = [message for message in text.split("\n") if message != _MARK_TEXT]
        if not messages:
            return
        text = "\n".join(messages)
    count = text.count("\n") + 1
    pipes.lines += count
    pending.append(LogChunk(time.time(), pipes.levels[fd], text, count))


def _take_line(fd: int, line: bytes, pipes: _Pipes, pending: list) -> None:
    if fd == pipes.msg_r:
        try:
            message = json.loads(line)
        except ValueError:
            return
        if message.get("t") == "result":
            pipes.results.append(message["result"])
        else:
            pending.append(LogLine(message.get("ts", time.time()), message.get("level", "INFO"), message.get("msg", "")))
        return
    _take_output(fd, line, pipes, pending)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _result(status: int | None, started: float) -> ExecutionResult:
    """The result of a child that ended without sending one, from its wait status."""
    duration = time.monotonic() - started
    if status is None:
        reason = "The block's process ended without a result"
    elif os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        reason = f"The block's process died from signal {name}"
        if sig == signal.SIGKILL:
            reason += " (killed from outside, often by the out-of-memory killer)"
    else:
        reason = f"The block's process exited with code {os.WEXITSTATUS(status)} before it finished"
    return ExecutionResult(status=FAILED, error=reason, metrics={"duration": duration})

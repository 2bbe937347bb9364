"""Run a block in a child process and supervise it (the child's own side is child.py).

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

import fcntl
import json
import os
import pickle
import selectors
import signal
import time
from collections.abc import Callable

from pipelines.execution.child import END_MARK
from pipelines.execution.forkserver import ForkServer, ForkServerError
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
# `child._on_sigurg`).
CHATTY_LINES = 1000
# How often the output of such a block is flushed to the pipes.
FLUSH_EVERY = 0.2
# The size its pipes get then (Linux's default limit for an unprivileged process).
_CHATTY_PIPE = 1024 * 1024
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

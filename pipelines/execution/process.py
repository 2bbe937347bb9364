"""Run a block in a child process and supervise it (the child's own side is child.py).

The child comes from the fork server (forkserver.py): forking it from a warm server
costs far less than starting a new interpreter and importing the executor (see the
README's performance section). The child leads its own process group, so a timeout or a
cancel kills the block together with any processes it started, and a crash in user code
(a segfault, `os._exit`) ends only the child. Memory the block used goes back when the
child exits.

The spec arrives on a pipe. The child's stdout and stderr are pipes read here (pipes.py
turns their bytes into log lines); its `logger` and its final result travel as JSON
lines on a third pipe. The child never uses the database.
"""

from __future__ import annotations

import enum
import os
import pickle
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipelines.execution.forkserver import ForkServer, ForkServerError
from pipelines.execution.pipes import ChildPipes, LogItem
from pipelines.execution.spec import (
    CANCELLED,
    FAILED,
    INTERRUPTED,
    BlockSpec,
    ExecutionResult,
)

# Called with new log lines: LogLine objects (the block's logger) and LogChunk objects
# (lines of stdout or stderr read together); the caller batches them into its store.
LogSink = Callable[[list[LogItem]], None]
# Called every `tick` seconds while the child runs. True: go on. False (the block run
# was cancelled or lost its claim) or INTERRUPTED (its worker is shutting down): kill
# the child, and end the block with that status.
Tick = Callable[[], bool | str]
# What runs the block in the child: a module-level function the server imports by name,
# called as run(spec, logger, context).
BlockRunner = Callable[..., ExecutionResult]

# Past this many lines of stdout and stderr, a block's output is buffered (see
# `child._on_sigurg`).
CHATTY_LINES = 1000
# How often the output of such a block is flushed to the pipes.
FLUSH_EVERY = 0.2
# What a pipe holds before a write blocks (Linux's default), less a margin.
_PIPE_BUFFER = 60 * 1024
# After the child has sent its result, how long to keep reading output that
# processes it started may still write to inherited stdout before we stop listening.
_GRACE = 0.2
# The longest the output of a block that has ended is read for.
_DRAIN_MAX = 30.0

# One fork server per orchestrating process and `run` function, by the function's path.
servers: dict[str, ForkServer] = {}
# Heavy modules the fork server has been asked to import already.
_preloaded: set[str] = set()


def _server(run: BlockRunner) -> ForkServer:
    """The fork server for `run`, started (again) if need be."""
    path = f"{run.__module__}:{run.__qualname__}"
    server = servers.get(path)
    if server is None or not server.alive():
        if server is not None and server.owner == os.getpid():
            server.close()
        server = ForkServer(path)
        servers[path] = server
    return server


def start_server(run: BlockRunner) -> None:
    """Start the fork server now, so that it is ready when the first block comes."""
    _server(run)


# --- starting a child --------------------------------------------------------------------


@dataclass
class _Child:
    """A started child, from the supervisor's side."""

    server: ForkServer  # the fork server that forked it and reaps it
    pid: int
    spec_w: int  # the write end of its spec pipe
    pipes: ChildPipes  # the read ends of its stdout, stderr and message pipes


def _payload(spec: BlockSpec, run: BlockRunner) -> bytes:
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


def _spawn(run: BlockRunner, payload: bytes) -> _Child:
    """A started child. The start of the spec (all of it, usually) is in the pipe before
    the child wakes, so it need not wait for the round trip that tells us its pid; the
    caller sends the rest (`_send_rest`). A fork server that fails is replaced once."""
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
        return _Child(server, pid, spec_w, ChildPipes(out_r, err_r, msg_r))
    raise AssertionError("unreachable")


def _send(fd: int, data: bytes | memoryview) -> bool:
    """Write all of `data` to the spec pipe; False if the child has gone."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        return False  # the child died; the supervisor reports how
    return True


def _send_rest(child: _Child, payload: bytes) -> None:
    """Send what `_spawn` did not put in the spec pipe. A child that dies before it has
    all of it ends without a result: the supervisor sees that."""
    _send(child.spec_w, memoryview(payload)[min(len(payload), _PIPE_BUFFER):])


def _result_or_exit(child: _Child, result: ExecutionResult | None, started: float) -> ExecutionResult:
    """`result`, or for a child that ended without one, what its wait status says."""
    return result if result is not None else _result(child.server.exit_status(child.pid), started)


def _preload(child: _Child, result: ExecutionResult) -> None:
    """Have the fork server import the heavy modules the block used (listed in its
    result's metrics by the child), so that later children find them loaded."""
    loaded = [m for m in (result.metrics.pop("loaded", None) or []) if m not in _preloaded]
    if loaded:
        _preloaded.update(loaded)
        child.server.preload(loaded)


# --- running blocks ----------------------------------------------------------------------


def run_in_child(
    spec: BlockSpec,
    run: BlockRunner,
    *,
    on_log: LogSink,
    on_tick: Tick | None = None,
    tick: float = 2.0,
) -> ExecutionResult:
    """Run `run(spec, logger, context)` in a child process and supervise it until it
    ends, its timeout passes, or `on_tick` asks to stop."""
    payload = _payload(spec, run)
    started = time.monotonic()
    child = _spawn(run, payload)
    try:
        _send_rest(child, payload)
    finally:
        os.close(child.spec_w)
    result, _ = _supervise(spec, child, started, on_log, on_tick, tick)
    result = _result_or_exit(child, result, started)
    _preload(child, result)
    return result


class Session:
    """One child process that runs several blocks one after another, for a pipeline
    run with `run_pipeline_in_one_process` (Mage's option): its blocks share that
    process's memory, the `context` dict included. A block that kills the process (a
    crash, a timeout, a cancel) ends the session, and the next block starts a new one.
    `close()` ends it; so does the caller's exit (the fork server kills what it forked)."""

    def __init__(self) -> None:
        self._child: _Child | None = None

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    def run(
        self, spec: BlockSpec, run: BlockRunner, *,
        on_log: LogSink, on_tick: Tick | None = None, tick: float = 2.0,
    ) -> ExecutionResult:
        spec.keep_alive = True
        payload = _payload(spec, run)
        started = time.monotonic()
        if self._child is not None and not _send(self._child.spec_w, payload):
            # The process ended between two blocks (killed from outside): the spec never
            # reached it and nothing of this block ran; it runs in a new process.
            self.close()
        if self._child is None:
            self._child = _spawn(run, payload)
            _send_rest(self._child, payload)
        child = self._child
        result, alive = _supervise(spec, child, started, on_log, on_tick, tick, session=True)
        result = _result_or_exit(child, result, started)
        if not alive:
            self.close()
        _preload(child, result)
        return result

    def close(self) -> None:
        if self._child is None:
            return
        child, self._child = self._child, None
        os.close(child.spec_w)  # the child reads the end of its specs and exits
        child.pipes.close()
        _kill_group(child.pid)  # with whatever its blocks started and left behind


# --- supervising a child -----------------------------------------------------------------


class Stop(enum.Enum):
    """Why the supervisor killed a child before its block ended."""

    TIMEOUT = "timeout"  # the block's timeout passed
    CANCELLED = "cancelled"  # `on_tick` said False
    INTERRUPTED = "interrupted"  # `on_tick` said INTERRUPTED: the worker is stopping


@dataclass(slots=True)
class _Supervision:
    """What supervising one block keeps track of from one read of the pipes to the next."""

    pid: int
    pipes: ChildPipes
    on_tick: Tick | None
    tick: float  # seconds between two calls of `on_tick`
    timeout: float | None  # the block's timeout in seconds, None for none
    deadline: float | None  # when that timeout passes
    next_tick: float  # when to call `on_tick` next
    stop: Stop | None = None  # why the child was killed, once it has been
    ended_at: float | None = None  # when the message pipe closed: the child is done
    result: dict[str, Any] | None = None  # the block's result, once it has come

    def block_done(self) -> bool:
        """For a child that runs several blocks: this block's result has come and its
        output has all been read, and the child is still there for the next one."""
        return self.result is not None and self.ended_at is None and self.pipes.output_marked()

    def wait_time(self, now: float) -> float | None:
        """How long the next read may wait for the pipes: until the next tick, the
        deadline, or the chatty block's next flush. None once the child has ended and
        its output has stopped coming."""
        waits = [self.next_tick - now]
        if self.deadline is not None and self.stop is None:
            waits.append(self.deadline - now)
        if self.ended_at is not None:
            # What the block wrote before it ended may still be in the pipes (a chatty
            # block's are large): read on while it comes, and then only as long as a
            # process the block started might still be writing.
            quiet_since = max(self.ended_at, self.pipes.last_read)
            if now >= quiet_since + _GRACE or now >= self.ended_at + _DRAIN_MAX:
                return None
            waits.append(quiet_since + _GRACE - now)
        elif self.pipes.lines > CHATTY_LINES:
            waits.append(self.pipes.next_flush - now)
        return max(0.0, min(waits))

    def read(self, wait: float) -> tuple[list[LogItem], bool]:
        """Read what the pipes have within `wait` seconds: the new log lines, and
        whether any output came. The result, when it comes, goes to `self.result`."""
        pipes = self.pipes
        batch: list[LogItem] = []
        read_some = False
        for key, _mask in pipes.selector.select(timeout=wait):
            if pipes.read(key.fd, batch):
                read_some = True
            elif key.fd == pipes.msg_r:
                self.ended_at = time.monotonic()
                _kill_group(self.pid)  # anything the block started and left behind goes with it
        if pipes.result is not None:
            self.result, pipes.result = pipes.result, None
        return batch, read_some

    def flush_chatty_output(self, now: float) -> None:
        """Past CHATTY_LINES lines, have the child flush its buffered output every
        FLUSH_EVERY seconds (the first signal switches it to buffering)."""
        pipes = self.pipes
        if pipes.lines > CHATTY_LINES and self.ended_at is None and now >= pipes.next_flush:
            if not pipes.next_flush:
                pipes.enlarge()
            pipes.next_flush = now + FLUSH_EVERY
            _signal(self.pid, signal.SIGURG)

    def enforce_deadline(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline and self.stop is None and self.ended_at is None:
            self._kill(Stop.TIMEOUT)

    def call_tick(self, now: float) -> None:
        """Every `tick` seconds, ask `on_tick` whether the block may go on."""
        if now < self.next_tick:
            return
        self.next_tick = now + self.tick
        if self.on_tick is not None and self.stop is None and self.ended_at is None:
            verdict = self.on_tick()
            if verdict is not True:
                self._kill(Stop.INTERRUPTED if verdict == INTERRUPTED else Stop.CANCELLED)

    def outcome(self, duration: float, alive: bool) -> tuple[ExecutionResult | None, bool]:
        """What `_supervise` returns."""
        if self.stop is Stop.CANCELLED:
            error = "Cancelled; the block's processes were killed"
            return ExecutionResult(status=CANCELLED, error=error, metrics={"duration": duration}), False
        if self.stop is Stop.INTERRUPTED:
            error = "Interrupted: its worker is shutting down; the block's processes were killed"
            return ExecutionResult(status=INTERRUPTED, error=error, metrics={"duration": duration}), False
        if self.stop is Stop.TIMEOUT:
            error = f"Timed out after {self.timeout:g} s; the block's processes were killed"
            return ExecutionResult(status=FAILED, error=error, metrics={"duration": duration}), False
        if self.result is not None:
            return ExecutionResult(**self.result), alive
        return None, False  # ended without a result: the caller asks how

    def _kill(self, reason: Stop) -> None:
        self.stop = reason
        _kill_group(self.pid)


def _supervise(
    spec: BlockSpec, child: _Child, started: float, on_log: LogSink, on_tick: Tick | None, tick: float,
    *, session: bool = False,
) -> tuple[ExecutionResult | None, bool]:
    """Read the child's pipes until it has finished the block, enforcing its timeout
    and calling `on_tick`. Returns the result (None if the child ended without one)
    and whether the child is still there for another block (`session` only).

    A child that runs one block closes stdout and stderr before it writes its result,
    so the result is the last thing to arrive and nothing waits for the process
    teardown. A child that runs several marks the end of each block's output on both
    instead, and stays.

    Each turn of the loop:
    1. waits for output, at most until the next thing to do (tick, deadline, flush);
    2. hands the lines read to `on_log` in one batch;
    3. has a chatty block flush its output, kills a block past its deadline, and
       calls `on_tick` when its time has come."""
    pipes = child.pipes
    pipes.marked.clear()
    state = _Supervision(
        pid=child.pid, pipes=pipes, on_tick=on_tick, tick=tick, timeout=spec.timeout,
        deadline=started + spec.timeout if spec.timeout else None, next_tick=started + tick,
    )
    alive = False
    try:
        while pipes.is_open():
            if session and state.block_done():
                alive = True  # and ready for the next block
                break
            wait = state.wait_time(time.monotonic())
            if wait is None:  # the child has ended and its output has stopped coming
                break
            batch, read_some = state.read(wait)
            if batch:
                on_log(batch)
            now = time.monotonic()
            if read_some:  # quiet is counted from here: storing lines is not quiet
                pipes.last_read = now
            state.flush_chatty_output(now)
            state.enforce_deadline(now)
            state.call_tick(now)
    finally:
        if not alive:
            if not session:
                pipes.close()
            _kill_group(child.pid)
    return state.outcome(time.monotonic() - started, alive)


# --- signals and exits -------------------------------------------------------------------


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

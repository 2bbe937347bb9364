"""Run a block in a child process and supervise it.

The child is forked from the caller (a django-q2 worker or `run_pipeline --sync`): a fork
costs a millisecond or two, where starting a new interpreter and importing Django costs
hundreds. The child leads its own process group, so a timeout or a cancel kills the
block together with any processes it started, and a crash in user code (a segfault,
`os._exit`) ends only the child. Memory the block used goes back when the child exits.

The child's stdout and stderr are pipes read line by line; its `logger` and its final
result travel as JSON lines on a third pipe. The child never uses the database: the
connections it inherits belong to the parent.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import selectors
import signal
import sys
import time
from collections.abc import Callable

from pipelines.execution.spec import CANCELLED, FAILED, BlockSpec, ExecutionResult, LogLine

# Called with new log lines; the caller batches them into its store.
LogSink = Callable[[list[LogLine]], None]
# Called every `tick` seconds while the child runs; returning False kills the child
# (the block run was cancelled or lost its claim).
Tick = Callable[[], bool]

_MAX_LINE = 64 * 1024


class _PipeLogHandler(logging.Handler):
    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            self.stream.write(json.dumps({"t": "log", "ts": record.created, "level": record.levelname, "msg": message}) + "\n")
            self.stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break the block
            self.handleError(record)


def _child(spec: BlockSpec, msg_fd: int, run: Callable[..., ExecutionResult]) -> None:
    """Body of the forked child. Never returns."""
    code = 0
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        _forget_parent_connections()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        messages = open(msg_fd, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
        logger = logging.Logger(f"millrace.block.{spec.block_uuid}", logging.DEBUG)
        handler = _PipeLogHandler(messages)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        result = run(spec, logger, {})
        sys.stdout.flush()
        sys.stderr.flush()
        result.metrics["peak_memory_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        messages.write(json.dumps({"t": "result", "result": result.__dict__}, default=str) + "\n")
        messages.flush()
    except BaseException:  # noqa: BLE001 - whatever happens, the child must end here
        code = 70
    finally:
        os._exit(code)


def _forget_parent_connections() -> None:
    try:
        from django.db import connections
    except ImportError:
        return
    for conn in connections.all(initialized_only=True):
        # Dropped, not closed: closing would end the parent's session on the server.
        conn.connection = None


def run_in_child(
    spec: BlockSpec,
    run: Callable[..., ExecutionResult],
    *,
    on_log: LogSink,
    on_tick: Tick | None = None,
    tick: float = 2.0,
) -> ExecutionResult:
    """Fork, run `run(spec, logger, context)` in the child, and supervise it until it
    ends, its timeout passes, or `on_tick` asks to stop."""
    sys.stdout.flush()
    sys.stderr.flush()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    msg_r, msg_w = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.setpgid(0, 0)
            os.close(out_r)
            os.close(err_r)
            os.close(msg_r)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.close(out_w)
            os.close(err_w)
        except BaseException:  # noqa: BLE001
            os._exit(70)
        _child(spec, msg_w, run)
    # Parent. setpgid on both sides closes the race where we would kill before the
    # child has made its own group.
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass
    for fd in (out_w, err_w, msg_w):
        os.close(fd)
    return _supervise(spec, pid, out_r, err_r, msg_r, started, on_log, on_tick, tick)


def _supervise(spec, pid, out_r, err_r, msg_r, started, on_log, on_tick, tick) -> ExecutionResult:
    selector = selectors.DefaultSelector()
    buffers = {out_r: b"", err_r: b"", msg_r: b""}
    levels = {out_r: "INFO", err_r: "WARNING"}
    for fd in buffers:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    result: dict | None = None
    killed_because = ""
    deadline = started + spec.timeout if spec.timeout else None
    next_tick = started + tick
    pending: list[LogLine] = []
    try:
        while selector.get_map():
            now = time.monotonic()
            wait = next_tick - now
            if deadline is not None:
                wait = min(wait, deadline - now)
            events = selector.select(timeout=max(0.0, wait))
            for key, _mask in events:
                fd = key.fd
                chunk = os.read(fd, 65536)
                if not chunk:
                    selector.unregister(fd)
                    os.close(fd)
                    if buffers[fd]:
                        result = _take_line(fd, buffers[fd], msg_r, levels, pending, result)
                    buffers[fd] = b""
                    if fd == msg_r:
                        # The child has ended. Anything it started that still holds
                        # stdout open would keep us reading forever: end it now.
                        _kill_group(pid)
                    continue
                data = buffers[fd] + chunk
                *lines, rest = data.split(b"\n")
                if len(rest) > _MAX_LINE:  # a huge line without newline: flush it as is
                    lines.append(rest)
                    rest = b""
                buffers[fd] = rest
                for line in lines:
                    result = _take_line(fd, line, msg_r, levels, pending, result)
            if pending:
                on_log(pending)
                pending = []
            now = time.monotonic()
            if deadline is not None and now >= deadline and not killed_because:
                killed_because = f"Timed out after {spec.timeout:g} s; the block's processes were killed"
                _kill_group(pid)
            if now >= next_tick:
                next_tick = now + tick
                if on_tick is not None and not killed_because and not on_tick():
                    killed_because = "cancelled"
                    _kill_group(pid)
    finally:
        for fd in list(selector.get_map() or {}):
            os.close(fd)
        selector.close()
        # Every pipe is closed: the child has ended, or we are leaving on an error and
        # must not leave it behind. Either way nothing of its group may outlive it.
        _kill_group(pid)
        _, status = os.waitpid(pid, 0)
    return _result(spec, status, result, killed_because, started)


def _take_line(fd, line: bytes, msg_r, levels, pending: list[LogLine], result):
    if fd == msg_r:
        try:
            message = json.loads(line)
        except ValueError:
            return result
        if message.get("t") == "result":
            return message["result"]
        pending.append(LogLine(message.get("ts", time.time()), message.get("level", "INFO"), message.get("msg", "")))
        return result
    text = line.decode("utf-8", errors="replace").rstrip("\r")
    pending.append(LogLine(time.time(), levels[fd], text))
    return result


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _result(spec: BlockSpec, status: int, result: dict | None, killed_because: str, started: float) -> ExecutionResult:
    duration = time.monotonic() - started
    if killed_because == "cancelled":
        return ExecutionResult(status=CANCELLED, error="Cancelled; the block's processes were killed", metrics={"duration": duration})
    if killed_because:
        return ExecutionResult(status=FAILED, error=killed_because, metrics={"duration": duration})
    if result is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return ExecutionResult(**result)
    if os.WIFSIGNALED(status):
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

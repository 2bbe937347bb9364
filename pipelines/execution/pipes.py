"""The supervisor's ends of a child's three pipes, and what their bytes become: the
block's stdout and stderr as chunks of log lines, its `logger` lines, its result.

This is the path every line a block prints takes, so output is handled a read at a
time, never a line at a time: a read's complete lines become one LogChunk.
"""

from __future__ import annotations

import fcntl
import json
import os
import selectors
import time
from typing import Any

from pipelines.execution.child import END_MARK
from pipelines.execution.spec import LogChunk, LogLine

# What one read takes from a pipe at most.
_READ_SIZE = 65536
# Output lines longer than this are cut; result and logger messages never are.
_MAX_LINE = 64 * 1024
# The size a chatty block's output pipes get (Linux's default limit for an
# unprivileged process).
_CHATTY_PIPE = 1024 * 1024
# The end-of-block line of a child that runs several blocks, as text.
_MARK_TEXT = END_MARK.rstrip(b"\n").decode()

# What a read adds to the batch handed to the caller's log sink.
LogItem = LogLine | LogChunk


class ChildPipes:
    """The read ends of a child's stdout, stderr and message pipes, with what has been
    read of each but not yet split into lines (kept from one block to the next when
    the child runs several)."""

    def __init__(self, out_r: int, err_r: int, msg_r: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.buffers = {out_r: b"", err_r: b"", msg_r: b""}
        self.levels = {out_r: "INFO", err_r: "WARNING"}
        self.out_r, self.err_r, self.msg_r = out_r, err_r, msg_r
        self.marked: set[int] = set()  # the output pipes whose end-of-block mark came
        self.result: dict[str, Any] | None = None  # the block's result, once it has come
        self.lines = 0  # lines of stdout and stderr read so far
        self.next_flush = 0.0  # when to send the next SIGURG (see `child._on_sigurg`)
        self.last_read = 0.0  # when output last came
        for fd in self.buffers:
            os.set_blocking(fd, False)
            self.selector.register(fd, selectors.EVENT_READ)

    def is_open(self) -> bool:
        """Whether any of the pipes is still open."""
        return bool(self.selector.get_map())

    def output_marked(self) -> bool:
        """Whether the end-of-block mark has come on both stdout and stderr."""
        return self.out_r in self.marked and self.err_r in self.marked

    def read(self, fd: int, batch: list[LogItem]) -> bool:
        """Read what the pipe `fd` has (the selector said it is ready), adding its
        complete lines to `batch`. False at the end of the pipe, which is then closed
        and its last, unfinished line taken as it is."""
        chunk = os.read(fd, _READ_SIZE)
        if chunk:
            self.buffers[fd] = self._split_lines(fd, self.buffers[fd] + chunk, batch)
            return True
        self.selector.unregister(fd)
        os.close(fd)
        if self.buffers[fd]:
            self._take_line(fd, self.buffers[fd], batch)
            self.buffers[fd] = b""
        return False

    def enlarge(self) -> None:
        """Give a chatty block's output pipes more room than Linux's default 64 KiB, so
        that it goes on printing while its lines are being stored instead of waiting on
        a full pipe."""
        for fd in (self.out_r, self.err_r):
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _CHATTY_PIPE)
            except (OSError, AttributeError):
                pass  # past the user's share of pipe memory, or not Linux: the default stays

    def close(self) -> None:
        for key in list((self.selector.get_map() or {}).values()):
            os.close(key.fd)
        self.selector.close()

    def _split_lines(self, fd: int, data: bytes, batch: list[LogItem]) -> bytes:
        """Take the complete lines out of `data`, return the incomplete rest. Output lines
        longer than _MAX_LINE are cut; result and logger messages never are."""
        if fd == self.msg_r:
            *lines, rest = data.split(b"\n")
            for line in lines:
                self._take_line(fd, line, batch)
            return rest
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) <= _MAX_LINE:
                return data
            end = len(data)
        self._take_output(fd, data[:end], batch)
        return data[end + 1:]

    def _take_output(self, fd: int, data: bytes, batch: list[LogItem]) -> None:
        """Complete lines of stdout or stderr (without the last newline), the whole read
        as one chunk."""
        text = data.decode("utf-8", errors="replace")
        if "\r" in text:
            text = text.replace("\r\n", "\n")
        if _MARK_TEXT in text:  # a block of a run in one process ended here
            self.marked.add(fd)
            messages = [message for message in text.split("\n") if message != _MARK_TEXT]
            if not messages:
                return
            text = "\n".join(messages)
        count = text.count("\n") + 1
        self.lines += count
        batch.append(LogChunk(time.time(), self.levels[fd], text, count))

    def _take_line(self, fd: int, line: bytes, batch: list[LogItem]) -> None:
        """One line of a pipe: on the message pipe a `logger` line or the result, on the
        others output."""
        if fd != self.msg_r:
            self._take_output(fd, line, batch)
            return
        try:
            message = json.loads(line)
        except ValueError:
            return
        if message.get("t") == "result":
            self.result = message["result"]
        else:
            batch.append(LogLine(message.get("ts", time.time()), message.get("level", "INFO"), message.get("msg", "")))

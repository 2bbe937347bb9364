"""A running attempt's log lines: written in batches with its heartbeat, and capped.

Each batch is written in one transaction with a heartbeat that succeeds only while the
attempt holds its claim: once a block run is cancelled or taken over, its old attempt
writes nothing more, not even a log line.

A block cannot flood the database: of its lines, the first half of
MILLRACE_LOG_LINES_PER_BLOCK (the head) are stored as they come; the ones after are held
back, and only the last half (the tail) is stored when the block ends. When that leaves
lines out, a line between head and tail says how many, and every line, head included,
also goes to a gzip file beside the block's outputs (`log.txt.gz`), which the API serves
for download. (So past the head a block's lines show when it ends, or in the file.) A block that prints
200,000 lines thus writes 10,000 rows instead of 200,000 (58 MB a run, and writes that
slowed the block to 24-28 s).
"""

from __future__ import annotations

import gzip
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from pipelines import variables
from pipelines.execution import INTERRUPTED, ExecutionResult, LogChunk, LogLine, log_lines
from runs import stopping
from runs.models import BlockRun, BlockRunStatus, LogEntry
from runs.orchestrator.sql import insert_log_lines, lock_run_row

S = BlockRunStatus

LOG_FILE = "log.txt.gz"


def output_prefix(run_id: int, block_uuid: str, claim: str) -> str:
    """Where an attempt's outputs (and its whole log, when capped) are stored."""
    return f"pipeline_runs/{run_id}/{block_uuid}/{claim}"


class LogWriter:
    # Lines are written every EVERY seconds, or as soon as this many wait (which bounds
    # the memory of an uncapped flood): the supervisor stops reading the block's pipes
    # while it writes, so a flood of lines is better written late and at once than in
    # many small writes that each hold the block up.
    BATCH = 50_000
    HEAD_KEPT = 8 * 1024 * 1024  # characters
    EVERY = 0.5  # seconds

    def __init__(self, block_run: BlockRun, claim: str):
        self.block_run = block_run
        self.claim = claim
        self.code_hash = ""
        self.lines: list[LogLine] = []  # waiting to be written
        self.last = time.monotonic()
        self.fenced = False
        self.cap = settings.MILLRACE_LOG_LINES_PER_BLOCK
        self.head = self.cap - self.cap // 2
        # What came past the head, as it came (chunks of output, logger lines), oldest
        # first, dropped from the left once the rest holds the tail's lines.
        self.tail: deque[LogLine | LogChunk] = deque()
        self.tail_lines = 0
        self.count = 0  # lines received in all
        self.full: _FullLog | None = None  # the whole output, once lines are left out
        # The head's lines as written, kept (up to HEAD_KEPT bytes) for the file, which
        # would otherwise read them back from the database.
        self.written: list[LogLine] | None = []
        self.written_bytes = 0

    def add(self, items: list[LogLine | LogChunk]) -> None:
        for item in items:
            size = item.count if isinstance(item, LogChunk) else 1
            if self.cap and self.count + size > self.head:
                self._past_head(item, size)
            else:
                self.lines.extend(item.lines() if isinstance(item, LogChunk) else (item,))
            self.count += size
        if len(self.lines) >= self.BATCH or time.monotonic() - self.last >= self.EVERY:
            self.heartbeat()

    def heartbeat(self) -> bool | str:
        """Record a heartbeat and write the waiting lines. False once the claim is lost,
        INTERRUPTED once the worker's shutdown grace is over: the caller then kills the
        block."""
        self.last = time.monotonic()
        if self.fenced:
            return False
        with transaction.atomic():
            if self.lines:
                # Log rows reference the run, and PostgreSQL checks that at commit with a
                # share lock on the run's row: taken first, in the order a cancel takes
                # its locks (the run, then its block runs), or the two could deadlock.
                lock_run_row(self.block_run.pipeline_run_id, share=True)
            alive = BlockRun.objects.filter(pk=self.block_run.pk, claim=self.claim, status=S.RUNNING).update(
                heartbeat_at=timezone.now()
            )
            if alive:
                self.write()
        if not alive:
            self.fenced, self.lines = True, []
            return False
        return INTERRUPTED if stopping.grace_over() else True

    def write(self) -> None:
        """Write the waiting lines; the caller has checked the claim in this transaction."""
        if not self.lines:
            return
        br = self.block_run
        lines, self.lines = self.lines, []
        insert_log_lines(br.pipeline_run_id, br.pk, br.block_uuid, br.block_type, br.attempt, lines)
        if self.written is not None and self.full is None:
            self.written_bytes += sum(len(line.message) for line in lines)
            if self.written_bytes <= self.HEAD_KEPT:
                self.written.extend(lines)
            else:
                self.written = None

    def close(self, result: ExecutionResult) -> None:
        """The block has ended: queue what was held back (the tail) and, when lines were
        left out, a line saying which and where they are, finish the file and note both
        in the result's metrics. Called before the result's transaction (file I/O stays
        out of it)."""
        tail = log_lines(self.tail)
        if self.full is None:
            self.lines.extend(tail)  # no more than the cap: every line is stored
            return
        self.full.close()
        tail = tail[len(tail) - self.cap // 2:]
        left_out = self.count - self.head - len(tail)
        self.lines.append(LogLine(time.time(), "WARNING", (
            f"... {left_out:,} lines not stored here (lines {self.head + 1:,} to {self.head + left_out:,} of "
            f"{self.count:,}; MILLRACE_LOG_LINES_PER_BLOCK is {self.cap:,}): the whole output is in {self.full.key} "
            f"(GET /api/block_runs/{self.block_run.pk}/log_file)"
        )))
        self.lines.extend(tail)
        result.metrics.update(log_lines=self.count, log_lines_left_out=left_out, log_file=self.full.key)

    def _past_head(self, item: LogLine | LogChunk, size: int) -> None:
        """What comes past the head waits in the tail; once that is more than the cap
        lets through, the whole output goes to a file as well."""
        room = self.head - self.count
        if room > 0:  # the item straddles the head: its first lines are the head's last
            lines = item.lines() if isinstance(item, LogChunk) else [item]
            self.lines.extend(lines[:room])
            rest = lines[room:]
            item = LogChunk(rest[0].timestamp, rest[0].level, "\n".join(line.message for line in rest), len(rest))
            size = len(rest)
        self.tail.append(item)
        self.tail_lines += size
        if self.full is None and self.count + size > self.cap:
            self.full = self._start_full_log()  # the tail, with this item
        elif self.full is not None:
            self.full.write([item])
        keep = self.cap // 2
        while self.tail:  # whole items only: `close` cuts the tail to its size
            first = self.tail[0]
            first_size = first.count if isinstance(first, LogChunk) else 1
            if self.tail_lines - first_size < keep:
                break
            self.tail.popleft()
            self.tail_lines -= first_size

    def _start_full_log(self) -> _FullLog:
        """Open the file of the whole output with what came so far: the rows already
        stored, those waiting, and the tail (which has dropped nothing yet)."""
        br = self.block_run
        full = _FullLog(f"{output_prefix(br.pipeline_run_id, br.block_uuid, self.claim)}/{LOG_FILE}")
        if self.written is not None:
            full.write(self.written)
        else:  # a head too big to keep
            stored = LogEntry.objects.filter(block_run_id=br.pk, attempt=br.attempt).order_by("id")
            full.write([LogLine(ts.timestamp(), level, message) for ts, level, message in stored.values_list("timestamp", "level", "message")])
        self.written = None
        full.write(self.lines)
        full.write(list(self.tail))
        return full


class _FullLog:
    """A block run's whole output as gzip text, a line per log line: "time level message".

    Compressing is the largest cost of a flood of lines, so a thread of its own does it
    (zlib lets go of the interpreter while it compresses) while the supervisor goes on
    reading the block's pipes; the supervisor only formats the lines."""

    def __init__(self, key: str):
        self.key = key
        self._raw = variables.open_file(key, "wb")
        self._gzip = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=1)
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._compress, name="millrace-log-file", daemon=True)
        self._thread.start()
        self._second = -1
        self._stamp = ""

    def write(self, items: Sequence[LogLine | LogChunk]) -> None:
        parts = []
        for item in items:
            second = int(item.timestamp)
            if second != self._second:  # lines come thousands to a second
                self._second = second
                self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
            prefix = f"{self._stamp} {item.level} "
            if isinstance(item, LogChunk):
                # A chunk's lines share its time and level: one replace, not a format
                # per line (a block may print a million lines).
                parts.append(prefix + item.text.replace("\n", "\n" + prefix) + "\n")
            else:
                parts.append(f"{prefix}{item.message}\n")
        if parts:
            self._queue.put("".join(parts).encode("utf-8", "backslashreplace"))

    def _compress(self) -> None:
        while (data := self._queue.get()) is not None:
            self._gzip.write(data)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._gzip.close()
        self._raw.close()

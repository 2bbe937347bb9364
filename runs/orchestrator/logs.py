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
import io
import time
from collections import deque
from datetime import UTC, datetime
from typing import IO

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from pipelines import variables
from pipelines.execution import INTERRUPTED, ExecutionResult, LogLine
from runs import stopping
from runs.models import BlockRun, BlockRunStatus, LogEntry
from runs.orchestrator.sql import _lock_run_row, _log_row

S = BlockRunStatus

LOG_FILE = "log.txt.gz"


def output_prefix(run_id: int, block_uuid: str, claim: str) -> str:
    """Where an attempt's outputs (and its whole log, when capped) are stored."""
    return f"pipeline_runs/{run_id}/{block_uuid}/{claim}"


class LogWriter:
    BATCH = 500
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
        self.tail: deque[LogLine] = deque(maxlen=self.cap // 2)
        self.count = 0  # lines received in all
        self.full: _FullLog | None = None  # the whole output, once past the head

    def add(self, lines: list[LogLine]) -> None:
        if self.cap and self.count + len(lines) > self.head:
            self._past_head(lines)
        else:
            self.lines.extend(lines)
        self.count += len(lines)
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
                _lock_run_row(self.block_run.pipeline_run_id, share=True)
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
        rows = [
            _log_row(br.pipeline_run_id, br.pk, datetime.fromtimestamp(line.timestamp, tz=UTC), line.level, line.message, br.block_uuid, br.block_type, br.attempt)
            for line in self.lines
        ]
        self.lines = []
        LogEntry.objects.bulk_create(rows, batch_size=self.BATCH)

    def close(self, result: ExecutionResult) -> None:
        """The block has ended: queue what was held back (the tail) and, when lines were
        left out, a line saying which and where they are, finish the file and note both
        in the result's metrics. Called before the result's transaction (file I/O stays
        out of it)."""
        if self.full is None:
            self.lines.extend(self.tail)  # no more than the cap: every line is stored
            return
        self.full.close()
        left_out = self.count - self.head - len(self.tail)
        self.lines.append(LogLine(time.time(), "WARNING", (
            f"... {left_out:,} lines not stored here (lines {self.head + 1:,} to {self.head + left_out:,} of "
            f"{self.count:,}; MILLRACE_LOG_LINES_PER_BLOCK is {self.cap:,}): the whole output is in {self.full.key} "
            f"(GET /api/block_runs/{self.block_run.pk}/log_file)"
        )))
        self.lines.extend(self.tail)
        result.metrics.update(log_lines=self.count, log_lines_left_out=left_out, log_file=self.full.key)

    def _past_head(self, lines: list[LogLine]) -> None:
        """Lines past the head wait in the tail; once they are more than it holds, the
        whole output goes to a file as well."""
        room = max(0, self.head - self.count)
        self.lines.extend(lines[:room])
        rest = lines[room:]
        if self.full is None and self.count + len(lines) > self.cap:
            self.full = self._start_full_log()
        if self.full is not None:
            self.full.write(rest)
        self.tail.extend(rest)

    def _start_full_log(self) -> _FullLog:
        """Open the file of the whole output with what came so far: the rows already
        stored, those waiting, and the tail (which has dropped nothing yet)."""
        br = self.block_run
        full = _FullLog(f"{output_prefix(br.pipeline_run_id, br.block_uuid, self.claim)}/{LOG_FILE}")
        stored = LogEntry.objects.filter(block_run_id=br.pk, attempt=br.attempt).order_by("id")
        full.write([LogLine(ts.timestamp(), level, message) for ts, level, message in stored.values_list("timestamp", "level", "message")])
        full.write(self.lines)
        full.write(list(self.tail))
        return full


class _FullLog:
    """A block run's whole output as gzip text, a line per log line: "time level message".
    Compressed fast (level 1): it must keep up with a block printing as fast as it can."""

    def __init__(self, key: str):
        self.key = key
        self.file: IO[str] = io.TextIOWrapper(
            gzip.GzipFile(fileobj=variables.open_file(key, "wb"), mode="wb", compresslevel=1),
            encoding="utf-8", errors="replace", write_through=False,
        )
        self._second = -1
        self._stamp = ""

    def write(self, lines: list[LogLine]) -> None:
        parts = []
        for line in lines:
            second = int(line.timestamp)
            if second != self._second:  # lines come thousands to a second
                self._second = second
                self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
            parts.append(f"{self._stamp} {line.level} {line.message}\n")
        self.file.write("".join(parts))

    def close(self) -> None:
        raw = self.file.buffer.fileobj  # type: ignore[attr-defined]
        self.file.close()
        raw.close()

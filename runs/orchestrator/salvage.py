"""What the periodic passes do with a row they cannot handle: record it on that row and
go on with the others.

A pass (reconcile, due retries, deadlines, waking waiting runs) handles each row in a
savepoint of its own (`isolate.isolated`). A row whose handling raises (a value stored
by an older version, or written straight into the database, that the normal path cannot
read) is then failed by last-resort writes that read no JSON column and load no model:
its block run `failed` with the error, its run advanced (or, if even that raises,
failed), and a log line on the run saying why. Before, one such row raised on every
tick and stopped the recovery of every other run.
"""

from __future__ import annotations

from datetime import datetime

from django.db import transaction
from django.utils import timezone

from runs.models import BlockRun, BlockRunStatus, LogEntry
from runs.orchestrator.advance import advance, dispatch
from runs.orchestrator.isolate import OPEN, isolated, run_fail
from runs.orchestrator.sql import lock_run_row

S = BlockRunStatus


def block_run_fail(block_run_id: int, reason: str, *, claim: str | None = None, now: datetime | None = None) -> None:
    """Fail a block run that has not finished, with `reason`, then advance its run; if
    the run cannot be advanced either, fail the run. With `claim`, only while that
    attempt still holds the block run (fencing)."""
    now = now or timezone.now()
    row = BlockRun.objects.filter(pk=block_run_id).values_list("pipeline_run_id", "block_uuid", "attempt").first()
    if row is None:
        return
    run_id, uuid, attempt = row
    with transaction.atomic():
        lock_run_row(run_id)
        rows = BlockRun.objects.filter(pk=block_run_id, status__in=OPEN)
        if claim is not None:
            rows = rows.filter(claim=claim, status=S.RUNNING)
        failed = rows.update(
            status=S.FAILED, claim="", next_retry_at=None, error=reason[:10000], traceback="",
            completed_at=now, updated_at=now,
        )
        if failed:
            LogEntry.objects.create(
                pipeline_run_id=run_id, block_run_id=block_run_id, timestamp=now, level="ERROR",
                message=f"Block {uuid} failed: it could not be handled ({reason})",
                block_uuid=uuid, attempt=attempt,
            )
    if failed:
        run_advance_or_fail(run_id, reason, now=now)


def run_advance_or_fail(run_id: int, reason: str, *, now: datetime | None = None) -> None:
    """Advance a run; if that raises, fail it with `reason`."""
    isolated(
        f"advancing run {run_id}", lambda: dispatch(advance(run_id)),
        lambda why: run_fail(run_id, f"{reason}; {why}", now=now),
    )

"""Handling rows one at a time, each in a savepoint of its own, so that one row a pass
cannot handle never stops the pass over the others (see `salvage` for the rest).

Nothing here imports the rest of the orchestrator: `advance` uses it too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from django.db import transaction
from django.db.models.functions import Coalesce
from django.utils import timezone

from runs.models import BlockRun, BlockRunStatus, LogEntry, PipelineRun, PipelineRunStatus
from runs.orchestrator.sql import lock_run_row

S = BlockRunStatus
T = TypeVar("T")

log = logging.getLogger("millrace.orchestrator")

OPEN = (S.INITIAL, S.QUEUED, S.RUNNING)


def isolated(what: str, work: Callable[[], T], on_error: Callable[[str], None] | None = None) -> T | None:
    """`work()` in a savepoint of its own. If it raises, the savepoint is rolled back,
    the error logged with `what` (the pass and the row), and `on_error(reason)` called
    in another savepoint to record the failure on the row. Returns what `work` returned,
    or None when it raised."""
    try:
        with transaction.atomic():
            return work()
    except Exception as exc:  # one row must not stop the pass over the others
        log.exception("%s failed", what)
        reason = f"{type(exc).__name__}: {exc}"
    if on_error is not None:
        try:
            with transaction.atomic():
                on_error(reason)
        except Exception:  # nothing more can be done for this row on this tick
            log.exception("%s: the failure could not be recorded either", what)
    return None


def run_fail(run_id: int, reason: str, *, now: datetime | None = None) -> None:
    """End an unfinished run as `failed` with plain writes: its running block runs
    fail, the others that had not finished are cancelled."""
    now = now or timezone.now()
    with transaction.atomic():
        lock_run_row(run_id)
        ended = PipelineRun.objects.filter(pk=run_id, status__in=[PipelineRunStatus.INITIAL, PipelineRunStatus.RUNNING]).update(
            status=PipelineRunStatus.FAILED, completed_at=now, started_at=Coalesce("started_at", now),
            waiting_for_slot=False, waiting_for_run_slot=False, updated_at=now,
        )
        if not ended:
            return
        open_runs = BlockRun.objects.filter(pipeline_run_id=run_id, status__in=OPEN)
        open_runs.filter(status=S.RUNNING).update(status=S.FAILED, claim="", error=reason[:10000], completed_at=now, updated_at=now)
        open_runs.update(status=S.CANCELLED, claim="", next_retry_at=None, completed_at=now, updated_at=now)
        LogEntry.objects.create(
            pipeline_run_id=run_id, timestamp=now, level="ERROR",
            message=f"Run failed: it could not be handled ({reason})",
        )

"""Repairing what dead workers left behind (the scheduler's periodic pass)."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from pipelines.execution import ExecutionResult
from runs.models import (
    BLOCK_ACTIVE,
    BlockRun,
    BlockRunStatus,
    PipelineRun,
    PipelineRunStatus,
)
from runs.orchestrator.advance import advance, dispatch
from runs.orchestrator.execute import _finish
from runs.orchestrator.retries import retries_due, wake_waiting_runs

S = BlockRunStatus


def reconcile(now: datetime | None = None) -> dict[str, int]:
    """Repair what dead workers left: a running block run whose heartbeat (or, before the
    first one, start) is older than the limit is failed, or retried when it has retries
    left, which also frees its concurrency slot; a queued one whose task went missing is
    sent again; retries that are due are queued; a run with nothing active is advanced.
    Returns counts of what it did."""
    now = now or timezone.now()
    limit = timedelta(seconds=settings.MILLRACE_HEARTBEAT_LIMIT)
    done = {"failed": 0, "requeued": 0, "retried": 0, "advanced": 0}
    stale = Q(heartbeat_at__lt=now - limit) | Q(heartbeat_at__isnull=True, started_at__lt=now - limit)
    for br in BlockRun.objects.filter(stale, status=S.RUNNING).select_related("pipeline_run__pipeline"):
        seen = br.heartbeat_at or br.started_at
        error = f"The worker running this block stopped heartbeating (last sign of life {seen:%Y-%m-%d %H:%M:%S} UTC); it is presumed dead"
        dispatch(_finish(br, br.claim, ExecutionResult(status=S.FAILED, error=error))[0])
        done["failed"] += 1
    if done["failed"]:
        # The dead attempts' global slots are free: runs waiting for one go on now.
        dispatch(wake_waiting_runs())
    retried = retries_due(now)
    dispatch(retried)
    done["retried"] = len(retried)
    lost = list(BlockRun.objects.filter(status=S.QUEUED, queued_at__lt=now - limit).values_list("id", flat=True))
    if lost:
        BlockRun.objects.filter(id__in=lost, status=S.QUEUED).update(queued_at=now)
        dispatch(lost)
        done["requeued"] = len(lost)
    # Only runs untouched for a while: a run being created or advanced right now is not
    # stalled, and the tick stays cheap.
    idle = PipelineRun.objects.filter(
        status__in=[PipelineRunStatus.INITIAL, PipelineRunStatus.RUNNING], updated_at__lt=now - limit,
    ).exclude(block_runs__status__in=list(BLOCK_ACTIVE)).order_by("created_at").values_list("id", flat=True)
    for run_id in idle:
        dispatch(advance(run_id))
        done["advanced"] += 1
    return done

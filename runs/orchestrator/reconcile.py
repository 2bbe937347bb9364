"""Repairing what dead workers left behind (the scheduler's periodic pass).

Each row is handled in a savepoint of its own (`isolate.isolated`): a row that cannot be
handled is failed on the spot (`salvage`) and the pass goes on with the others."""

from __future__ import annotations

import socket
from datetime import datetime, timedelta
from functools import partial

import psutil
from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from pipelines.execution import INTERRUPTED, ExecutionResult
from runs.models import (
    BLOCK_ACTIVE,
    BlockRun,
    BlockRunStatus,
    Heartbeat,
    HeartbeatKind,
    PipelineRun,
    PipelineRunStatus,
)
from runs.orchestrator.advance import advance, dispatch
from runs.orchestrator.execute import finish
from runs.orchestrator.isolate import isolated
from runs.orchestrator.retries import retries_due, wake_waiting_runs
from runs.orchestrator.salvage import block_run_fail, run_advance_or_fail

S = BlockRunStatus


def reconcile(now: datetime | None = None) -> dict[str, int]:
    """Repair what dead workers left: a running block run whose heartbeat (or, before the
    first one, start) is older than the limit is failed, or retried when it has retries
    left, which also frees its concurrency slot; a queued one whose task went missing is
    sent again; retries that are due are queued; a run with nothing active is advanced.
    Returns counts of what it did."""
    now = now or timezone.now()
    limit = timedelta(seconds=settings.MILLRACE_HEARTBEAT_LIMIT)
    done = {"failed": 0, "requeued": 0, "retried": 0, "advanced": 0, "clusters_lost": 0}
    for cluster, why in dead_clusters(now):
        # Its tasks may have been taken from the broker at any time until it died,
        # which is some time between its last heartbeat and now.
        failed, requeued = cluster_recover(
            cluster.name, before=now, now=now,
            reason=f"The worker cluster {cluster.name} on {cluster.host} (pid {cluster.pid}) that ran this block is gone ({why})",
        )
        done["failed"] += failed
        done["requeued"] += requeued
        done["clusters_lost"] += 1
    stale = Q(heartbeat_at__lt=now - limit) | Q(heartbeat_at__isnull=True, started_at__lt=now - limit)
    # Ids first, each row read in its own savepoint: a row whose columns cannot be read
    # must not stop the others.
    for pk, seen in BlockRun.objects.filter(stale, status=S.RUNNING).values_list("id", "heartbeat_at").order_by("id"):
        error = "The worker running this block stopped heartbeating"
        error += f" (last sign of life {seen:%Y-%m-%d %H:%M:%S} UTC); it is presumed dead" if seen else "; it is presumed dead"
        done["failed"] += _fail_block_run(pk, error)
    if done["failed"]:
        # The dead attempts' global slots are free: runs waiting for one go on now.
        dispatch(wake_waiting_runs())
    retried = retries_due(now)
    dispatch(retried)
    done["retried"] = len(retried)
    lost = list(BlockRun.objects.filter(status=S.QUEUED, queued_at__lt=now - limit).values_list("id", flat=True))
    done["requeued"] += requeue(lost, now)
    # Only runs untouched for a while: a run being created or advanced right now is not
    # stalled, and the tick stays cheap.
    idle = PipelineRun.objects.filter(
        status__in=[PipelineRunStatus.INITIAL, PipelineRunStatus.RUNNING], updated_at__lt=now - limit,
    ).exclude(block_runs__status__in=list(BLOCK_ACTIVE)).order_by("created_at").values_list("id", flat=True)
    for run_id in list(idle):
        isolated(
            f"reconcile: advancing idle run {run_id}", partial(_advance_and_dispatch, run_id),
            partial(run_advance_or_fail, run_id, now=now),
        )
        done["advanced"] += 1
    return done


def _fail_block_run(pk: int, error: str, status: str = S.FAILED) -> int:
    """Fail (or retry) a running block run whose worker is gone, or with status
    INTERRUPTED hand it back; 1 if it was."""

    def fail() -> int:
        br = BlockRun.objects.select_related("pipeline_run__pipeline").get(pk=pk)
        if br.status != S.RUNNING:
            return 0
        dispatch(finish(br, br.claim, ExecutionResult(status=status, error=error)).queued)
        return 1

    result = isolated(f"reconcile: block run {pk}", fail, lambda why: block_run_fail(pk, f"{error}; then {why}"))
    return 1 if result is None else result


def requeue(block_run_ids: list[int], now: datetime) -> int:
    """Send queued block runs to the workers again (their task went missing). A task
    that was not lost after all is harmless: the second claim of a block run fails."""
    if not block_run_ids:
        return 0
    BlockRun.objects.filter(id__in=block_run_ids, status=S.QUEUED).update(queued_at=now)
    dispatch(block_run_ids)
    return len(block_run_ids)


def dead_clusters(now: datetime) -> list[tuple[Heartbeat, str]]:
    """The worker clusters that are gone, each with how we know: their heartbeat is older
    than MILLRACE_CLUSTER_HEARTBEAT_LIMIT, or (on this host, without waiting for that)
    their main process no longer runs. A cluster on this host whose process runs is not
    gone, however long it has been silent (its database writes may wait on a lock): its
    blocks are alive too."""
    limit = now - timedelta(seconds=settings.MILLRACE_CLUSTER_HEARTBEAT_LIMIT)
    host = socket.gethostname()
    gone = []
    for cluster in Heartbeat.objects.filter(kind=HeartbeatKind.CLUSTER):
        if cluster.host == host:
            if not _runs(cluster.pid, cluster.started_at):
                gone.append((cluster, "its process has ended"))
        elif cluster.beat_at < limit:
            gone.append((cluster, f"no heartbeat since {cluster.beat_at:%Y-%m-%d %H:%M:%S} UTC"))
    return gone


def _runs(pid: int, started_at: datetime) -> bool:
    """Whether the process `pid` that started at `started_at` still runs (not another
    process that was given the same pid since)."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= started_at.timestamp() + 1
    except psutil.Error:
        return False


def cluster_recover(name: str, *, reason: str, before: datetime, now: datetime, interrupted: bool = False) -> tuple[int, int]:
    """Take back the work of worker cluster `name`, which is gone: its running block runs
    are failed (or retried, as for any dead worker), or with `interrupted` (its own
    forced stop) handed back without counting against their retries; block runs queued
    before `before` are sent again, since it may have taken their tasks from the broker
    and lost them (a task that was not lost is harmless: its second claim fails). Then
    its heartbeat row goes. Returns (block runs failed or handed back, requeued)."""
    running = BlockRun.objects.filter(status=S.RUNNING, worker__endswith=f"@{name}").values_list("id", flat=True)
    status = INTERRUPTED if interrupted else S.FAILED
    failed = sum(_fail_block_run(pk, reason, status) for pk in list(running))
    queued = list(BlockRun.objects.filter(status=S.QUEUED, queued_at__lt=before).values_list("id", flat=True))
    requeued = requeue(queued, now)
    Heartbeat.objects.filter(kind=HeartbeatKind.CLUSTER, name=name).delete()
    return failed, requeued


def _advance_and_dispatch(run_id: int) -> None:
    dispatch(advance(run_id))

"""Reads of run state shared by commands, pages and the API: the API's run list, why a
run waits, a finished run's summary, and the health report."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import Min, QuerySet
from django.utils import timezone

from runs.models import (
    BlockRun,
    BlockRunStatus,
    Heartbeat,
    HeartbeatKind,
    PipelineRun,
    PipelineRunStatus,
)


def pipeline_runs_list() -> QuerySet[PipelineRun]:
    """Newest first, the pipeline joined so that a page costs one query whatever its
    size (plus the count)."""
    return PipelineRun.objects.select_related("pipeline").order_by("-created_at", "-id")


# --- why a run waits, and what it did ---------------------------------------------------------

def run_wait_reason(run: PipelineRun) -> str:
    """Why a run that has not finished has nothing to execute right now, in a sentence
    (empty when it is not waiting)."""
    if run.waiting_for_run_slot:
        limit = run.pipeline.pipeline_run_limit
        others = list(PipelineRun.objects.filter(pipeline_id=run.pipeline_id, status=PipelineRunStatus.RUNNING).values_list("id", flat=True)[:10])
        return f"waiting for a run slot: its pipeline's pipeline_run_limit ({limit}) is taken by run(s) {_ids(others)}"
    if run.waiting_for_slot:
        holders = BlockRun.objects.filter(status__in=[BlockRunStatus.QUEUED, BlockRunStatus.RUNNING]).exclude(pipeline_run=run)
        runs = sorted(set(holders.values_list("pipeline_run_id", flat=True)[:1000]))
        queued = holders.filter(status=BlockRunStatus.QUEUED).count()
        return (
            f"waiting for a slot: the {settings.MILLRACE_CONCURRENCY} block runs allowed at once (MILLRACE_CONCURRENCY) "
            f"are taken by run(s) {_ids(runs)}, {queued} of them queued for a worker; "
            "if no worker runs (manage.py qcluster), they wait until one does or until they are cancelled"
        )
    retry = run.block_runs.filter(status=BlockRunStatus.INITIAL, next_retry_at__isnull=False).order_by("next_retry_at").first()
    if retry is not None:
        return f"waiting to retry block {retry.block_uuid} at {retry.next_retry_at:%H:%M:%S} UTC"
    return ""


def _ids(ids: list[int]) -> str:
    return ", ".join(str(i) for i in ids[:10]) + (" ..." if len(ids) > 10 else "")


def run_no_worker_reason(run: PipelineRun) -> str:
    """When a run's blocks are queued and no worker cluster is alive to take them, that
    in a sentence; else empty."""
    if not run.block_runs.filter(status=BlockRunStatus.QUEUED).exists():
        return ""
    if Heartbeat.objects.filter(kind=HeartbeatKind.CLUSTER).exists():
        return ""
    return "its blocks are queued, and no worker cluster is running: start one (manage.py qcluster), or run with --sync"


def run_summary(run: PipelineRun) -> list[dict[str, Any]]:
    """Each block run of a run, in creation order: uuid, status, duration, error and
    traceback."""
    rows = []
    for br in run.block_runs.order_by("id"):
        rows.append(
            {
                "block_uuid": br.block_uuid,
                "status": br.status,
                "duration": br.duration,
                "error": br.error,
                "traceback": br.traceback,
            }
        )
    return rows


# --- health ------------------------------------------------------------------------------------

# A scheduler that has not ticked for this many of its intervals (and at least
# SCHEDULER_SILENT_MIN seconds) is reported down.
SCHEDULER_SILENT_TICKS = 3
SCHEDULER_SILENT_MIN = 30.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class HealthReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)


def health_report(now: datetime | None = None) -> HealthReport:
    """Whether Millrace can do its work: the database answers, a worker cluster and a
    scheduler are alive (by their heartbeats), and how many block runs wait. Raises
    nothing: a database that does not answer is a failed check."""
    report = HealthReport()
    started = time.monotonic()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:  # any failure to reach the database is the answer
        report.checks.append(Check("database", False, f"{connection.vendor}: {type(exc).__name__}: {exc}"))
        return report
    report.checks.append(Check("database", True, f"{connection.vendor}, answered in {(time.monotonic() - started) * 1000:.0f} ms"))
    now = now or timezone.now()
    report.checks += _cluster_checks(now) + _scheduler_checks(now) + [_backlog_check(now)]
    return report


def _age(then: datetime, now: datetime) -> float:
    return max(0.0, (now - then).total_seconds())


def _cluster_checks(now: datetime) -> list[Check]:
    limit = settings.MILLRACE_CLUSTER_HEARTBEAT_LIMIT
    checks = []
    for beat in Heartbeat.objects.filter(kind=HeartbeatKind.CLUSTER).order_by("host", "pid"):
        age = _age(beat.beat_at, now)
        what = f"{beat.name} on {beat.host} (pid {beat.pid}): {beat.info.get('workers', '?')} workers, last heartbeat {age:.1f} s ago"
        if beat.stopping_since:
            what += f", stopping since {beat.stopping_since:%H:%M:%S} UTC"
        checks.append(Check("worker cluster", age <= limit, what))
    if not checks:
        checks.append(Check("worker cluster", False, "none is running (start one: manage.py qcluster)"))
    return checks


def _scheduler_checks(now: datetime) -> list[Check]:
    checks = []
    for beat in Heartbeat.objects.filter(kind=HeartbeatKind.SCHEDULER).order_by("host", "pid"):
        age = _age(beat.beat_at, now)
        interval = float(beat.info.get("interval") or 5.0)
        silent = max(SCHEDULER_SILENT_TICKS * interval, SCHEDULER_SILENT_MIN)
        checks.append(Check("scheduler", age <= silent, f"{beat.name}: last tick {age:.1f} s ago (every {interval:g} s)"))
    if not checks:
        checks.append(Check("scheduler", False, "none is running (start one: manage.py run_scheduler)"))
    return checks


def _backlog_check(now: datetime) -> Check:
    queued = BlockRun.objects.filter(status=BlockRunStatus.QUEUED)
    row = queued.aggregate(oldest=Min("queued_at"))
    count = queued.count()
    running = BlockRun.objects.filter(status=BlockRunStatus.RUNNING).count()
    detail = f"{count} block run{'s' if count != 1 else ''} queued, {running} running"
    if count and row["oldest"]:
        detail += f"; the oldest queued {_age(row['oldest'], now):.1f} s ago"
    stuck = row["oldest"] is not None and row["oldest"] < now - timedelta(seconds=settings.MILLRACE_HEARTBEAT_LIMIT)
    if stuck:
        detail += " (longer than MILLRACE_HEARTBEAT_LIMIT: are the workers busy, or gone?)"
    return Check("backlog", True, detail)


# --- the runs page of a pipeline ------------------------------------------------------------

def pipeline_runs_filter(pipeline_id: int, *, status: str = "") -> QuerySet[PipelineRun]:
    """The runs of a pipeline, newest first (the (pipeline, -created_at) index; with a
    status, the (pipeline, status) one), the trigger joined so that a page of rows is
    one query whatever its size."""
    runs = PipelineRun.objects.filter(pipeline_id=pipeline_id).select_related("trigger").order_by("-created_at", "-id")
    return runs.filter(status=status) if status else runs


def pipeline_runs_statuses(pipeline_id: int, run_ids: list[int]) -> dict[int, str]:
    """{run id: status} of those of `run_ids` that are runs of the pipeline, oldest
    first (the order batch operations take them in); ids of other pipelines are left out."""
    rows = PipelineRun.objects.filter(pipeline_id=pipeline_id, pk__in=run_ids).order_by("created_at", "id")
    return dict(rows.values_list("id", "status"))


def pipeline_runs_unfinished_count(pipeline_id: int) -> int:
    """How many runs of the pipeline have not finished (running, or waiting to)."""
    return PipelineRun.objects.filter(
        pipeline_id=pipeline_id, status__in=[PipelineRunStatus.INITIAL, PipelineRunStatus.RUNNING],
    ).count()

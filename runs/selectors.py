"""Reads of run state shared by commands, pages and the API: the API's run list, why a
run waits, a finished run's summary, and the health report."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import Min, Q, QuerySet
from django.utils import timezone

from runs.models import (
    BlockRun,
    BlockRunStatus,
    Heartbeat,
    HeartbeatKind,
    LogEntry,
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


def pipeline_runs_count(pipeline_id: int, statuses: tuple[str, ...]) -> int:
    """How many runs of the pipeline have one of `statuses` (the (pipeline, status) index)."""
    return PipelineRun.objects.filter(pipeline_id=pipeline_id, status__in=statuses).count()


# --- a pipeline's logs (the Logs page) -----------------------------------------------------------

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOGS_PAGE_SIZE = 100
_CURSOR_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"
_MAX_ID = 2**63 - 1  # a bigger number makes the database raise, not answer "no rows"


@dataclass(frozen=True)
class LogCursor:
    """Where a page of logs ends: the (timestamp, id) of its last line. Text form:
    `2026-12-03T21:42:05.123456Z_1234` (UTC, always with microseconds, so that the
    timestamp compares equal to the stored one on both databases)."""

    timestamp: datetime
    id: int

    def encode(self) -> str:
        return f"{self.timestamp.astimezone(UTC).strftime(_CURSOR_TIME)}_{self.id}"

    @classmethod
    def decode(cls, text: str) -> LogCursor:
        """The cursor `encode` wrote; ValueError for anything else."""
        stamp, _, id_text = text.rpartition("_")
        if not (id_text.isascii() and id_text.isdigit()) or not 0 < int(id_text) <= _MAX_ID:
            raise ValueError(f"not a log cursor: {text[:80]!r}")
        return cls(datetime.strptime(stamp, _CURSOR_TIME).replace(tzinfo=UTC), int(id_text))


@dataclass(frozen=True)
class LogFilters:
    """What the Logs page narrows by; empty values filter nothing. `min_level` keeps that
    level and the ones above it (levels outside LOG_LEVELS then never match)."""

    min_level: str = ""
    block_type: str = ""
    block_uuid: str = ""
    pipeline_run_id: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    q: str = ""


def pipeline_logs_page(
    pipeline_id: int, filters: LogFilters, *, before: LogCursor | None = None, size: int = LOGS_PAGE_SIZE,
) -> tuple[list[LogEntry], LogCursor | None]:
    """One page of the log lines of a pipeline's runs, newest first, and the cursor of
    the next (older) page, None on the last. One query whatever the page.

    Keyset pagination on (timestamp, id), both descending: lines with equal timestamps
    (a chunk of output shares one) still have a single order, a page costs the same
    however deep it is, and lines written meanwhile never shift the next page."""
    rows = _pipeline_logs(pipeline_id, filters)
    if before is not None:
        rows = rows.filter(Q(timestamp__lt=before.timestamp) | Q(timestamp=before.timestamp, id__lt=before.id))
    page = list(rows.order_by("-timestamp", "-id")[: size + 1])
    if len(page) <= size:
        return page, None
    last = page[size - 1]
    return page[:size], LogCursor(last.timestamp, last.pk)


def _pipeline_logs(pipeline_id: int, filters: LogFilters) -> QuerySet[LogEntry]:
    rows = LogEntry.objects.filter(pipeline_run__pipeline_id=pipeline_id)
    if filters.min_level:
        rows = rows.filter(level__in=LOG_LEVELS[LOG_LEVELS.index(filters.min_level):])
    if filters.block_type:
        rows = rows.filter(block_type=filters.block_type)
    if filters.block_uuid:
        rows = rows.filter(block_uuid=filters.block_uuid)
    if filters.pipeline_run_id is not None:
        rows = rows.filter(pipeline_run_id=filters.pipeline_run_id)
    if filters.since is not None:
        rows = rows.filter(timestamp__gte=filters.since)
    if filters.until is not None:
        rows = rows.filter(timestamp__lte=filters.until)
    if filters.q:
        rows = rows.filter(message__icontains=filters.q)
    return rows

"""Reads of run state shared by commands, pages and the API."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection
from django.db.models import Min
from django.utils import timezone

from runs.models import BlockRun, BlockRunStatus, Heartbeat, HeartbeatKind

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

"""Backfills: one run per logical date of a range, cancelling them, and marking a
backfill finished once its runs are."""

from __future__ import annotations

import functools
from datetime import datetime
from itertools import islice
from typing import Any

from django.db import transaction
from django.db.models import Count, Q
from django.utils import timezone as djtz

from pipelines.models import Pipeline
from pipelines.selectors import pipeline_definition
from runs import orchestrator
from runs.models import RUN_TERMINAL, PipelineRun, PipelineRunStatus, RunType
from triggers import schedule
from triggers.models import Backfill, BackfillStatus
from triggers.services.validation import (
    clean_datetime,
    clean_interval,
    clean_text,
    clean_timezone,
    field_error,
    validate_json_object,
)

MAX_BACKFILL_RUNS = 10_000


def backfill_dates(*, start: datetime, end: datetime, interval: str, timezone: str = "UTC") -> list[datetime]:
    """The logical dates of a backfill, validated: every fire time of `interval` from
    `start` to `end` inclusive (naive datetimes are read in `timezone`)."""
    tz = clean_timezone("timezone", timezone)
    interval = clean_interval("interval", interval)
    if not schedule.is_periodic(interval):
        raise field_error("interval", f"a backfill needs a periodic interval (a preset such as @daily or a cron expression), not {interval}")
    start = clean_datetime("start", start, tz)
    end = clean_datetime("end", end, tz)
    if end < start:
        raise field_error("end", f"end ({end.isoformat()}) is before start ({start.isoformat()})")
    dates = list(islice(schedule.fire_times(interval, start=start, end=end, tz=tz), MAX_BACKFILL_RUNS + 1))
    if len(dates) > MAX_BACKFILL_RUNS:
        raise field_error("end", f"{interval} from start to end gives more than {MAX_BACKFILL_RUNS:,} runs; shorten the range or use a longer interval")
    if not dates:
        raise field_error("interval", f"{interval} does not fire between start and end")
    return dates


def backfill_create(
    *,
    pipeline: Any,
    start: datetime,
    end: datetime,
    interval: str,
    timezone: str = "UTC",
    variables: dict | None = None,
    name: str = "",
    created_by: Any = None,
) -> Backfill:
    """One run (run_type `backfill`) per logical date, in date order, in one transaction:
    either every run exists or none. Runs beyond the pipeline's `pipeline_run_limit`
    wait in `initial` and start in order."""
    if not isinstance(pipeline, Pipeline):
        raise field_error("pipeline", "pipeline is required")
    variables = validate_json_object("variables", variables)
    name = clean_text("name", name, required=False)
    tz = clean_timezone("timezone", timezone)
    dates = backfill_dates(start=start, end=end, interval=interval, timezone=tz)
    user = created_by if getattr(created_by, "pk", None) else None
    try:
        pipeline_definition(pipeline.pk, pipeline.version)
    except Exception as exc:  # a stored cycle or a block that cannot be read: no run could start
        raise field_error("pipeline", f"pipeline {pipeline.uuid} cannot be loaded: {exc}") from None
    with transaction.atomic():
        backfill = Backfill.objects.create(
            pipeline=pipeline, name=name, start_datetime=clean_datetime("start", start, tz),
            end_datetime=clean_datetime("end", end, tz), interval=schedule.validate_interval(interval),
            timezone=tz, variables=variables, status=BackfillStatus.RUNNING, total_runs=len(dates), created_by=user,
        )
        run_ids = [
            orchestrator.run_create(
                pipeline, variables=variables, run_type=RunType.BACKFILL, execution_date=logical_date,
                backfill=backfill, created_by=user, start=False,
            ).pk
            for logical_date in dates
        ]
    # Started together once they all exist: one count of the global slots for the whole
    # backfill, and no slot lock held while hundreds of runs are written.
    orchestrator.dispatch(orchestrator.runs_start(run_ids))
    return backfill


def backfill_cancel(backfill: Backfill) -> int:
    """Cancel every unfinished run of the backfill; returns how many were cancelled.

    The backfill is marked cancelled first so the scheduler does not mark it failed
    meanwhile; runs are stopped newest first, so that stopping one never starts a
    waiting run of the same backfill only to stop it next."""
    now = djtz.now()
    Backfill.objects.filter(
        pk=backfill.pk, status__in=[BackfillStatus.INITIAL, BackfillStatus.RUNNING],
    ).update(status=BackfillStatus.CANCELLED, completed_at=now)
    open_runs = PipelineRun.objects.filter(backfill=backfill).exclude(status__in=list(RUN_TERMINAL))
    cancelled = 0
    for run_id in open_runs.order_by("-execution_date", "-id").values_list("id", flat=True):
        if orchestrator.run_stop(run_id, status=PipelineRunStatus.CANCELLED, reason=f"backfill {backfill.pk} cancelled"):
            cancelled += 1
    backfill.refresh_from_db()
    return cancelled


def backfills_update_status(now: datetime | None = None) -> int:
    """Mark each running backfill whose runs have all finished `completed` (every run
    completed) or `failed`. Returns how many changed. Called by the scheduler's tick."""
    now = now or djtz.now()
    open_statuses = [PipelineRunStatus.INITIAL, PipelineRunStatus.RUNNING]
    rows = (
        Backfill.objects.filter(status__in=[BackfillStatus.INITIAL, BackfillStatus.RUNNING])
        .annotate(
            unfinished=Count("runs", filter=Q(runs__status__in=open_statuses)),
            completed=Count("runs", filter=Q(runs__status=PipelineRunStatus.COMPLETED)),
        )
        .values_list("id", "unfinished", "completed", "total_runs")
    )
    changed = 0
    for pk, unfinished, completed, total in rows:
        if unfinished:
            continue
        final = BackfillStatus.COMPLETED if completed >= total else BackfillStatus.FAILED
        # Each backfill in a savepoint of its own: one that cannot be written must not
        # keep the others from finishing.
        changed += orchestrator.isolated(
            f"backfills: finishing backfill {pk}", functools.partial(_backfill_finish, pk, final, now),
        ) or 0
    return changed


def _backfill_finish(pk: int, status: BackfillStatus, now: datetime) -> int:
    return Backfill.objects.filter(
        pk=pk, status__in=[BackfillStatus.INITIAL, BackfillStatus.RUNNING],
    ).update(status=status, completed_at=now)

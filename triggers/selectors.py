"""Reads of triggers, events and backfills shared by pages, API, admin and commands."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from django.db.models import Count, IntegerField, OuterRef, Prefetch, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.utils import timezone

from pipelines.models import Block, Pipeline
from runs.models import RUN_TERMINAL, PipelineRun
from triggers import schedule
from triggers.models import Backfill, Event, ScheduleType, Trigger, TriggerStatus

MAX_UPCOMING = 100


def upcoming_runs(*, count: int = 10, now: datetime | None = None, pipeline: Pipeline | None = None) -> list[dict[str, Any]]:
    """The next `count` fire times of every active time trigger (of `pipeline`, if
    given), soonest trigger first: `{"trigger_id", "trigger_name", "pipeline_uuid",
    "schedule_interval", "timezone", "fire_times": [UTC datetimes], "error"}`.

    The first time is the trigger's `next_run_at` (what the scheduler will do, even when
    it is already due); the rest follow from the schedule. `@once` has at most one time
    and `@always_on` none (it runs continuously); a flagged trigger has none and its
    error."""
    count = max(0, min(int(count), MAX_UPCOMING))
    now = now or timezone.now()
    triggers = Trigger.objects.filter(status=TriggerStatus.ACTIVE, schedule_type=ScheduleType.TIME).select_related("pipeline")
    if pipeline is not None:
        triggers = triggers.filter(pipeline=pipeline)
    rows = [_upcoming_row(trigger, count, now) for trigger in triggers.order_by("next_run_at", "id")]
    far = datetime.max.replace(tzinfo=now.tzinfo)
    return sorted(rows, key=lambda row: (row["fire_times"][0] if row["fire_times"] else far, row["trigger_id"]))


def _upcoming_row(trigger: Trigger, count: int, now: datetime) -> dict[str, Any]:
    row = {
        "trigger_id": trigger.pk, "trigger_name": trigger.name, "pipeline_uuid": trigger.pipeline.uuid,
        "schedule_interval": trigger.schedule_interval, "timezone": trigger.timezone,
        "fire_times": [], "error": trigger.error,
    }
    first = trigger.next_run_at
    if first is None or count == 0 or trigger.schedule_interval == schedule.ALWAYS_ON:
        return row
    if trigger.schedule_interval == schedule.ONCE:
        row["fire_times"] = [first]
        return row
    try:
        rest = schedule.upcoming(
            trigger.schedule_interval, after=max(first, now), count=count - 1, tz=trigger.timezone,
            start_time=trigger.start_time,
        )
    except schedule.ScheduleError as exc:  # stored by an older version; the tick flags it
        row["error"] = row["error"] or str(exc)
        return row
    row["fire_times"] = [first, *[t for t in rest if t != first]][:count]
    return row


def _last_run(field: str) -> Subquery:
    runs = PipelineRun.objects.filter(trigger=OuterRef("pk")).order_by("-created_at", "-id")
    return Subquery(runs.values(field)[:1])


def triggers_for_pipeline(pipeline: Pipeline) -> QuerySet[Trigger]:
    """A pipeline's triggers with the status and creation time of their latest run and
    their number of runs (correlated subqueries on the runs' trigger index, evaluated
    per listed trigger: a pipeline has few triggers and may have many runs)."""
    run_count = (
        PipelineRun.objects.filter(trigger=OuterRef("pk")).order_by().values("trigger")
        .annotate(n=Count("id")).values("n")
    )
    return (
        Trigger.objects.filter(pipeline=pipeline)
        .select_related("pipeline")
        .annotate(
            last_run_status=_last_run("status"),
            last_run_at_created=_last_run("created_at"),
            run_count=Coalesce(Subquery(run_count, output_field=IntegerField()), 0),
        )
        .order_by("name", "id")
    )


def event_list(
    *, source: str | None = None, name: str | None = None, since: datetime | None = None, limit: int | None = 100,
) -> QuerySet[Event]:
    """Recorded events, newest first, each with the runs it caused
    (`event.runs.all()`, prefetched with their pipelines: a fixed number of queries)."""
    events = Event.objects.all()
    if source:
        events = events.filter(source=source)
    if name:
        events = events.filter(name=name)
    if since is not None:
        events = events.filter(created_at__gte=since)
    runs = PipelineRun.objects.select_related("pipeline").order_by("id").only(
        "id", "status", "run_type", "created_at", "trigger_id", "pipeline__uuid", "pipeline__name",
    )
    events = events.order_by("-created_at", "-id").prefetch_related(Prefetch("runs", queryset=runs))
    return events[:limit] if limit else events


def backfills_for_pipeline(pipeline: Pipeline) -> QuerySet[Backfill]:
    """A pipeline's backfills, newest first, with how many of their runs have finished."""
    return (
        Backfill.objects.filter(pipeline=pipeline)
        .annotate(finished_runs=Count("runs", filter=Q(runs__status__in=list(RUN_TERMINAL))))
        .order_by("-created_at", "-id")
    )


# --- the pipelines page ----------------------------------------------------------------------


def _count_of(model: Any, **filters: Any) -> Coalesce:
    """A correlated count of `model` rows of the outer pipeline (one subquery each: joins
    with two counts would multiply the rows)."""
    rows = model.objects.filter(pipeline=OuterRef("pk"), **filters).order_by().values("pipeline")
    return Coalesce(Subquery(rows.annotate(n=Count("*")).values("n"), output_field=IntegerField()), 0)


def pipelines_overview(*, search: str = "", tag: str = "") -> QuerySet[Pipeline]:
    """Pipelines (by name) with what their page lists: `block_count`, `active_triggers`,
    and the status, id and time of the last run (`last_run_status`, `last_run_id`,
    `last_run_at`), each a subquery, so a page of pipelines is one query. `search`
    matches the name or uuid; `tag` one of the tags."""
    last = PipelineRun.objects.filter(pipeline=OuterRef("pk")).order_by("-created_at", "-id")
    qs = Pipeline.objects.annotate(
        block_count=_count_of(Block),
        active_triggers=_count_of(Trigger, status=TriggerStatus.ACTIVE),
        last_run_status=Subquery(last.values("status")[:1]),
        last_run_id=Subquery(last.values("id")[:1]),
        last_run_at=Subquery(last.values("created_at")[:1]),
    ).order_by("name", "uuid")
    if search:
        qs = qs.filter(Q(name__icontains=search) | Q(uuid__icontains=search))
    if tag:
        # The tags are a JSON list: its text holds the tag quoted (both databases).
        qs = qs.filter(tags__icontains=json.dumps(tag))
    return qs


def pipeline_tags() -> list[str]:
    """Every tag of every pipeline, sorted, for the tag filter."""
    return sorted({str(t) for tags in Pipeline.objects.values_list("tags", flat=True) if isinstance(tags, list) for t in tags})


def pipeline_run_counts(pipeline: Pipeline) -> tuple[int, int]:
    """(all runs, runs not finished) of a pipeline: what deleting it would take along."""
    runs = PipelineRun.objects.filter(pipeline=pipeline)
    return runs.count(), runs.exclude(status__in=list(RUN_TERMINAL)).count()

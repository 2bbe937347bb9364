"""The scheduler's tick, with injected time: presets and crons over simulated days, time
zones and DST, @once and @always_on, skip_if_previous_running, pipeline_run_limit,
outages with and without catch-up, broken stored triggers, deadlines and reconcile."""

from __future__ import annotations

from datetime import timedelta
from zoneinfo import ZoneInfo

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from pipelines.models import Block, BlockEdge, Pipeline
from runs import orchestrator
from runs.models import BlockRun, LogEntry, PipelineRun, PipelineRunStatus, RunType
from runs.services import run_execute_sync
from tests.triggers._support import pipeline, scheduled_dates, tick_through, utc
from triggers import scheduler, services
from triggers.models import Trigger

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]

NEW_YORK = ZoneInfo("America/New_York")
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)


def time_trigger(interval: str, *, now, name: str = "t", target: Pipeline | None = None, **fields) -> Trigger:
    return services.trigger_create(
        pipeline=target or pipeline(f"p-{name}", blocks=0), name=name, schedule_interval=interval,
        status="active", now=now, **fields,
    )


# --- presets and crons over simulated time --------------------------------------------------

@pytest.mark.parametrize(
    ("interval", "created", "end", "step", "expected"),
    [
        ("@hourly", utc(2024, 3, 1, 0, 5), utc(2024, 3, 1, 6, 5), timedelta(minutes=10),
         [utc(2024, 3, 1, h) for h in range(1, 7)]),
        ("@daily", utc(2024, 3, 1, 10), utc(2024, 3, 4, 10), 2 * HOUR,
         [utc(2024, 3, d) for d in (2, 3, 4)]),
        # Mondays (Mage's @weekly), from a Friday.
        ("@weekly", utc(2024, 3, 1, 10), utc(2024, 3, 20), 6 * HOUR,
         [utc(2024, 3, d) for d in (4, 11, 18)]),
        ("@monthly", utc(2024, 1, 15, 12), utc(2024, 4, 15, 12), 24 * HOUR,
         [utc(2024, m, 1) for m in (2, 3, 4)]),
        # Weekdays at 9:00, 9:30, 10:00, 10:30: Friday and Monday, nothing at the weekend.
        ("*/30 9-10 * * 1-5", utc(2024, 3, 1, 8), utc(2024, 3, 4, 11), timedelta(minutes=15),
         [utc(2024, 3, d, h, m) for d in (1, 4) for h in (9, 10) for m in (0, 30)]),
    ],
)
def test_presets_and_crons_fire_at_their_times(interval, created, end, step, expected):
    trigger = time_trigger(interval, now=created)
    counts = tick_through(created, end, step)
    assert scheduled_dates(trigger) == expected
    assert counts["created"] == len(expected) and counts["duplicates"] == 0
    trigger.refresh_from_db()
    assert trigger.next_run_at > end and trigger.last_run_at == expected[-1]


def test_a_scheduled_run_carries_the_trigger_its_logical_date_and_variables():
    target = pipeline("vars", blocks=1, variables={"env": "dev", "limit": 1})
    trigger = time_trigger("@hourly", now=utc(2024, 3, 1, 0, 30), target=target, variables={"limit": 5},
                           settings={"timeout": 600, "timeout_status": "cancelled", "sla": 300})
    assert scheduler.tick(utc(2024, 3, 1, 1, 0, 20))["created"] == 1
    run = PipelineRun.objects.get(trigger=trigger)
    assert run.run_type == RunType.SCHEDULED and run.execution_date == utc(2024, 3, 1, 1)
    assert run.variables == {"env": "dev", "limit": 5}
    assert (run.timeout, run.timeout_status, run.sla) == (600, "cancelled", 300)
    # Started by the tick: its first block is queued for the workers.
    assert run.status == PipelineRunStatus.RUNNING
    assert list(run.block_runs.values_list("status", flat=True)) == ["queued"]


def test_a_trigger_in_sao_paulo_fires_at_local_midnight_across_its_old_dst_change():
    # Brazil's 2018 DST began at midnight: 2018-11-04 00:00 did not exist in São Paulo,
    # so that day's run comes at the first instant after the gap, 01:00 -02.
    trigger = time_trigger("@daily", now=utc(2018, 11, 2, 12), timezone="America/Sao_Paulo")
    tick_through(utc(2018, 11, 2, 12), utc(2018, 11, 6, 12), timedelta(minutes=30))
    assert scheduled_dates(trigger) == [utc(2018, 11, 3, 3), utc(2018, 11, 4, 3), utc(2018, 11, 5, 2), utc(2018, 11, 6, 2)]


def test_a_cron_in_sao_paulo_today_is_three_hours_behind_utc():
    trigger = time_trigger("0 9 * * *", now=utc(2024, 6, 1), timezone="America/Sao_Paulo")
    tick_through(utc(2024, 6, 1), utc(2024, 6, 3), timedelta(minutes=30))
    assert scheduled_dates(trigger) == [utc(2024, 6, 1, 12), utc(2024, 6, 2, 12)]


def local_hours(dates) -> list[tuple[int, int]]:
    return [(d.astimezone(NEW_YORK).hour, d.astimezone(NEW_YORK).minute) for d in dates]


def test_new_york_spring_forward_day_misses_nothing_and_duplicates_nothing():
    created = utc(2024, 3, 10, 4, 30)  # 23:30 EST the evening before
    hourly = time_trigger("@hourly", now=created, name="hourly", timezone="America/New_York")
    half_past_two = time_trigger("30 2 * * *", now=created, name="daily", timezone="America/New_York")
    counts = tick_through(created, utc(2024, 3, 11, 3, 55), timedelta(minutes=5))
    dates = scheduled_dates(hourly)
    # 23 local hours: 02:00 does not exist and collapses onto 03:00 EDT (07:00 UTC).
    assert len(dates) == 23 and len(set(dates)) == 23
    assert local_hours(dates) == [(h, 0) for h in range(24) if h != 2]
    assert all(b - a == HOUR for a, b in zip(dates, dates[1:], strict=False))
    # 02:30 does not exist that day either: it runs once, just after the gap.
    assert scheduled_dates(half_past_two) == [utc(2024, 3, 10, 7)]
    assert counts["duplicates"] == 0 and counts["errors"] == 0


def test_new_york_fall_back_day_runs_the_repeated_hour_once():
    created = utc(2024, 11, 3, 3, 30)  # 23:30 EDT the evening before
    hourly = time_trigger("@hourly", now=created, name="hourly", timezone="America/New_York")
    half_past_one = time_trigger("30 1 * * *", now=created, name="daily", timezone="America/New_York")
    tick_through(created, utc(2024, 11, 4, 4, 55), timedelta(minutes=5))
    dates = scheduled_dates(hourly)
    # 25 real hours, 24 local wall-clock hours, each run once: 01:00 EDT (05:00 UTC) and
    # not again at 01:00 EST (06:00 UTC).
    assert local_hours(dates) == [(h, 0) for h in range(24)]
    assert utc(2024, 11, 3, 5) in dates and utc(2024, 11, 3, 6) not in dates
    assert scheduled_dates(half_past_one) == [utc(2024, 11, 3, 5, 30)]


# --- @once and @always_on --------------------------------------------------------------------

def test_once_fires_once_at_its_start_time_and_then_deactivates():
    start = utc(2024, 5, 1, 12)
    trigger = time_trigger("@once", now=start - HOUR, start_time=start)
    assert trigger.next_run_at == start
    assert scheduler.tick(start - MINUTE)["created"] == 0
    counts = scheduler.tick(start + MINUTE)
    assert counts["created"] == 1 and counts["deactivated"] == 1
    tick_through(start + 2 * MINUTE, start + 3 * HOUR, 10 * MINUTE)
    assert scheduled_dates(trigger) == [start]
    trigger.refresh_from_db()
    assert trigger.status == "inactive" and trigger.next_run_at is None and trigger.last_run_at == start


def test_once_without_a_start_time_runs_at_the_next_tick():
    now = utc(2024, 5, 1, 12)
    trigger = time_trigger("@once", now=now)
    scheduler.tick(now + timedelta(seconds=5))
    assert scheduled_dates(trigger) == [now]


def test_always_on_starts_a_new_run_whenever_none_is_unfinished():
    now = utc(2024, 5, 1, 12)
    trigger = time_trigger("@always_on", now=now, target=pipeline("busy", blocks=1))
    assert scheduler.tick(now)["created"] == 1
    assert scheduler.tick(now + MINUTE)["created"] == 0  # the first is still running
    first = PipelineRun.objects.get(trigger=trigger)
    orchestrator.run_stop(first.pk, status="failed", reason="test")
    assert scheduler.tick(now + 2 * MINUTE)["created"] == 1
    assert PipelineRun.objects.filter(trigger=trigger).count() == 2


# --- skip_if_previous_running and pipeline_run_limit ------------------------------------------

def test_skip_if_previous_running_skips_the_due_time_instead_of_queueing_it():
    trigger = time_trigger("@hourly", now=utc(2024, 3, 1, 0, 30), target=pipeline("slow", blocks=1),
                           settings={"skip_if_previous_running": True})
    assert scheduler.tick(utc(2024, 3, 1, 1, 1))["created"] == 1
    counts = scheduler.tick(utc(2024, 3, 1, 2, 1))
    assert counts["created"] == 0 and counts["skipped"] == 1
    trigger.refresh_from_db()
    assert trigger.next_run_at == utc(2024, 3, 1, 3)  # moved on, not queued
    first = PipelineRun.objects.get(trigger=trigger)
    assert run_execute_sync(first).status == "completed"
    assert scheduler.tick(utc(2024, 3, 1, 3, 1))["created"] == 1
    assert scheduled_dates(trigger) == [utc(2024, 3, 1, 1), utc(2024, 3, 1, 3)]


def test_without_skip_a_second_run_starts_while_the_first_runs():
    trigger = time_trigger("@hourly", now=utc(2024, 3, 1, 0, 30), target=pipeline("overlap", blocks=1))
    tick_through(utc(2024, 3, 1, 1, 1), utc(2024, 3, 1, 2, 1), HOUR)
    assert list(PipelineRun.objects.filter(trigger=trigger).values_list("status", flat=True)) == ["running", "running"]


def test_pipeline_run_limit_keeps_extra_runs_waiting_and_starts_them_in_order():
    target = pipeline("limited", blocks=1, concurrency_config={"pipeline_run_limit": 1})
    trigger = time_trigger("@hourly", now=utc(2024, 3, 1, 0, 30), target=target)
    tick_through(utc(2024, 3, 1, 1, 1), utc(2024, 3, 1, 3, 1), HOUR)
    runs = list(PipelineRun.objects.filter(trigger=trigger).order_by("execution_date"))
    assert [r.status for r in runs] == ["running", "initial", "initial"]
    assert [r.waiting_for_run_slot for r in runs] == [False, True, True]
    # Ending the first starts the second (only); the third still waits.
    orchestrator.run_stop(runs[0].pk, status="cancelled", reason="test")
    for r in runs:
        r.refresh_from_db()
    assert [r.status for r in runs] == ["cancelled", "running", "initial"]
    # Executing the second to completion starts the third, and that one runs too.
    run_execute_sync(runs[1])
    for r in runs:
        r.refresh_from_db()
    assert [r.status for r in runs] == ["cancelled", "completed", "completed"]
    assert runs[1].completed_at <= runs[2].started_at


# --- outages ---------------------------------------------------------------------------------

def test_after_a_day_of_downtime_one_run_for_the_latest_time_not_a_stampede():
    trigger = time_trigger("@hourly", now=utc(2024, 3, 1, 0, 30))
    counts = scheduler.tick(utc(2024, 3, 2, 12, 10))
    assert counts["created"] == 1
    assert scheduled_dates(trigger) == [utc(2024, 3, 2, 12)]
    trigger.refresh_from_db()
    assert trigger.next_run_at == utc(2024, 3, 2, 13)


def test_catch_up_makes_every_missed_run_in_order():
    trigger = time_trigger("@hourly", now=utc(2024, 3, 1, 0, 30), settings={"catch_up": True})
    assert scheduler.tick(utc(2024, 3, 2, 12, 10))["created"] == 36
    assert scheduled_dates(trigger) == [utc(2024, 3, 1, 1) + i * HOUR for i in range(36)]
    runs = PipelineRun.objects.filter(trigger=trigger).order_by("id").values_list("execution_date", flat=True)
    assert list(runs) == sorted(runs)  # created oldest first
    trigger.refresh_from_db()
    assert trigger.next_run_at == utc(2024, 3, 2, 13)


def test_a_long_catch_up_is_spread_over_ticks():
    trigger = time_trigger("* * * * *", now=utc(2024, 3, 1, 0, 0, 30), settings={"catch_up": True})
    now = utc(2024, 3, 1, 3, 0, 30)  # 180 missed minutes
    assert scheduler.tick(now)["created"] == scheduler.CATCH_UP_LIMIT
    assert scheduler.tick(now + timedelta(seconds=5))["created"] == 180 - scheduler.CATCH_UP_LIMIT
    dates = scheduled_dates(trigger)
    assert dates == [utc(2024, 3, 1, 0, 1) + i * MINUTE for i in range(180)]


def test_catch_up_with_skip_runs_the_missed_times_one_after_another():
    trigger = time_trigger("@hourly", now=utc(2024, 3, 1, 0, 30), target=pipeline("serial", blocks=1),
                           settings={"catch_up": True, "skip_if_previous_running": True})
    now = utc(2024, 3, 1, 3, 10)
    assert scheduler.tick(now)["created"] == 1
    assert scheduler.tick(now + MINUTE)["created"] == 0  # waits for the first run
    orchestrator.run_stop(PipelineRun.objects.get(trigger=trigger).pk, status="failed", reason="test")
    assert scheduler.tick(now + 2 * MINUTE)["created"] == 1
    assert scheduled_dates(trigger) == [utc(2024, 3, 1, 1), utc(2024, 3, 1, 2)]


def test_a_run_another_scheduler_already_made_counts_as_a_duplicate_and_the_trigger_moves_on():
    trigger = time_trigger("@hourly", now=utc(2024, 3, 1, 0, 30), name="raced")
    healthy = time_trigger("@hourly", now=utc(2024, 3, 1, 0, 30), name="other")
    # What a second scheduler would have committed first for the 01:00 run.
    services.trigger_create_run(trigger, run_type=RunType.SCHEDULED, execution_date=utc(2024, 3, 1, 1))
    counts = scheduler.tick(utc(2024, 3, 1, 1, 2))
    assert (counts["duplicates"], counts["created"], counts["errors"]) == (1, 1, 0)
    assert scheduled_dates(trigger) == [utc(2024, 3, 1, 1)] and scheduled_dates(healthy) == [utc(2024, 3, 1, 1)]
    trigger.refresh_from_db()
    assert trigger.next_run_at == utc(2024, 3, 1, 2) and trigger.error == ""


# --- edits and broken triggers ----------------------------------------------------------------

def test_editing_a_schedule_creates_no_immediate_run():
    trigger = time_trigger("@hourly", now=utc(2024, 3, 1, 9, 30))
    # 10:00 passed with no tick; the user edits at 10:20: that missed time is not run.
    services.trigger_update(trigger, schedule_interval="*/15 * * * *", now=utc(2024, 3, 1, 10, 20))
    assert trigger.next_run_at == utc(2024, 3, 1, 10, 30)
    assert scheduler.tick(utc(2024, 3, 1, 10, 20))["created"] == 0
    assert scheduler.tick(utc(2024, 3, 1, 10, 31))["created"] == 1
    assert scheduled_dates(trigger) == [utc(2024, 3, 1, 10, 30)]


def test_renaming_a_trigger_keeps_its_next_run():
    trigger = time_trigger("@hourly", now=utc(2024, 3, 1, 9, 30))
    services.trigger_update(trigger, name="renamed", now=utc(2024, 3, 1, 10, 20))
    trigger.refresh_from_db()
    assert trigger.next_run_at == utc(2024, 3, 1, 10)
    assert scheduler.tick(utc(2024, 3, 1, 10, 21))["created"] == 1


def break_pipeline(target: Pipeline) -> None:
    """A cycle written straight to the tables, as a bug or a hand edit could leave it."""
    a, b = Block.objects.filter(pipeline=target).order_by("position")[:2]
    BlockEdge.objects.create(downstream=a, upstream=b, position=0)
    Pipeline.objects.filter(pk=target.pk).update(version=target.version + 100)


@pytest.mark.parametrize(
    ("breakage", "named"),
    [
        (lambda t: Trigger.objects.filter(pk=t.pk).update(schedule_interval="61 * * * *"), "schedule_interval"),
        (lambda t: Trigger.objects.filter(pk=t.pk).update(timezone="Mars/Olympus_Mons"), "timezone"),
        (lambda t: break_pipeline(t.pipeline), "cannot be loaded"),
    ],
    ids=["bad interval", "bad timezone", "pipeline with a cycle"],
)
def test_a_broken_stored_trigger_is_flagged_and_the_others_still_fire(breakage, named):
    created = utc(2024, 3, 1, 0, 30)
    broken = time_trigger("@hourly", now=created, name="broken", target=pipeline("broken", blocks=2))
    healthy = time_trigger("@hourly", now=created, name="healthy")
    breakage(broken)
    counts = scheduler.tick(utc(2024, 3, 1, 1, 1))
    assert counts["errors"] == 1 and counts["created"] == 1
    assert scheduled_dates(healthy) == [utc(2024, 3, 1, 1)]
    assert scheduled_dates(broken) == []
    broken.refresh_from_db()
    assert named in broken.error and broken.next_run_at is None and broken.status == "active"
    # Flagged once, not evaluated again at every tick; the healthy one goes on.
    counts = scheduler.tick(utc(2024, 3, 1, 2, 1))
    assert counts["errors"] == 0 and counts["created"] == 1


def test_a_valid_edit_clears_the_error_and_puts_the_trigger_back_on_schedule():
    trigger = time_trigger("@hourly", now=utc(2024, 3, 1, 0, 30))
    Trigger.objects.filter(pk=trigger.pk).update(schedule_interval="not a cron")
    scheduler.tick(utc(2024, 3, 1, 1, 1))
    trigger.refresh_from_db()
    assert trigger.error and trigger.next_run_at is None
    services.trigger_update(trigger, schedule_interval="@daily", now=utc(2024, 3, 1, 1, 5))
    trigger.refresh_from_db()
    assert trigger.error == "" and trigger.next_run_at == utc(2024, 3, 2)
    scheduler.tick(utc(2024, 3, 2, 0, 1))
    assert scheduled_dates(trigger) == [utc(2024, 3, 2)]


def test_paused_and_non_time_triggers_are_never_fired():
    now = utc(2024, 3, 1, 0, 30)
    paused = time_trigger("@hourly", now=now, name="paused")
    services.trigger_pause(paused)
    services.trigger_create(pipeline=pipeline("api", blocks=0), name="api", schedule_type="api", status="active", now=now)
    assert tick_through(now, now + 3 * HOUR, 20 * MINUTE)["created"] == 0
    assert PipelineRun.objects.count() == 0


def test_a_tick_with_nothing_due_costs_the_same_few_queries_for_any_number_of_triggers():
    now = utc(2024, 3, 1, 0, 30)
    target = pipeline("many", blocks=0)

    def queries() -> int:
        with CaptureQueriesContext(connection) as ctx:
            scheduler.tick(now + MINUTE)
        return len(ctx.captured_queries)

    for i in range(3):
        time_trigger("@hourly", now=now, name=f"a{i}", target=target)
    few = queries()
    for i in range(40):
        time_trigger("0 */2 * * *", now=now, name=f"b{i}", target=target)
    assert queries() == few <= 12


# --- deadlines and reconcile through the tick --------------------------------------------------

@pytest.mark.parametrize("timeout_status", ["failed", "cancelled"])
def test_a_run_past_its_timeout_gets_the_timeout_status(timeout_status):
    now = timezone.now()
    trigger = time_trigger("@once", now=now, target=pipeline("slow", blocks=1),
                           settings={"timeout": 60, "timeout_status": timeout_status})
    scheduler.tick(now)
    run = PipelineRun.objects.get(trigger=trigger)
    assert run.status == "running"
    assert scheduler.tick(run.started_at + timedelta(seconds=30))["timed_out"] == 0
    assert scheduler.tick(run.started_at + timedelta(seconds=61))["timed_out"] == 1
    run.refresh_from_db()
    assert run.status == timeout_status
    assert LogEntry.objects.filter(pipeline_run=run, message__contains="timed out after 60 s").exists()


def test_an_sla_miss_is_recorded_and_the_run_goes_on():
    now = timezone.now()
    trigger = time_trigger("@once", now=now, target=pipeline("late", blocks=1), settings={"sla": 30})
    scheduler.tick(now)
    run = PipelineRun.objects.get(trigger=trigger)
    assert scheduler.tick(run.created_at + timedelta(seconds=31))["passed_sla"] == 1
    run.refresh_from_db()
    assert run.passed_sla and run.status == "running"
    assert LogEntry.objects.filter(pipeline_run=run, message__startswith="SLA missed").exists()


def test_the_tick_fails_a_block_run_whose_worker_died(settings):
    now = timezone.now()
    trigger = time_trigger("@once", now=now, target=pipeline("dead", blocks=2))
    scheduler.tick(now)
    run = PipelineRun.objects.get(trigger=trigger)
    old = now - timedelta(seconds=settings.MILLRACE_HEARTBEAT_LIMIT + 5)
    BlockRun.objects.filter(pipeline_run=run, block_uuid="b0").update(status="running", claim="gone", heartbeat_at=old, started_at=old)
    counts = scheduler.tick(now)
    assert counts["block_runs_failed"] == 1
    run.refresh_from_db()
    assert run.status == "failed"
    assert dict(run.block_runs.values_list("block_uuid", "status")) == {"b0": "failed", "b1": "upstream_failed"}

"""Reads: upcoming fire times and a pipeline's triggers with their latest run."""

from __future__ import annotations

import pytest

from tests.triggers._support import pipeline, utc
from triggers import scheduler, selectors, services
from triggers.models import Trigger

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]

NOW = utc(2024, 3, 1, 10, 20)


def test_upcoming_runs_lists_the_next_fire_times_of_each_active_time_trigger():
    etl = pipeline("etl", blocks=0)
    other = pipeline("other", blocks=0)
    hourly = services.trigger_create(pipeline=etl, name="hourly", schedule_interval="@hourly", status="active", now=NOW)
    paris = services.trigger_create(
        pipeline=other, name="paris", schedule_interval="0 9 * * 1-5", timezone="Europe/Paris", status="active", now=NOW,
    )
    once = services.trigger_create(pipeline=etl, name="once", schedule_interval="@once", start_time=utc(2024, 3, 1, 10, 45), status="active", now=NOW)
    services.trigger_create(pipeline=etl, name="paused", schedule_interval="@hourly", now=NOW)
    services.trigger_create(pipeline=etl, name="api", schedule_type="api", status="active", now=NOW)

    rows = selectors.upcoming_runs(count=3, now=NOW)
    assert [r["trigger_name"] for r in rows] == ["once", "hourly", "paris"]  # soonest first
    by_name = {r["trigger_name"]: r for r in rows}
    assert by_name["hourly"]["fire_times"] == [utc(2024, 3, 1, 11), utc(2024, 3, 1, 12), utc(2024, 3, 1, 13)]
    assert by_name["hourly"]["pipeline_uuid"] == "etl" and by_name["hourly"]["trigger_id"] == hourly.pk
    # 09:00 in Paris (UTC+1 in March) on weekdays: Monday 4th, Tuesday 5th, Wednesday 6th.
    assert by_name["paris"]["fire_times"] == [utc(2024, 3, d, 8) for d in (4, 5, 6)]
    assert by_name["paris"]["trigger_id"] == paris.pk
    assert by_name["once"]["fire_times"] == [once.start_time]
    assert [r["trigger_name"] for r in selectors.upcoming_runs(count=1, now=NOW, pipeline=other)] == ["paris"]


def test_a_due_trigger_shows_its_due_time_first_and_a_flagged_one_its_error():
    ok = services.trigger_create(pipeline=pipeline("a", blocks=0), name="due", schedule_interval="@hourly", status="active", now=NOW)
    bad = services.trigger_create(pipeline=pipeline("b", blocks=0), name="bad", schedule_interval="@hourly", status="active", now=NOW)
    Trigger.objects.filter(pk=bad.pk).update(schedule_interval="bogus")
    later = utc(2024, 3, 1, 11, 5)  # 11:00 due, no tick yet
    due_row = next(r for r in selectors.upcoming_runs(count=2, now=later) if r["trigger_id"] == ok.pk)
    assert due_row["fire_times"] == [utc(2024, 3, 1, 11), utc(2024, 3, 1, 12)]
    scheduler.tick(later)
    bad_row = next(r for r in selectors.upcoming_runs(count=2, now=later) if r["trigger_id"] == bad.pk)
    assert bad_row["fire_times"] == [] and "schedule_interval" in bad_row["error"]


def test_triggers_for_pipeline_carry_their_latest_run_and_run_count():
    etl = pipeline("etl", blocks=1)
    used = services.trigger_create(pipeline=etl, name="used", schedule_type="api", status="active", now=NOW)
    services.trigger_create(pipeline=etl, name="unused", schedule_type="api", now=NOW)
    services.trigger_create(pipeline=pipeline("elsewhere", blocks=0), name="other", schedule_type="api", now=NOW)
    services.trigger_run_now(used)
    from runs import orchestrator

    last = services.trigger_run_now(used)
    orchestrator.run_stop(last.pk, status="failed", reason="test")
    rows = {t.name: t for t in selectors.triggers_for_pipeline(etl)}
    assert set(rows) == {"used", "unused"}
    assert rows["used"].run_count == 2 and rows["used"].last_run_status == "failed"
    assert rows["unused"].run_count == 0 and rows["unused"].last_run_status is None

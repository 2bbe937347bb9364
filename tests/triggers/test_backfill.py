"""Backfills: one run per logical date, validation, cancel, status via the tick, and the
`backfill` command."""

from __future__ import annotations

from datetime import datetime
from io import StringIO

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command

from runs.models import PipelineRun, RunType
from runs.services import run_execute_sync
from tests.triggers._support import pipeline, utc
from triggers import scheduler, services
from triggers.models import Backfill

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]


def backfill_dates(backfill: Backfill) -> list[datetime]:
    return list(backfill.runs.order_by("execution_date").values_list("execution_date", flat=True))


def test_one_run_per_logical_date_with_its_execution_date_and_variables():
    target = pipeline("daily", blocks=1, variables={"env": "dev", "limit": 1})
    backfill = services.backfill_create(
        pipeline=target, start=utc(2024, 1, 1), end=utc(2024, 1, 5), interval="@daily", variables={"limit": 7}, name="jan",
    )
    assert backfill.status == "running" and backfill.total_runs == 5
    assert backfill_dates(backfill) == [utc(2024, 1, d) for d in range(1, 6)]
    runs = list(backfill.runs.all())
    assert {r.run_type for r in runs} == {RunType.BACKFILL}
    assert all(r.variables == {"env": "dev", "limit": 7} for r in runs)
    # Created oldest date first, so a pipeline_run_limit starts them in date order.
    by_creation = list(backfill.runs.order_by("id").values_list("execution_date", flat=True))
    assert by_creation == sorted(by_creation)


def test_the_end_is_inclusive_and_crons_work():
    backfill = services.backfill_create(
        pipeline=pipeline("six", blocks=0), start=utc(2024, 1, 1, 1), end=utc(2024, 1, 2, 6), interval="0 */6 * * *",
    )
    assert backfill_dates(backfill) == [utc(2024, 1, 1, h) for h in (6, 12, 18)] + [utc(2024, 1, 2, h) for h in (0, 6)]


def test_naive_dates_and_the_interval_are_read_in_the_timezone():
    backfill = services.backfill_create(
        pipeline=pipeline("sp", blocks=0), start=datetime(2024, 1, 1), end=datetime(2024, 1, 3),
        interval="@daily", timezone="America/Sao_Paulo",
    )
    assert backfill_dates(backfill) == [utc(2024, 1, d, 3) for d in (1, 2, 3)]


@pytest.mark.parametrize(
    ("fields", "named", "words"),
    [
        ({"start": utc(2024, 1, 5), "end": utc(2024, 1, 1)}, "end", "before start"),
        ({"interval": "@once"}, "interval", "periodic"),
        ({"interval": "@always_on"}, "interval", "periodic"),
        ({"interval": "61 * * * *"}, "interval", "minute"),
        ({"interval": "* * * * *", "end": utc(2024, 1, 10)}, "end", "10,000"),
        ({"variables": [1]}, "variables", "JSON object"),
        ({"timezone": "Nowhere/City"}, "timezone", "time zone"),
        ({"start": "yesterday"}, "start", "date"),
    ],
)
def test_bad_input_is_refused_naming_the_field_and_creates_nothing(fields, named, words):
    args = {"pipeline": pipeline("bad", blocks=0), "start": utc(2024, 1, 1), "end": utc(2024, 1, 3), "interval": "@daily", **fields}
    with pytest.raises(ValidationError) as info:
        services.backfill_create(**args)
    assert named in info.value.message_dict
    assert words in " ".join(info.value.message_dict[named])
    assert Backfill.objects.count() == 0 and PipelineRun.objects.count() == 0


def test_a_pipeline_that_cannot_load_is_refused():
    from pipelines.models import Block, BlockEdge, Pipeline

    target = pipeline("cyclic", blocks=2)
    first, second = Block.objects.filter(pipeline=target).order_by("position")
    BlockEdge.objects.create(downstream=first, upstream=second, position=0)  # a cycle, written past the services
    Pipeline.objects.filter(pk=target.pk).update(version=target.version + 100)
    target.refresh_from_db()
    with pytest.raises(ValidationError) as info:
        services.backfill_create(pipeline=target, start=utc(2024, 1, 1), end=utc(2024, 1, 2), interval="@daily")
    assert "cannot be loaded" in info.value.message_dict["pipeline"][0]
    assert Backfill.objects.count() == 0


def test_cancel_stops_every_unfinished_run_and_marks_the_backfill():
    backfill = services.backfill_create(pipeline=pipeline("c", blocks=1), start=utc(2024, 1, 1), end=utc(2024, 1, 4), interval="@daily")
    first = backfill.runs.order_by("execution_date").first()
    assert run_execute_sync(first).status == "completed"
    assert services.backfill_cancel(backfill) == 3
    assert backfill.status == "cancelled" and backfill.completed_at is not None
    statuses = list(backfill.runs.order_by("execution_date").values_list("status", flat=True))
    assert statuses == ["completed", "cancelled", "cancelled", "cancelled"]
    assert services.backfill_cancel(backfill) == 0
    # The tick leaves a cancelled backfill cancelled.
    scheduler.tick()
    backfill.refresh_from_db()
    assert backfill.status == "cancelled"


def test_cancel_with_a_run_limit_does_not_start_the_waiting_runs():
    target = pipeline("lim", blocks=1, concurrency_config={"pipeline_run_limit": 1})
    backfill = services.backfill_create(pipeline=target, start=utc(2024, 1, 1), end=utc(2024, 1, 3), interval="@daily")
    assert list(backfill.runs.order_by("execution_date").values_list("status", flat=True)) == ["running", "initial", "initial"]
    assert services.backfill_cancel(backfill) == 3
    assert set(backfill.runs.values_list("status", flat=True)) == {"cancelled"}
    assert not backfill.runs.filter(block_runs__status__in=["queued", "running"]).exists()


def test_the_tick_marks_a_backfill_completed_when_all_its_runs_completed():
    backfill = services.backfill_create(pipeline=pipeline("ok", blocks=1), start=utc(2024, 1, 1), end=utc(2024, 1, 2), interval="@daily")
    assert scheduler.tick()["backfills_finished"] == 0
    for run in backfill.runs.all():
        run_execute_sync(run)
    assert scheduler.tick()["backfills_finished"] == 1
    backfill.refresh_from_db()
    assert backfill.status == "completed" and backfill.completed_at is not None


def test_the_tick_marks_a_backfill_failed_when_a_run_failed():
    from runs import orchestrator

    backfill = services.backfill_create(pipeline=pipeline("ko", blocks=1), start=utc(2024, 1, 1), end=utc(2024, 1, 2), interval="@daily")
    first, second = backfill.runs.order_by("execution_date")
    orchestrator.run_stop(first.pk, status="failed", reason="test")
    scheduler.tick()
    backfill.refresh_from_db()
    assert backfill.status == "running"  # the second still runs
    run_execute_sync(second)
    scheduler.tick()
    backfill.refresh_from_db()
    assert backfill.status == "failed"


# --- the command ---------------------------------------------------------------------------------

def test_the_command_creates_the_runs_and_says_how_many():
    target = pipeline("cmd", blocks=0)
    out = StringIO()
    call_command(
        "backfill", "cmd", "--start", "2024-01-01", "--end", "2024-01-03T00:00", "--interval", "@daily",
        "--variables", '{"region": "eu"}', "--timezone", "Europe/Paris", stdout=out,
    )
    assert "created 3 runs" in out.getvalue()
    backfill = Backfill.objects.get(pipeline=target)
    assert backfill.timezone == "Europe/Paris"
    assert backfill_dates(backfill) == [utc(2023, 12, 31, 23), utc(2024, 1, 1, 23), utc(2024, 1, 2, 23)]
    assert all(r.variables == {"region": "eu"} for r in backfill.runs.all())


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--start", "last monday"], "--start"),
        (["--end", "2024-13-01"], "--end"),
        (["--interval", "@once"], "--interval"),
        (["--interval", "0 0 * *"], "--interval"),
        (["--variables", "[1]"], "--variables"),
        (["--variables", "{oops"], "--variables"),
        (["--timezone", "Nowhere/City"], "--timezone"),
        (["--end", "2023-12-01"], "--end"),
    ],
)
def test_the_command_names_the_bad_option(args, named):
    pipeline("cmd", blocks=0)
    base = {"--start": "2024-01-01", "--end": "2024-01-03", "--interval": "@daily"}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    argv = [part for pair in base.items() for part in pair]
    with pytest.raises(CommandError) as info:
        call_command("backfill", "cmd", *argv)
    assert str(info.value).startswith(named)
    assert Backfill.objects.count() == 0


def test_the_command_refuses_an_unknown_pipeline():
    with pytest.raises(CommandError, match="no pipeline with uuid 'nope'"):
        call_command("backfill", "nope", "--start", "2024-01-01", "--end", "2024-01-02", "--interval", "@daily")

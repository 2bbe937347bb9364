"""Builders shared by the trigger tests (a plain module, not a conftest, so that the
other trigger test modules keep their own fixtures)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from pipelines.models import Pipeline
from runs.models import PipelineRun, RunType
from tests.helpers import block_code, make_pipeline
from triggers import scheduler
from triggers.models import Trigger


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def pipeline(uuid: str = "etl", *, blocks: int = 1, **fields) -> Pipeline:
    """A pipeline of `blocks` one-line blocks. With no block, a run completes as soon as
    it starts, so a trigger's runs never stay unfinished."""
    specs = [
        (f"b{i}", "data_loader" if i == 0 else "transformer",
         block_code("data_loader" if i == 0 else "transformer", "return 1"), [f"b{i - 1}"] if i else [])
        for i in range(blocks)
    ]
    return make_pipeline(uuid, specs, **fields)


def instants(start: datetime, end: datetime, step: timedelta) -> Iterator[datetime]:
    at = start
    while at <= end:
        yield at
        at += step


def tick_through(start: datetime, end: datetime, step: timedelta) -> dict[str, int]:
    """Call the real tick at every `step` from start to end; the summed counts."""
    total: dict[str, int] = {}
    for now in instants(start, end, step):
        for key, value in scheduler.tick(now).items():
            total[key] = total.get(key, 0) + value
    return total


def scheduled_dates(trigger: Trigger) -> list[datetime]:
    runs = PipelineRun.objects.filter(trigger=trigger, run_type=RunType.SCHEDULED)
    return list(runs.order_by("execution_date").values_list("execution_date", flat=True))

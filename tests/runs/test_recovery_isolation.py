"""One bad row never stops recovery: every periodic pass handles each row in a savepoint
of its own, and a row it cannot handle is failed on that row (its block run failed with
the error, its run advanced or failed, a log line saying why) while the pass goes on.

The bad rows are written straight into the database, as an older version or a hand
edit would have left them."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from pipelines.models import Pipeline
from runs import orchestrator
from runs.models import BlockRun, LogEntry, PipelineRun
from tests.helpers import block_code, make_pipeline
from triggers import scheduler

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]

HEALTHY = 10

# What a bad row holds. The first is what the import and the admin used to accept (the
# retry policy raised ValueError on it); the second makes every advance of the run raise
# (the per-run limit is read from it), so the run can only be failed by the salvage.
POISONS = {
    "retries-not-a-number": ("retry_config", {"retries": "many"}),
    "concurrency-not-an-object": ("concurrency_config", "oops"),
}


def _poison(pipeline: Pipeline, column: str, value: object) -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE pipelines_pipeline SET {column} = %s WHERE id = %s", [json.dumps(value), pipeline.pk])


def _dead_worker_run(pipeline: Pipeline, stale_for: int) -> PipelineRun:
    """A run whose first block was running on a worker that died long ago."""
    run = orchestrator.run_create(pipeline, start=False)
    old = timezone.now() - timedelta(seconds=stale_for)
    PipelineRun.objects.filter(pk=run.pk).update(status="running", started_at=old)
    BlockRun.objects.filter(pipeline_run=run, block_uuid="load").update(
        status="running", claim="gone", attempt=1, started_at=old, heartbeat_at=old,
    )
    return run


def _pipeline(uuid: str) -> Pipeline:
    return make_pipeline(uuid, [
        ("load", "data_loader", block_code("data_loader", "return 1")),
        ("after", "transformer", block_code("transformer", "return 2"), ["load"]),
    ])


@pytest.mark.parametrize("poison", POISONS, ids=list(POISONS))
def test_a_poisoned_row_does_not_stop_the_recovery_of_ten_others(settings, poison):
    stale = settings.MILLRACE_HEARTBEAT_LIMIT + 30
    bad_pipeline = _pipeline("bad")
    # The bad run comes first, so that the pass meets it before the healthy ones.
    bad = _dead_worker_run(bad_pipeline, stale)
    _poison(bad_pipeline, *POISONS[poison])
    healthy = [_dead_worker_run(_pipeline(f"ok{i}"), stale) for i in range(HEALTHY)]

    counts = scheduler.tick()

    assert counts["errors"] == 0, "no pass failed as a whole"
    for run in healthy:
        run.refresh_from_db()
        assert run.status == "failed"
        assert dict(run.block_runs.values_list("block_uuid", "status")) == {"load": "failed", "after": "upstream_failed"}
    bad.refresh_from_db()
    load = bad.block_runs.get(block_uuid="load")
    assert load.status == "failed" and "stopped heartbeating" in load.error
    assert bad.status == "failed"
    assert not bad.block_runs.filter(status__in=["initial", "queued", "running"]).exists()
    messages = list(LogEntry.objects.filter(pipeline_run=bad).values_list("message", flat=True))
    if poison == "retries-not-a-number":
        assert any("is not retried: its retry_config cannot be read" in m for m in messages), messages
    else:
        assert any("could not be handled" in m and "AttributeError" in m for m in messages), messages
    assert counts["block_runs_failed"] == HEALTHY + 1


def test_a_poisoned_run_does_not_stop_due_retries_of_the_others():
    def waiting_for_retry(pipeline: Pipeline) -> PipelineRun:
        run = orchestrator.run_create(pipeline, start=False)
        PipelineRun.objects.filter(pk=run.pk).update(status="running", started_at=timezone.now())
        BlockRun.objects.filter(pipeline_run=run, block_uuid="load").update(
            status="initial", attempt=1, next_retry_at=timezone.now() - timedelta(seconds=1), error="boom",
        )
        return run

    bad_pipeline = _pipeline("bad")
    bad = waiting_for_retry(bad_pipeline)
    _poison(bad_pipeline, "concurrency_config", "oops")
    healthy = [waiting_for_retry(_pipeline(f"ok{i}")) for i in range(HEALTHY)]

    queued = orchestrator.retries_due()

    assert len(queued) == HEALTHY
    for run in healthy:
        assert run.block_runs.get(block_uuid="load").status == "queued"
    load = bad.block_runs.get(block_uuid="load")
    assert load.status == "failed" and "The retry could not be queued" in load.error
    bad.refresh_from_db()
    assert bad.status == "failed"


def test_a_poisoned_run_does_not_stop_the_timeouts_of_the_others():
    def timed_out(pipeline: Pipeline) -> PipelineRun:
        run = orchestrator.run_create(pipeline, start=False, timeout=10)
        PipelineRun.objects.filter(pk=run.pk).update(status="running", started_at=timezone.now() - timedelta(seconds=60))
        return run

    bad_pipeline = _pipeline("bad")
    bad = timed_out(bad_pipeline)
    _poison(bad_pipeline, "concurrency_config", {"pipeline_run_limit": "two"})
    healthy = [timed_out(_pipeline(f"ok{i}")) for i in range(HEALTHY)]

    done = orchestrator.enforce_deadlines()

    assert done["timed_out"] == HEALTHY + 1
    for run in [*healthy, bad]:
        run.refresh_from_db()
        assert run.status == "failed"
    assert LogEntry.objects.filter(pipeline_run=bad, message__contains="timed out after 10 s").exists()


def test_a_worker_whose_result_cannot_be_recorded_fails_the_block_instead_of_leaving_it_running():
    pipeline = _pipeline("bad")
    run = orchestrator.run_create(pipeline, start=False)
    [load] = orchestrator.advance(run.pk)
    _poison(pipeline, "concurrency_config", "oops")

    assert orchestrator.block_run_execute(load) == []

    run.refresh_from_db()
    assert run.status == "failed"
    br = BlockRun.objects.get(pk=load)
    assert br.status == "failed" and "its result could not be recorded" in br.error
    assert LogEntry.objects.filter(pipeline_run=run, message__startswith="Run failed: it could not be handled").exists()

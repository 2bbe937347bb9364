"""The next block of a chain is claimed in the transaction that records the block above
it. On PostgreSQL that claim travels in the same query as the result (prepared
statements, one round trip); on SQLite `advance` claims it. Either way a block is
claimed only when `advance`'s rules would claim it."""

from __future__ import annotations

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from pipelines.execution import ExecutionResult
from pipelines.models import Pipeline
from runs import orchestrator
from runs.models import BlockRun, PipelineRun
from tests.helpers import block_code, chain, make_pipeline

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.sqlite]

postgres_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="the one-query claim is PostgreSQL's")


def running(run: PipelineRun, block_uuid: str, claim: str = "mine") -> BlockRun:
    """The block run of `block_uuid`, made `running` under `claim`, loaded with its run
    and pipeline as a worker holds it."""
    BlockRun.objects.filter(pipeline_run=run, block_uuid=block_uuid).update(status="running", claim=claim, attempt=1)
    return BlockRun.objects.select_related("pipeline_run__pipeline").get(pipeline_run=run, block_uuid=block_uuid)


def started(pipeline: Pipeline) -> PipelineRun:
    run = orchestrator.run_create(pipeline, start=False)
    orchestrator.advance(run.pk)
    return run


def statuses(run: PipelineRun) -> dict[str, str]:
    return dict(run.block_runs.values_list("block_uuid", "status"))


def test_finishing_a_chain_link_claims_the_block_below_for_the_same_worker():
    warm = started(chain("warm", 2))  # statements prepared on this connection already
    orchestrator.finish(running(warm, "b000"), "mine", ExecutionResult(status="completed"), claim_next=True)
    run = started(chain("link", 3))
    br = running(run, "b000")

    with CaptureQueriesContext(connection) as queries:
        queued, claimed = orchestrator.finish(br, "mine", ExecutionResult(status="completed"), claim_next=True)

    assert queued == []
    assert (claimed.block_uuid, claimed.attempt) == ("b001", 1)
    below = BlockRun.objects.get(pk=claimed.block_run_id)
    assert (below.block_uuid, below.status, below.claim, below.attempt) == ("b001", "running", claimed.claim, 1)
    assert statuses(run) == {"b000": "completed", "b001": "running", "b002": "initial"}
    if connection.vendor == "postgresql":
        # The run's lock, the result, the claim and the statuses: one query.
        sent = [q["sql"] for q in queries.captured_queries if q["sql"] not in ("BEGIN", "COMMIT")]
        assert len(sent) == 1 and sent[0].startswith("EXECUTE millrace_lock_run"), sent


def test_a_block_run_limit_set_while_the_run_ran_holds_the_chain_back():
    # b -> c is a chain link; d is another branch below a, running.
    pipeline = make_pipeline("held", [
        ("a", "data_loader", block_code("data_loader", "return 1")),
        ("b", "transformer", block_code("transformer", "return 1"), ["a"]),
        ("c", "transformer", block_code("transformer", "return 1"), ["b"]),
        ("d", "transformer", block_code("transformer", "return 1"), ["a"]),
    ])
    run = started(pipeline)
    BlockRun.objects.filter(pipeline_run=run, block_uuid="a").update(status="completed")
    BlockRun.objects.filter(pipeline_run=run, block_uuid="d").update(status="running", claim="other")
    br = running(run, "b")
    # Edited after the worker loaded the pipeline (and without a new version).
    Pipeline.objects.filter(pk=pipeline.pk).update(concurrency_config={"block_run_limit": 1})

    queued, claimed = orchestrator.finish(br, "mine", ExecutionResult(status="completed"), claim_next=True)

    assert (queued, claimed) == ([], None)
    assert statuses(run) == {"a": "completed", "b": "completed", "c": "initial", "d": "running"}


def slot_pipeline(uuid: str) -> Pipeline:
    # a -> b is a chain link; x is independent of both.
    return make_pipeline(uuid, [
        ("a", "data_loader", block_code("data_loader", "return 1")),
        ("b", "transformer", block_code("transformer", "return 1"), ["a"]),
        ("x", "data_loader", block_code("data_loader", "return 1")),
    ])


def test_a_block_waiting_for_a_slot_gets_the_freed_one_before_the_chain(settings):
    settings.MILLRACE_CONCURRENCY = 1
    run = started(slot_pipeline("waited"))
    assert statuses(run) == {"a": "queued", "b": "initial", "x": "initial"}
    br = running(run, "a")

    queued, claimed = orchestrator.finish(br, "mine", ExecutionResult(status="completed"), claim_next=True)

    assert (queued, claimed.block_uuid) == ([], "x")
    assert statuses(run) == {"a": "completed", "b": "initial", "x": "running"}
    run.refresh_from_db()
    assert run.waiting_for_slot


def test_the_chain_takes_the_slot_its_block_freed_and_no_more(settings):
    settings.MILLRACE_CONCURRENCY = 1
    run = started(slot_pipeline("slot"))
    # x failed once and its retry is due: it becomes ready as a ends, with no slot.
    past = timezone.now() - timezone.timedelta(seconds=1)
    BlockRun.objects.filter(pipeline_run=run, block_uuid="x").update(attempt=1, next_retry_at=past)
    PipelineRun.objects.filter(pk=run.pk).update(waiting_for_slot=False)
    br = running(run, "a")

    queued, claimed = orchestrator.finish(br, "mine", ExecutionResult(status="completed"), claim_next=True)

    assert queued == [] and claimed is not None
    assert BlockRun.objects.filter(status__in=["queued", "running"]).count() == 1
    run.refresh_from_db()
    assert run.waiting_for_slot


def test_a_block_waiting_for_its_retry_is_not_claimed_early():
    run = started(chain("retry", 2))
    later = timezone.now() + timezone.timedelta(minutes=5)
    BlockRun.objects.filter(pipeline_run=run, block_uuid="b001").update(next_retry_at=later, attempt=1)
    br = running(run, "b000")

    _queued, claimed = orchestrator.finish(br, "mine", ExecutionResult(status="completed"), claim_next=True)

    assert claimed is None
    assert statuses(run)["b001"] == "initial"


def test_a_failed_block_claims_nothing_below_it():
    run = started(chain("failing", 2))
    br = running(run, "b000")

    _queued, claimed = orchestrator.finish(br, "mine", ExecutionResult(status="failed", error="boom"), claim_next=True)

    assert claimed is None
    assert statuses(run) == {"b000": "failed", "b001": "upstream_failed"}


@postgres_only
def test_the_query_claims_only_on_the_definition_the_caller_read_the_chain_from():
    run = started(chain("versioned", 2))
    running(run, "b000")
    version = Pipeline.objects.get(pk=run.pipeline_id).version
    now = timezone.now()

    def record(block: str, claim: str, at_version: int) -> tuple[str, str] | None:
        with transaction.atomic():
            won, read = orchestrator.record_result_and_read(
                BlockRun.objects.get(pipeline_run=run, block_uuid=block).pk, claim, "completed",
                ExecutionResult(status="completed"), "", now, run.pk, orchestrator.ChainClaim("b001", "next", at_version),
            )
            assert won
            if read.chained is None:
                transaction.set_rollback(True)
            return (read.chained.block_uuid, read.chained.claim) if read.chained else None

    assert record("b000", "mine", version + 1) is None  # stale: rolled back, nothing claimed
    assert statuses(run) == {"b000": "running", "b001": "initial"}
    assert record("b000", "mine", version) == ("b001", "next")
    assert statuses(run) == {"b000": "completed", "b001": "running"}


@postgres_only
def test_statements_are_prepared_once_per_connection_and_again_after_a_reconnect(settings):
    def prepared() -> set[str]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT name FROM pg_prepared_statements WHERE name LIKE 'millrace_%%'")
            return {name for (name,) in cursor.fetchall()}

    settings.MILLRACE_PREPARED_STATEMENTS = False
    run = started(chain("unprepared", 2))
    orchestrator.finish(running(run, "b000"), "mine", ExecutionResult(status="completed"), claim_next=True)
    assert prepared() == set()

    settings.MILLRACE_PREPARED_STATEMENTS = True
    for name in ("prep1", "prep2"):
        connection.close()  # a new connection has none of them
        run = started(chain(name, 2))
        _queued, claimed = orchestrator.finish(running(run, "b000"), "mine", ExecutionResult(status="completed"), claim_next=True)
        assert claimed.block_uuid == "b001"
        assert {"millrace_lock_run", "millrace_record", "millrace_chain_claim", "millrace_statuses"} <= prepared()

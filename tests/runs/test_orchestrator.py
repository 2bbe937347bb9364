from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from pipelines import variables
from pipelines.execution import ExecutionResult
from runs import orchestrator
from runs.models import BlockRun, LogEntry, PipelineRun
from runs.services import run_execute_sync
from tests.helpers import block_code, chain, make_pipeline

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.sqlite]


def outputs(run: PipelineRun, block_uuid: str) -> list:
    br = run.block_runs.get(block_uuid=block_uuid)
    return [variables.read_value(meta) for meta in br.outputs]


def statuses(run: PipelineRun) -> dict[str, str]:
    return dict(run.block_runs.values_list("block_uuid", "status"))


def test_a_chain_runs_in_order_and_completes():
    pipeline = chain("c3", 3, body="return (args[0] if args else 0) + 1")
    run = run_execute_sync(orchestrator.run_create(pipeline, start=False))
    assert run.status == "completed"
    assert run.started_at and run.completed_at
    assert outputs(run, "b002") == [3]
    assert set(statuses(run).values()) == {"completed"}


def test_upstream_outputs_arrive_as_positional_arguments_in_edge_order():
    pipeline = make_pipeline("order", [
        ("first", "data_loader", block_code("data_loader", "return 'first'")),
        ("second", "data_loader", block_code("data_loader", "return 'second'")),
        ("combine", "transformer", block_code("transformer", "return [a, b]", "a, b, **kwargs"), ["second", "first"]),
    ])
    run = run_execute_sync(orchestrator.run_create(pipeline, start=False))
    assert run.status == "completed"
    assert outputs(run, "combine") == ["second", "first"]


def test_runtime_variables_override_pipeline_variables_and_reach_kwargs():
    body = "return {k: kwargs[k] for k in ('env', 'limit', 'pipeline_uuid', 'block_uuid', 'ds', 'retry')}"
    pipeline = make_pipeline(
        "vars", [("v", "data_loader", block_code("data_loader", body))],
        variables={"env": "dev", "limit": 10},
    )
    run = orchestrator.run_create(pipeline, variables={"limit": 3}, start=False)
    run = run_execute_sync(run)
    seen = outputs(run, "v")[0]
    assert seen["env"] == "dev" and seen["limit"] == 3
    assert seen["pipeline_uuid"] == "vars" and seen["block_uuid"] == "v"
    assert seen["ds"] == run.execution_date.strftime("%Y-%m-%d")
    assert seen["retry"] == {"attempts": 1}
    assert run.variables == {"env": "dev", "limit": 3}


def test_a_failure_marks_downstream_upstream_failed_and_independent_branches_finish():
    pipeline = make_pipeline("branches", [
        ("load", "data_loader", block_code("data_loader", "return 1")),
        ("bad", "transformer", block_code("transformer", "raise RuntimeError('broken on purpose')"), ["load"]),
        ("after_bad", "transformer", block_code("transformer", "return 2"), ["bad"]),
        ("after_after", "data_exporter", block_code("data_exporter", "return 3"), ["after_bad"]),
        ("good", "transformer", block_code("transformer", "return 4"), ["load"]),
        ("after_good", "data_exporter", block_code("data_exporter", "return 5"), ["good"]),
    ])
    run = run_execute_sync(orchestrator.run_create(pipeline, start=False))
    assert run.status == "failed"
    assert statuses(run) == {
        "load": "completed", "bad": "failed", "after_bad": "upstream_failed",
        "after_after": "upstream_failed", "good": "completed", "after_good": "completed",
    }
    bad = run.block_runs.get(block_uuid="bad")
    assert "RuntimeError: broken on purpose" in bad.error
    assert 'branches/transformer/bad.py", line 3' in bad.traceback
    last = LogEntry.objects.filter(pipeline_run=run).order_by("-id").first()
    assert last.level == "ERROR" and "bad failed" in last.message


def test_print_and_logger_lines_become_log_entries_of_their_block():
    pipeline = make_pipeline("logs", [
        ("talk", "data_loader", block_code("data_loader", "print('hello from print')\nkwargs['logger'].warning('careful')")),
    ])
    run = run_execute_sync(orchestrator.run_create(pipeline, start=False))
    rows = list(LogEntry.objects.filter(pipeline_run=run, block_uuid="talk").values_list("level", "message", "block_type"))
    assert ("INFO", "hello from print", "data_loader") in rows
    assert ("WARNING", "careful", "data_loader") in rows


def test_an_infinite_loop_is_killed_at_the_block_timeout():
    pipeline = make_pipeline("loop", [
        ("spin", "data_loader", block_code("data_loader", "while True:\n    pass"), [], {"timeout": 1}),
    ])
    started = timezone.now()
    run = run_execute_sync(orchestrator.run_create(pipeline, start=False))
    assert run.status == "failed"
    assert "Timed out after 1 s" in run.block_runs.get().error
    assert (timezone.now() - started).total_seconds() < 10


def test_a_crashing_block_fails_with_a_clear_error_and_the_process_goes_on():
    pipeline = make_pipeline("crash", [
        ("segv", "data_loader", block_code("data_loader", "import ctypes\nctypes.string_at(0)")),
        ("exit", "data_loader", block_code("data_loader", "import os\nos._exit(7)")),
        ("fine", "data_loader", block_code("data_loader", "return 'still here'")),
    ])
    run = run_execute_sync(orchestrator.run_create(pipeline, start=False))
    errors = dict(run.block_runs.values_list("block_uuid", "error"))
    assert "SIGSEGV" in errors["segv"]
    assert "exited with code 7" in errors["exit"]
    assert outputs(run, "fine") == ["still here"]


def test_a_block_run_is_executed_once_even_if_its_task_arrives_twice():
    pipeline = chain("twice", 1)
    run = orchestrator.run_create(pipeline, start=False)
    [queued] = orchestrator.advance(run.pk)
    orchestrator.block_run_execute(queued)
    br = BlockRun.objects.get(pk=queued)
    assert orchestrator.block_run_execute(queued) == []
    again = BlockRun.objects.get(pk=queued)
    assert (again.attempt, again.status, again.completed_at) == (1, "completed", br.completed_at)


def test_a_result_from_an_attempt_that_lost_its_claim_is_ignored():
    pipeline = chain("fenced", 1)
    run = orchestrator.run_create(pipeline, start=False)
    [queued] = orchestrator.advance(run.pk)
    br = BlockRun.objects.get(pk=queued)
    BlockRun.objects.filter(pk=queued).update(status="running", claim="new-owner")
    assert orchestrator.finish(br, "old-owner", ExecutionResult(status="completed")) == ([], None)
    br.refresh_from_db()
    assert (br.status, br.claim) == ("running", "new-owner")



def test_block_run_limit_queues_at_most_that_many_blocks_of_a_run():
    blocks = [("root", "data_loader", block_code("data_loader", "return 0"))]
    blocks += [(f"leaf{i}", "transformer", block_code("transformer", "return 1"), ["root"]) for i in range(5)]
    pipeline = make_pipeline("limited", blocks, concurrency_config={"block_run_limit": 2})
    run = orchestrator.run_create(pipeline, start=False)
    [root] = orchestrator.advance(run.pk)
    queued = orchestrator.block_run_execute(root)
    assert len(queued) == 2
    assert orchestrator.advance(run.pk) == []  # still two active: nothing more
    run = run_execute_sync(run)
    assert run.status == "completed"


def test_the_global_limit_holds_across_runs_and_waiting_runs_are_woken(settings):
    settings.MILLRACE_CONCURRENCY = 1
    first = orchestrator.run_create(chain("g1", 1), start=False)
    second = orchestrator.run_create(chain("g2", 1), start=False)
    [a] = orchestrator.advance(first.pk)
    assert orchestrator.advance(second.pk) == []
    second.refresh_from_db()
    assert second.waiting_for_slot
    orchestrator.block_run_execute(a)
    woken = orchestrator.wake_waiting_runs()
    assert woken == list(second.block_runs.values_list("id", flat=True))


def test_reconcile_fails_a_block_run_whose_worker_stopped_heartbeating(settings):
    pipeline = chain("dead", 2)
    run = orchestrator.run_create(pipeline, start=False)
    [first] = orchestrator.advance(run.pk)
    old = timezone.now() - timedelta(seconds=settings.MILLRACE_HEARTBEAT_LIMIT + 5)
    BlockRun.objects.filter(pk=first).update(status="running", claim="gone", heartbeat_at=old, started_at=old)
    done = orchestrator.reconcile()
    assert done["failed"] == 1
    run.refresh_from_db()
    assert run.status == "failed"
    assert statuses(run) == {"b000": "failed", "b001": "upstream_failed"}
    assert "stopped heartbeating" in BlockRun.objects.get(pk=first).error


def test_scratchpads_and_markdown_are_not_part_of_a_run():
    pipeline = make_pipeline("notes", [
        ("load", "data_loader", block_code("data_loader", "return 1")),
        ("notes", "markdown", "# hello", [], {"language": "markdown"}),
        ("scratch", "scratchpad", "x = 1\n"),
    ])
    run = run_execute_sync(orchestrator.run_create(pipeline, start=False))
    assert run.status == "completed"
    assert list(run.block_runs.values_list("block_uuid", flat=True)) == ["load"]


def test_a_block_that_returns_nothing_passes_none_downstream():
    pipeline = make_pipeline("none", [
        ("quiet", "data_loader", block_code("data_loader", "pass")),
        ("next", "transformer", block_code("transformer", "return repr(x)", "x, **kwargs"), ["quiet"]),
    ])
    run = run_execute_sync(orchestrator.run_create(pipeline, start=False))
    assert run.block_runs.get(block_uuid="quiet").outputs == []
    assert outputs(run, "next") == ["None"]


def test_a_block_deleted_after_the_run_was_created_fails_that_block_clearly():
    pipeline = chain("gone", 2)
    run = orchestrator.run_create(pipeline, start=False)
    pipeline.blocks.get(uuid="b001").delete()
    run = run_execute_sync(run)
    assert run.status == "failed"
    assert "no longer exists" in run.block_runs.get(block_uuid="b001").error


def test_runs_start_starts_many_runs_oldest_first_within_the_global_limit(settings):
    settings.MILLRACE_CONCURRENCY = 3
    pipeline = make_pipeline("roots", [
        ("a", "data_loader", block_code("data_loader", "return 1")),
        ("b", "data_loader", block_code("data_loader", "return 2")),
        ("c", "transformer", block_code("transformer", "return 3"), ["a", "b"]),
    ])
    limited = chain("limited", 1)
    limited.concurrency_config = {"pipeline_run_limit": 1}
    limited.save()
    runs = [orchestrator.run_create(pipeline, start=False) for _ in range(3)]
    capped = orchestrator.run_create(limited, start=False)  # goes through advance
    queued = orchestrator.runs_start([r.pk for r in runs] + [capped.pk])
    assert len(queued) == 3
    rows = {r.pk: statuses(r) for r in runs}
    assert rows[runs[0].pk] == {"a": "queued", "b": "queued", "c": "initial"}
    assert sorted(rows[runs[1].pk].values()) == ["initial", "initial", "queued"]
    assert set(rows[runs[2].pk].values()) == {"initial"}
    flags = dict(PipelineRun.objects.filter(pk__in=[r.pk for r in runs]).values_list("pk", "waiting_for_slot"))
    assert flags == {runs[0].pk: False, runs[1].pk: True, runs[2].pk: True}
    assert set(PipelineRun.objects.filter(pk__in=[r.pk for r in runs]).values_list("status", flat=True)) == {"running"}
    capped.refresh_from_db()
    assert capped.status == "running" and capped.waiting_for_slot  # no slot left for its block either
    assert orchestrator.runs_start([runs[0].pk]) == []  # not fresh any more: advance, nothing to do

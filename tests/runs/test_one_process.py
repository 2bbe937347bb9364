"""Runs of a pipeline with Mage's `run_pipeline_in_one_process`: its blocks run one
after another in one real child process, through the orchestrator as always."""

from __future__ import annotations

import pytest

from pipelines import variables
from runs import orchestrator
from runs.models import PipelineRun
from runs.services import run_execute_sync
from tests.helpers import block_code, make_pipeline

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.sqlite]

# Each block adds itself to the shared context and returns its process and what the
# context held by then.
STEP = """import os
kwargs["context"].setdefault("order", []).append(kwargs["block_uuid"])
return {"pid": os.getpid(), "order": list(kwargs["context"]["order"])}"""


def diamond(uuid: str, *, b_body: str = STEP, **fields):
    """a -> (b, c) -> d."""
    return make_pipeline(uuid, [
        ("a", "data_loader", block_code("data_loader", STEP)),
        ("b", "transformer", block_code("transformer", b_body), ["a"]),
        ("c", "transformer", block_code("transformer", STEP), ["a"]),
        ("d", "transformer", block_code("transformer", STEP), ["b", "c"]),
    ], **fields)


def outputs(run: PipelineRun) -> dict[str, object]:
    return {
        uuid: variables.read_value(metas[0])
        for uuid, metas in run.block_runs.values_list("block_uuid", "outputs") if metas
    }


def test_a_run_in_one_process_runs_every_block_in_one_process_one_at_a_time():
    pipeline = diamond("one_diamond", run_pipeline_in_one_process=True)

    run = run_execute_sync(orchestrator.run_create(pipeline, start=False))

    assert run.status == "completed"
    out = outputs(run)
    assert len({value["pid"] for value in out.values()}) == 1
    # The context is shared: the last block saw every block before it, in the order
    # they ran (a topological order).
    assert out["d"]["order"][0] == "a" and sorted(out["d"]["order"][1:3]) == ["b", "c"] and out["d"]["order"][3] == "d"
    spans = sorted(run.block_runs.values_list("started_at", "completed_at"))
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:], strict=False))


def test_without_the_option_each_block_has_its_own_process_and_context():
    run = run_execute_sync(orchestrator.run_create(diamond("own_diamond"), start=False))

    assert run.status == "completed"
    out = outputs(run)
    assert len({value["pid"] for value in out.values()}) == 4
    assert out["d"]["order"] == ["d"]


def test_outputs_cached_in_memory_pass_a_value_the_store_cannot_write():
    pipeline = make_pipeline("one_memory", [
        ("a", "data_loader", block_code("data_loader", "import threading\nreturn threading.Lock()")),
        ("b", "transformer", block_code("transformer", "return type(args[0]).__name__"), ["a"]),
    ], run_pipeline_in_one_process=True, cache_block_output_in_memory=True)

    run = run_execute_sync(orchestrator.run_create(pipeline, start=False))

    assert run.status == "completed", list(run.block_runs.values_list("block_uuid", "error"))
    assert run.block_runs.get(block_uuid="a").outputs[0]["kind"] == "memory"
    assert variables.read_value(run.block_runs.get(block_uuid="b").outputs[0]) == "lock"


def test_a_crash_in_one_block_fails_it_and_the_other_branch_runs_in_a_new_process():
    crash = "import os\nos._exit(3)"
    pipeline = diamond("one_crash", b_body=crash, run_pipeline_in_one_process=True)

    run = run_execute_sync(orchestrator.run_create(pipeline, start=False))

    assert run.status == "failed"
    status = dict(run.block_runs.values_list("block_uuid", "status"))
    assert status == {"a": "completed", "b": "failed", "c": "completed", "d": "upstream_failed"}
    out = outputs(run)
    assert out["a"]["pid"] != out["c"]["pid"]


@pytest.mark.parametrize("fields", [{"run_pipeline_in_one_process": True}, {"concurrency_config": {"block_run_limit": 1}}])
def test_a_run_started_with_others_queues_one_root_and_does_not_wait_for_a_global_slot(fields):
    # Two roots, one block at a time: the second root waits for the first, not for a
    # global slot (that flag would hold back the next block's claim).
    pipeline = make_pipeline(f"roots_{len(fields)}_{next(iter(fields))}", [
        ("x", "data_loader", block_code("data_loader", "return 1")),
        ("y", "data_loader", block_code("data_loader", "return 2")),
    ], **fields)
    run = orchestrator.run_create(pipeline, start=False)

    queued = orchestrator.runs_start([run.pk])

    run.refresh_from_db()
    assert len(queued) == 1
    assert (run.status, run.waiting_for_slot) == ("running", False)

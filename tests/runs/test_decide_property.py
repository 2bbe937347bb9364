"""The hot path's hand-written chain claim decides as `advance` does.

When a block finishes, the worker may run the block below it itself. On PostgreSQL the
query that records the result also claims that block (the SQL of `record_result_and_read`);
everywhere else, and whenever that query declines, `advance` decides in Python
(`runs.orchestrator.decide`). The query is only a faster way to the same decision: for
any state of a run, finishing a block through the query path must leave the same
statuses, the same queued blocks and the same claimed block as the Python path alone.

Hypothesis generates the states: a random DAG, a block that has just finished, the
other blocks' statuses, retries not yet due, the pipeline's block limit, the global
limit, a run waiting for a global slot, and a pipeline edited since the worker loaded
the run. The states are ones the orchestrator can be in: a ready block that was not
queued is only left `initial` when the run waits for a global slot or its block
limit is reached (every advance queues the others)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from itertools import count

import pytest
from django.db import connection, transaction
from django.db.models import F
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from hypothesis import HealthCheck, event, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from pipelines import services
from pipelines.execution import ExecutionResult
from pipelines.models import Block, Pipeline
from pipelines.selectors import pipeline_definition
from runs import orchestrator
from runs.models import BlockRun, PipelineRun
from tests.helpers import block_code, make_pipeline

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]

OTHER_STATUSES = ["initial"] * 5 + ["queued", "running", "completed", "completed", "failed", "cancelled",
                                    "upstream_failed", "condition_failed"]


_names = count()


@dataclass
class State:
    upstreams: list[list[int]]
    finished: int
    statuses: list[str]
    retry_later: list[bool]
    block_run_limit: int | None
    waiting_for_slot: bool
    concurrency: int
    edited: bool  # the block below the finished one now waits for another upstream


@st.composite
def run_states(draw: st.DrawFn) -> State:
    n = draw(st.integers(2, 6))
    # Chains are what the query claims: most blocks get one upstream, some two or none.
    upstreams = [sorted(draw(st.sets(st.integers(0, i - 1), min_size=0 if i < 2 else 1, max_size=2))) if i else []
                 for i in range(n)]
    finished = draw(st.integers(0, n - 2))
    statuses = [draw(st.sampled_from(OTHER_STATUSES)) for _ in range(n)]
    if draw(st.integers(0, 2)):  # mostly a chain link below it: what the query may claim
        link = finished + 1
        upstreams = [[u for u in ups if u != finished] for ups in upstreams]
        upstreams[link] = [finished]
        statuses[link] = "initial"
    if draw(st.booleans()):  # a root block ready too: it competes for the freed slot
        upstreams.append([])
        statuses.append("initial")
    statuses[finished] = "running"
    for up in upstreams[finished]:  # it could only start once its upstreams completed
        statuses[up] = "completed"
    state = State(
        upstreams=upstreams, finished=finished, statuses=statuses,
        retry_later=[draw(st.booleans()) and draw(st.booleans()) for _ in statuses],
        block_run_limit=draw(st.sampled_from([None, None, 0, 1, 2, 3])),
        waiting_for_slot=draw(st.booleans()) and draw(st.booleans()),
        concurrency=draw(st.integers(1, 4)),
        edited=draw(st.integers(0, 3)) == 0,
    )
    _queue_what_advance_would_have(state)
    return state


def _queue_what_advance_would_have(state: State) -> None:
    """Make the state one the orchestrator leaves: a ready block stays `initial` only
    while the run waits for a global slot or the run's block limit is reached."""
    if state.waiting_for_slot:
        return
    active = sum(1 for s in state.statuses if s in ("queued", "running"))
    for i, status in enumerate(state.statuses):
        ready = all(state.statuses[u] == "completed" for u in state.upstreams[i])
        if status == "initial" and ready and not state.retry_later[i]:
            if state.block_run_limit and active >= state.block_run_limit:
                return
            state.statuses[i] = "queued"
            active += 1


def _build(state: State) -> tuple[PipelineRun, int]:
    blocks = [
        (f"b{i}", "transformer" if ups else "data_loader",
         block_code("transformer" if ups else "data_loader", "return 1"), [f"b{u}" for u in ups])
        for i, ups in enumerate(state.upstreams)
    ]
    pipeline = make_pipeline(f"prop-{next(_names)}", blocks)
    if state.block_run_limit is not None:  # 0 (no limit, as Mage stores it) is written past the validation
        Pipeline.objects.filter(pk=pipeline.pk).update(concurrency_config={"block_run_limit": state.block_run_limit})
        pipeline.refresh_from_db()
    run = orchestrator.run_create(pipeline, start=False)
    now = timezone.now()
    PipelineRun.objects.filter(pk=run.pk).update(status="running", started_at=now, waiting_for_slot=state.waiting_for_slot)
    for i, status in enumerate(state.statuses):
        waits = status == "initial" and state.retry_later[i]
        BlockRun.objects.filter(pipeline_run=run, block_uuid=f"b{i}").update(
            status=status, attempt=1 if status != "initial" else int(waits), claim="mine" if i == state.finished else "",
            next_retry_at=now + timedelta(hours=1) if waits else (now - timedelta(minutes=1) if state.retry_later[i] else None),
        )
    finished = BlockRun.objects.get(pipeline_run=run, block_uuid=f"b{state.finished}")
    return run, finished.pk


def _edit(run: PipelineRun, state: State) -> None:
    """Edit the pipeline: the block below the finished one gets, instead, an upstream
    that has not completed (when there is one); the version changes either way."""
    below = state.finished + 1
    others = [i for i in range(below) if i != state.finished and state.statuses[i] != "completed"]
    if others:
        block = Block.objects.get(pipeline_id=run.pipeline_id, uuid=f"b{below}")
        services.block_update(block, upstream_blocks=[f"b{others[0]}"])
    else:
        Pipeline.objects.filter(pk=run.pipeline_id).update(version=F("version") + 1)


def _outcome(run: PipelineRun, done: orchestrator.Advanced) -> tuple:
    run.refresh_from_db()
    claimed = (done.claimed.block_uuid, done.claimed.attempt) if done.claimed else None
    queued = sorted(BlockRun.objects.filter(pk__in=done.queued).values_list("block_uuid", flat=True))
    statuses = dict(run.block_runs.values_list("block_uuid", "status"))
    return claimed, queued, statuses, run.status, run.waiting_for_slot


def _finish(run: PipelineRun, block_run_id: int, state: State, *, as_worker: bool) -> tuple[tuple, bool]:
    """Finish the block as the worker does (its run and pipeline loaded, so on
    PostgreSQL through the one query), or with the block run alone (the Python path).
    Returns the outcome and whether `advance` claimed in Python (a statement of its own)."""
    qs = BlockRun.objects.select_related("pipeline_run__pipeline") if as_worker else BlockRun.objects
    block_run = qs.get(pk=block_run_id)
    if as_worker:  # the worker read the definition when it claimed the block
        pipeline_definition(run.pipeline_id, block_run.pipeline_run.pipeline.version)
    if state.edited:  # the pipeline changed after the worker loaded its run
        _edit(run, state)
    with CaptureQueriesContext(connection) as queries:
        done = orchestrator.finish(block_run, "mine", ExecutionResult(status="completed"), claim_next=True)
    python_claim = any("attempt = attempt + 1" in q["sql"] and "EXECUTE" not in q["sql"] for q in queries.captured_queries)
    return _outcome(run, done), python_claim


def test_the_chain_claim_query_and_advance_make_the_same_decision(settings):
    seen: Counter[str] = Counter()

    @hypothesis_settings(
        max_examples=200, deadline=None, database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(state=run_states())
    # One state for each condition of the query, besides the ones generated: the run
    # waits for a slot (b3 is ready too), b2 waits for its retry, the pipeline was edited
    # (b2 now waits for b0, which has not run).
    @example(State([[], [0], [1], []], 1, ["completed", "running", "initial", "initial"], [False] * 4, None, True, 2, False))
    @example(State([[], [0], [1]], 1, ["completed", "running", "initial"], [False, False, True], None, False, 2, False))
    @example(State([[], [], [1]], 1, ["initial", "running", "initial"], [True, False, False], None, False, 2, True))
    def check(state: State) -> None:
        settings.MILLRACE_CONCURRENCY = state.concurrency
        with transaction.atomic():
            run, block_run_id = _build(state)
            outcomes = []
            for as_worker in (True, False):
                with transaction.atomic():
                    outcome, python_claim = _finish(run, block_run_id, state, as_worker=as_worker)
                    transaction.set_rollback(True)
                outcomes.append(outcome)
                if as_worker:
                    by = "nothing" if outcome[0] is None else ("advance" if python_claim else "the query")
                    event(f"claimed by {by}")
                    seen[by] += 1
            transaction.set_rollback(True)
        assert outcomes[0] == outcomes[1], state

    check()
    # Not vacuous: the generated states exercise both ways of claiming, and neither.
    assert seen["advance"] > 0 and seen["nothing"] > 0
    if connection.vendor == "postgresql":
        assert seen["the query"] > 0, seen

"""Creating runs and starting them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from pipelines.models import Pipeline
from pipelines.selectors import pipeline_definition
from runs.models import (
    BlockRun,
    BlockRunStatus,
    PipelineRun,
    PipelineRunStatus,
    RunType,
)
from runs.orchestrator import decide
from runs.orchestrator.advance import advance, dispatch, mark_queued, take_global_slots
from runs.orchestrator.decide import BlockState

S = BlockRunStatus


def run_create(
    pipeline: Pipeline,
    *,
    variables: dict[str, Any] | None = None,
    run_type: str = RunType.MANUAL,
    execution_date: datetime | None = None,
    event: dict | None = None,
    created_by: Any = None,
    trigger: Any = None,
    backfill: Any = None,
    timeout: int | None = None,
    timeout_status: str = "",
    sla: int | None = None,
    start: bool = True,
) -> PipelineRun:
    """Create a run of `pipeline`. `variables` are merged over the pipeline's (callers
    that add a trigger's variables merge them first). With `start`, the first blocks are
    queued and their tasks sent to the workers once the transaction commits; when the
    pipeline's `pipeline_run_limit` is reached the run waits in `initial` instead and
    starts, oldest first, when a run of the pipeline ends. `timeout` (seconds from the
    start) and `sla` are checked by `enforce_deadlines`.

    A scheduled run is unique per (trigger, execution_date): a second one raises
    IntegrityError, which the scheduler expects."""
    if variables is not None and not isinstance(variables, dict):
        raise ValueError("variables must be a JSON object")
    if timeout_status and timeout_status not in (PipelineRunStatus.FAILED, PipelineRunStatus.CANCELLED):
        raise ValueError("timeout_status must be 'failed' or 'cancelled'")
    with transaction.atomic():
        run = PipelineRun.objects.create(
            pipeline=pipeline,
            run_type=run_type,
            execution_date=execution_date or timezone.now(),
            variables={**(pipeline.variables or {}), **(variables or {})},
            event=event,
            created_by=created_by if getattr(created_by, "pk", None) else None,
            trigger=trigger,
            backfill=backfill,
            timeout=timeout or None,
            timeout_status=timeout_status or (PipelineRunStatus.FAILED if timeout else ""),
            sla=sla or None,
            waiting_for_run_slot=bool(start and pipeline.pipeline_run_limit),
        )
        # The definition cache saves a query per run (a scheduler tick creates many);
        # the caller's pipeline row gives the version.
        definition = pipeline_definition(pipeline.pk, pipeline.version)
        BlockRun.objects.bulk_create(
            BlockRun(pipeline_run=run, block_uuid=block.uuid, block_type=block.type)
            for block in definition.blocks.values() if block.executable
        )
        if start:
            dispatch(advance(run.pk))
    return run


def runs_start(run_ids: list[int]) -> list[int]:
    """Start many runs that were created with `start=False` (a scheduler tick, a
    backfill) and return the block runs queued, for `dispatch`. The same decision as
    `advance` on each, oldest first (`decide.plan` and `decide.admit`), but the global
    slots are locked and counted once for all of them: a tick that fires a thousand
    triggers would otherwise pay a thousand slot counts. Runs that are not fresh, and
    runs of pipelines with a `pipeline_run_limit`, go through `advance` one by one."""
    one_by_one: list[int] = []
    queued: list[int] = []
    now = timezone.now()
    with transaction.atomic():
        runs = _lock_fresh_runs(run_ids)
        blocks = _block_states_of(runs)
        free: list[int] = []  # the global slots left, counted on first need

        def grant(wanted: int) -> int:
            if not free:
                free.append(take_global_slots(settings.MILLRACE_CONCURRENCY))
            granted = min(wanted, free[0])
            free[0] -= granted
            return granted

        started: list[int] = []
        waiting: list[int] = []
        for run in runs:
            states = blocks[run.pk]
            if run.pipeline.pipeline_run_limit or not states or any(b.status != S.INITIAL for b in states):
                one_by_one.append(run.pk)
                continue
            plan = decide.plan(pipeline_definition(run.pipeline_id, run.pipeline.version), states)
            limit = decide.block_limit(run.pipeline.block_run_limit, run.pipeline.run_pipeline_in_one_process)
            admitted, waits = decide.admit(plan.ready, room=decide.room_in_run(limit, plan.status), freed=0, grant=grant)
            queued += plan.ids(admitted)
            (waiting if waits else started).append(run.pk)
        mark_queued(queued, now)
        for ids, flag in ((started, False), (waiting, True)):
            if ids:
                PipelineRun.objects.filter(id__in=ids).update(
                    status=PipelineRunStatus.RUNNING, started_at=now, waiting_for_slot=flag, updated_at=now,
                )
    for run_id in one_by_one:
        queued += advance(run_id)
    return queued


def _lock_fresh_runs(run_ids: list[int]) -> list[PipelineRun]:
    """The runs among `run_ids` still in `initial`, with their pipelines, oldest first,
    their rows locked to the end of the transaction."""
    qs = PipelineRun.objects.select_related("pipeline").filter(pk__in=run_ids, status=PipelineRunStatus.INITIAL)
    if connection.features.has_select_for_update:
        qs = qs.select_for_update(of=("self",))
    return list(qs.order_by("created_at", "id"))


def _block_states_of(runs: list[PipelineRun]) -> dict[int, list[BlockState]]:
    """The block runs (not dynamic children) of each run, in one query."""
    states: dict[int, list[BlockState]] = {run.pk: [] for run in runs}
    for run_id, pk, uuid, status, attempt in BlockRun.objects.filter(
        pipeline_run_id__in=list(states), dynamic_parent__isnull=True,
    ).values_list("pipeline_run_id", "id", "block_uuid", "status", "attempt"):
        states[run_id].append(BlockState(pk, uuid, status, attempt, False))
    return states

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
from runs.orchestrator.advance import (
    _block_limit,
    _classify,
    _room_in_run,
    _take_global_slots,
    advance,
    dispatch,
)

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
    backfill) and return the block runs queued, for `dispatch`. The same as calling
    `advance` on each, oldest first, but the global slots are locked and counted once
    and the writes are grouped: a tick that fires a thousand triggers would otherwise
    pay a thousand slot counts. Runs that are not fresh, and runs of pipelines with a
    `pipeline_run_limit`, go through `advance` one by one."""
    one_by_one: list[int] = []
    queued: list[int] = []
    now = timezone.now()
    with transaction.atomic():
        qs = PipelineRun.objects.select_related("pipeline").filter(pk__in=run_ids, status=PipelineRunStatus.INITIAL)
        if connection.features.has_select_for_update:
            qs = qs.select_for_update(of=("self",))
        runs = list(qs.order_by("created_at", "id"))
        rows: dict[int, dict[str, tuple[int, str]]] = {run.pk: {} for run in runs}
        for run_id, pk, uuid, status in BlockRun.objects.filter(
            pipeline_run_id__in=list(rows), dynamic_parent__isnull=True,
        ).values_list("pipeline_run_id", "id", "block_uuid", "status"):
            rows[run_id][uuid] = (pk, status)
        free: int | None = None
        started: list[int] = []
        waiting: list[int] = []
        for run in runs:
            blocks = rows[run.pk]
            if run.pipeline.pipeline_run_limit or not blocks or any(st != S.INITIAL for _, st in blocks.values()):
                one_by_one.append(run.pk)
                continue
            status = {uuid: st for uuid, (_, st) in blocks.items()}
            ready, _, _ = _classify(pipeline_definition(run.pipeline_id, run.pipeline.version), status)
            room = min(_room_in_run(_block_limit(run.pipeline), status), len(ready))
            if free is None:
                free, _ = _take_global_slots(settings.MILLRACE_CONCURRENCY)
            take = min(room, free)
            free -= take
            queued += [blocks[u][0] for u in ready[:take]]
            # Waiting for a slot means a global one: blocks held back by the run's own
            # limit start as its blocks finish.
            (waiting if take < room else started).append(run.pk)
        if queued:
            BlockRun.objects.filter(id__in=queued, status=S.INITIAL).update(status=S.QUEUED, queued_at=now, updated_at=now)
        for ids, flag in ((started, False), (waiting, True)):
            if ids:
                PipelineRun.objects.filter(id__in=ids).update(
                    status=PipelineRunStatus.RUNNING, started_at=now, waiting_for_slot=flag, updated_at=now,
                )
    for run_id in one_by_one:
        queued += advance(run_id)
    return queued

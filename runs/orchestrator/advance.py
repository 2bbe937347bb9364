"""Advancing a run: writing what `decide` decides (blocks that cannot run, blocks that
start, the run's own status), and sending queued block runs to the workers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, NamedTuple

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from pipelines.models import Pipeline
from pipelines.selectors import PipelineDefinition, pipeline_definition
from runs.models import (
    BLOCK_ACTIVE,
    RUN_TERMINAL,
    BlockRun,
    BlockRunStatus,
    LogEntry,
    PipelineRun,
    PipelineRunStatus,
)
from runs.orchestrator import decide
from runs.orchestrator.decide import BlockState, Plan
from runs.orchestrator.isolate import isolated, run_fail
from runs.orchestrator.sql import (
    ChainClaim,
    RunRead,
    block_states,
    claim_block_run,
    log_row,
    read_run_row,
    run_refreshed,
)

S = BlockRunStatus


# Postgres advisory lock key guarding the global concurrency count ("millrace").
_SLOTS_LOCK_KEY = 0x6D696C6C


@dataclass
class Claimed:
    """A block run that an advance claimed for the worker that called it to run next."""

    run: PipelineRun
    definition: PipelineDefinition
    block_run_id: int
    block_uuid: str
    claim: str
    attempt: int


class Advanced(NamedTuple):
    """What an advance did: the block runs it queued (for `dispatch`, or for the caller
    to execute) and the one it claimed for the caller to run next, if any."""

    queued: list[int]
    claimed: Claimed | None = None


def advance(run_id: int, *, freed: int = 0) -> list[int]:
    """Move a run forward and return the ids of the block runs it queued. The caller
    executes them or hands them to `dispatch`.

    1. Lock the run's row (`lock_run`).
    2. A finished run is left alone; a run that has not started waits while its
       pipeline's `pipeline_run_limit` is reached (`_may_start`).
    3. Plan (`decide.plan`): blocks below a failure become `upstream_failed`, blocks
       below a skipped block are skipped, blocks with every upstream completed are ready.
    4. Admit (`decide.admit`) as many ready blocks as the pipeline's `block_run_limit`
       and the global concurrency limit allow (counted from the database under a lock,
       never in memory), and queue them.
    5. Set the run's status (`decide.run_outcome`); a run that ends lets the next run of
       its pipeline start if a `pipeline_run_limit` held it back.

    `freed` is the number of global slots the caller has just released in the same
    transaction: up to that many ready blocks take them over without counting again."""
    with transaction.atomic(savepoint=False):
        run = lock_run(run_id)
        return _advance_locked(run, None, freed=freed).queued if run is not None else []


def advance_after_result(run_id: int, known: PipelineRun | None, read: RunRead | None, *, claim: str) -> Advanced:
    """The advance that recording a block's result makes, in the same transaction, with
    the global slot that block freed to hand on. With `claim`, the next block of a chain
    (`decide.next_in_chain`) is claimed under it for the caller to run, rather than
    queued; so is the one the result's own query claimed already (`read.chained`).

    `known` is the run (with its pipeline) as the caller loaded it, and `read` what the
    result's query read with the run's row locked: then nothing is read again. With
    `known` alone, one statement reads only the fields that can have changed."""
    # No savepoint: it would add two statements per block and buys nothing, since any
    # error here rolls back the caller's whole transaction anyway.
    with transaction.atomic(savepoint=False):
        run = run_refreshed(known, read.run) if known is not None and read is not None else None
        blocks = read.blocks if run is not None and read is not None else None
        run = run or lock_run(run_id, known)
        if run is None:
            return Advanced([])
        chained = read.chained if read is not None else None
        if chained is not None:
            # The query claimed the next block of a chain: it took the freed slot, and
            # nothing else is claimed here.
            return _advance_locked(run, blocks, freed=0, chained=chained)
        return _advance_locked(run, blocks, freed=1, claim=claim)


def _advance_locked(
    run: PipelineRun, blocks: list[BlockState] | None, *, freed: int, claim: str = "", chained: ChainClaim | None = None,
) -> Advanced:
    """Steps 2 to 5 of `advance`, on a run whose row this transaction holds locked."""
    if run.status in RUN_TERMINAL or (run.status == PipelineRunStatus.INITIAL and not _may_start(run)):
        return Advanced([])
    now = timezone.now()
    definition = pipeline_definition(run.pipeline_id, run.pipeline.version)
    plan = decide.plan(definition, blocks if blocks is not None else block_states(run.pk, now))
    _mark_not_run(run.pk, plan, now)
    limit = decide.block_limit(run.pipeline.block_run_limit, run.pipeline.run_pipeline_in_one_process)
    admitted, waiting = decide.admit(
        plan.ready, room=decide.room_in_run(limit, plan.status), freed=freed, grant=take_global_slots,
    )
    queued: list[int] = []
    claimed: Claimed | None = None
    next_uuid = decide.next_in_chain(admitted) if claim else None
    if next_uuid is not None:
        claimed = _claim_next(run, definition, plan, next_uuid, claim, now)
    else:
        queued = queue_block_runs(plan, admitted, now)
    if chained is not None:
        state = plan.blocks[chained.block_uuid]
        claimed = Claimed(run, definition, state.id, chained.block_uuid, chained.claim, state.attempt)
    _set_run_status(run, plan.status, waiting, now)
    if run.status in RUN_TERMINAL and run.pipeline.pipeline_run_limit:
        queued += start_waiting_runs(run.pipeline_id)
    return Advanced(queued, claimed)


def _mark_not_run(run_id: int, plan: Plan, now: datetime) -> None:
    """Write step 3's blocks that will not run: upstream-failed (with a line that says
    which upstream) and skipped."""
    if plan.broken:
        BlockRun.objects.filter(id__in=plan.ids(u for u, _ in plan.broken), status=S.INITIAL).update(
            status=S.UPSTREAM_FAILED, completed_at=now, updated_at=now
        )
        LogEntry.objects.bulk_create(
            log_row(run_id, None, now, "WARNING", f"Block {u} not run: upstream block {up} did not complete", u)
            for u, up in plan.broken
        )
    if plan.skipped:
        BlockRun.objects.filter(id__in=plan.ids(plan.skipped), status=S.INITIAL).update(
            status=S.CONDITION_FAILED, completed_at=now, updated_at=now
        )


def _claim_next(run: PipelineRun, definition: PipelineDefinition, plan: Plan, uuid: str, claim: str, now: datetime) -> Claimed:
    """Take the one admitted block from `initial` to `running` under `claim`, for the
    caller to run next."""
    state = plan.blocks[uuid]
    claim_block_run(state.id, claim, now, from_status=S.INITIAL)
    plan.status[uuid] = S.RUNNING
    return Claimed(run, definition, state.id, uuid, claim, state.attempt + 1)


def queue_block_runs(plan: Plan, uuids: list[str], now: datetime) -> list[int]:
    """Mark admitted blocks `queued` (for `dispatch`) and return their ids."""
    ids = plan.ids(uuids)
    mark_queued(ids, now)
    for uuid in uuids:
        plan.status[uuid] = S.QUEUED
    return ids


def mark_queued(block_run_ids: list[int], now: datetime) -> None:
    if block_run_ids:
        BlockRun.objects.filter(id__in=block_run_ids, status=S.INITIAL).update(
            status=S.QUEUED, queued_at=now, next_retry_at=None, updated_at=now,
        )


def lock_run(run_id: int, known: PipelineRun | None = None) -> PipelineRun | None:
    """The run with its pipeline, its row locked to the end of the transaction. With
    `known` (the same run as loaded earlier with its pipeline), one hand-written
    statement reads again only the fields that can have changed since: the ORM's
    version of this join costs several times more to build than to run."""
    if known is not None and known.pk == run_id and PipelineRun.pipeline.is_cached(known):
        row = read_run_row(run_id)
        if row is None:
            return None
        run = run_refreshed(known, row)
        if run is not None:
            return run
    qs = PipelineRun.objects.select_related("pipeline").order_by()
    if connection.features.has_select_for_update:
        qs = qs.select_for_update(of=("self",))
    found = list(qs.filter(pk=run_id))
    return found[0] if found else None


def _may_start(run: PipelineRun) -> bool:
    """Whether a run in `initial` may start under its pipeline's `pipeline_run_limit`:
    a slot is free and no older run of the pipeline is waiting for one (runs start in
    order). The pipeline's row is locked so two runs cannot take the last slot at once."""
    limit = run.pipeline.pipeline_run_limit
    if not limit:
        return True
    if connection.features.has_select_for_update:
        Pipeline.objects.select_for_update().filter(pk=run.pipeline_id).values_list("pk").first()
    siblings = PipelineRun.objects.filter(pipeline_id=run.pipeline_id).exclude(pk=run.pk)
    running = siblings.filter(status=PipelineRunStatus.RUNNING).count()
    older_waiting = siblings.filter(waiting_for_run_slot=True, created_at__lt=run.created_at).exists()
    may = running < limit and not older_waiting
    if may == run.waiting_for_run_slot:
        PipelineRun.objects.filter(pk=run.pk).update(waiting_for_run_slot=not may)
        run.waiting_for_run_slot = not may
    return may


def start_waiting_runs(pipeline_id: int) -> list[int]:
    """Start the oldest runs of a pipeline that wait for a `pipeline_run_limit` slot, as
    many as are free. Called when a run ends, and by the scheduler's pass."""
    queued: list[int] = []
    waiting = PipelineRun.objects.filter(pipeline_id=pipeline_id, waiting_for_run_slot=True, status=PipelineRunStatus.INITIAL)
    for run_id in list(waiting.order_by("created_at", "id").values_list("id", flat=True)[:50]):
        got = isolated(
            f"starting waiting run {run_id}", partial(advance, run_id), partial(run_fail, run_id),
        )
        queued.extend(got or [])
        if got is not None and PipelineRun.objects.filter(pk=run_id, status=PipelineRunStatus.INITIAL).exists():
            break
    return queued


def take_global_slots(wanted: int) -> int:
    """How many of `wanted` blocks may be queued under the global limit. On PostgreSQL an advisory lock, held to the
    end of the transaction, makes the count and the queueing one step across runs; SQLite
    already runs one write transaction at a time."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_SLOTS_LOCK_KEY])
    active = BlockRun.objects.filter(status__in=list(BLOCK_ACTIVE)).count()
    free = max(0, settings.MILLRACE_CONCURRENCY - active)
    return min(wanted, free)


def _set_run_status(run: PipelineRun, status: dict[str, str], waiting: bool, now: datetime) -> None:
    changes: dict[str, Any] = {}
    final = decide.run_outcome(status)
    if final is not None:
        changes.update(status=final, completed_at=now, waiting_for_slot=False, waiting_for_run_slot=False)
        if run.started_at is None:
            changes["started_at"] = now
        if run.sla and now > run.created_at + timedelta(seconds=run.sla):
            changes["passed_sla"] = True
        _log_run_end(run, final, status, now)
    else:
        if run.status == PipelineRunStatus.INITIAL:
            changes.update(status=PipelineRunStatus.RUNNING, started_at=run.started_at or now, waiting_for_run_slot=False)
        if run.waiting_for_slot != waiting:
            changes["waiting_for_slot"] = waiting
    if changes:
        PipelineRun.objects.filter(pk=run.pk).update(updated_at=now, **changes)
        for key, value in changes.items():
            setattr(run, key, value)


def _log_run_end(run: PipelineRun, final: str, status: dict[str, str], now: datetime) -> None:
    """Every finished run ends with a line that says how it ended and, if it failed, why."""
    if final == PipelineRunStatus.COMPLETED:
        message, level = "Run completed", "INFO"
    else:
        failed = [u for u, s in status.items() if s == S.FAILED]
        level = "ERROR"
        message = f"Run {final}" + (f": block{'s' if len(failed) > 1 else ''} {', '.join(failed)} failed" if failed else "")
    LogEntry.objects.create(pipeline_run_id=run.pk, timestamp=now, level=level, message=message)


def dispatch(block_run_ids: list[int]) -> None:
    """Send one task per queued block run to the workers, after the current transaction
    commits (a worker must never see a block run before its row is committed)."""
    if not block_run_ids:
        return

    def send() -> None:
        from django_q.tasks import async_task

        for pk in block_run_ids:
            async_task("runs.tasks.block_run_execute", pk, hook=None, save=False)

    transaction.on_commit(send)

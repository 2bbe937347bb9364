"""Advancing a run: which blocks are ready, the limits they wait for, the run's own
status; and sending queued block runs to the workers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from pipelines.models import Pipeline
from pipelines.selectors import PipelineDefinition, pipeline_definition
from runs.models import (
    BLOCK_ACTIVE,
    BLOCK_TERMINAL,
    RUN_TERMINAL,
    BlockRun,
    BlockRunStatus,
    LogEntry,
    PipelineRun,
    PipelineRunStatus,
)
from runs.orchestrator.isolate import isolated, run_fail
from runs.orchestrator.sql import (
    _CONCURRENCY,
    _block_statuses,
    _claim,
    _log_row,
    _refresh_run_sql,
    _RunRead,
)

S = BlockRunStatus


_FAILED_UPSTREAM = frozenset({S.FAILED, S.UPSTREAM_FAILED, S.CANCELLED})
# Postgres advisory lock key guarding the global concurrency count ("millrace").
_SLOTS_LOCK_KEY = 0x6D696C6C


def advance(run_id: int, *, freed: int = 0) -> list[int]:
    return _advance(run_id, freed=freed)[0]


def _advance(
    run_id: int, *, freed: int = 0, claim: str = "", known: PipelineRun | None = None, read: _RunRead | None = None,
) -> tuple[list[int], _Claimed | None]:
    """Move a run forward and return the ids of the block runs it queued. The caller
    executes them or hands them to `dispatch`.

    1. Lock the run's row; a finished run is left alone, and a run that has not started
       waits while its pipeline's `pipeline_run_limit` is reached.
    2. Walk the blocks in topological order: an `initial` block below a failed,
       cancelled or upstream-failed block becomes `upstream_failed`; below a skipped
       (condition-failed) block it is skipped too; with every upstream completed it is
       ready.
    3. Queue as many ready blocks as the pipeline's `block_run_limit` and the global
       concurrency limit allow (counted from the database under a lock, never in memory).
    4. Compute the run's status: finished when every block run is, failed when any
       failed, otherwise running.

    `freed` is the number of global slots the caller has just released in the same
    transaction (a block that finished): up to that many ready blocks take them over
    without counting the active block runs again. With `claim`, when exactly one block
    is ready it goes from `initial` to `running` under that claim in one step, for the
    caller to execute (a chain), and comes back as the second value instead of in the
    list; so does the block that the caller's own query claimed (`read.chained`).
    `known` is the run (with its pipeline) as the caller last loaded it: only what can
    change is read again, or nothing when the caller has read it already (`read`, in
    this transaction, with the run's row locked).
    """
    now = timezone.now()
    chained = read.chained if read is not None else None
    if chained is not None:
        # The caller's query claimed the next block of a chain already: it has taken
        # the slot the finished block freed, and nothing else is claimed here.
        freed, claim = 0, ""
    # No savepoint when called inside `_finish`: it would add two statements per block
    # and buys nothing, since any error there rolls back the whole transaction anyway.
    with transaction.atomic(savepoint=False):
        run = _refreshed(known, read.run_row) if known is not None and read is not None else None
        if run is None:
            run, read = _lock_run(run_id, known), None
        if run is None or run.status in RUN_TERMINAL:
            return [], None
        if run.status == PipelineRunStatus.INITIAL and not _may_start(run):
            return [], None
        rows = read.block_rows if read is not None else _block_statuses(run_id, now)
        ids = {uuid: pk for pk, uuid, _, _, _ in rows}
        status = {uuid: st for _, uuid, st, _, _ in rows}
        retry_later = {uuid for _, uuid, _, _, waits in rows if waits}
        definition = pipeline_definition(run.pipeline_id, run.pipeline.version)
        ready, skipped, broken = _classify(definition, status)
        ready = [u for u in ready if u not in retry_later]
        if broken:
            BlockRun.objects.filter(id__in=[ids[u] for u, _ in broken], status=S.INITIAL).update(
                status=S.UPSTREAM_FAILED, completed_at=now, updated_at=now
            )
            LogEntry.objects.bulk_create(
                _log_row(run_id, None, now, "WARNING", f"Block {u} not run: upstream block {up} did not complete", u)
                for u, up in broken
            )
        if skipped:
            BlockRun.objects.filter(id__in=[ids[u] for u in skipped], status=S.INITIAL).update(
                status=S.CONDITION_FAILED, completed_at=now, updated_at=now
            )
        queued: list[int] = []
        claimed: _Claimed | None = None
        waiting = False
        if ready:
            room = _room_in_run(_block_limit(run.pipeline), status)
            if room > 0:
                room = min(room, len(ready))
                room, waiting = (room, False) if room <= freed else _take_global_slots(room)
            queued = [ids[u] for u in ready[:room]]
            if claim and len(queued) == 1:
                _claim(queued[0], claim, now, from_status=S.INITIAL)
                attempt = next(a for pk, _, _, a, _ in rows if pk == queued[0]) + 1
                claimed = _Claimed(run, definition, queued[0], ready[0], claim, attempt)
                status[ready[0]], queued = S.RUNNING, []
            elif queued:
                BlockRun.objects.filter(id__in=queued, status=S.INITIAL).update(
                    status=S.QUEUED, queued_at=now, next_retry_at=None, updated_at=now,
                )
                for u in ready[:room]:
                    status[u] = S.QUEUED
        if chained is not None:
            uuid, chain_claim = chained
            pk, attempt = next((pk, a) for pk, u, _, a, _ in rows if u == uuid)
            claimed = _Claimed(run, definition, pk, uuid, chain_claim, attempt)
        _set_run_status(run, status, waiting, now)
        if run.status in RUN_TERMINAL and run.pipeline.pipeline_run_limit:
            queued += start_waiting_runs(run.pipeline_id)
    return queued, claimed


@dataclass
class _Claimed:
    """A block run that `_advance` claimed for its caller to execute next."""

    run: PipelineRun
    definition: PipelineDefinition
    block_run_id: int
    block_uuid: str
    claim: str
    attempt: int


def _lock_run(run_id: int, known: PipelineRun | None = None) -> PipelineRun | None:
    """The run with its pipeline, its row locked to the end of the transaction. With
    `known` (the same run as loaded earlier with its pipeline), one hand-written
    statement reads again only the fields that can have changed since: the ORM's
    version of this join costs about a millisecond a block to build."""
    if known is not None and known.pk == run_id and PipelineRun.pipeline.is_cached(known):
        with connection.cursor() as cursor:
            cursor.execute(_refresh_run_sql(), [run_id])
            row = cursor.fetchone()
        if row is None:
            return None
        run = _refreshed(known, row)
        if run is not None:
            return run
    qs = PipelineRun.objects.select_related("pipeline").order_by()
    if connection.features.has_select_for_update:
        qs = qs.select_for_update(of=("self",))
    found = list(qs.filter(pk=run_id))
    return found[0] if found else None


def _refreshed(known: PipelineRun, row: tuple | None) -> PipelineRun | None:
    """`known` updated from a row of `_REFRESH_RUN_SQL`; None when the row is missing or
    the run was started by someone else since it was loaded (then it is loaded whole)."""
    if row is None:
        return None
    status, slot, run_slot, not_started, version, concurrency = row
    if not not_started and known.started_at is None:
        return None
    known.status, known.waiting_for_slot, known.waiting_for_run_slot = status, bool(slot), bool(run_slot)
    known.started_at = None if not_started else known.started_at
    known.pipeline.version = version
    known.pipeline.concurrency_config = _CONCURRENCY.from_db_value(concurrency, None, connection)
    return known


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
            f"starting waiting run {run_id}", lambda run_id=run_id: advance(run_id),
            lambda why, run_id=run_id: run_fail(run_id, why),
        )
        queued.extend(got or [])
        if got is not None and PipelineRun.objects.filter(pk=run_id, status=PipelineRunStatus.INITIAL).exists():
            break
    return queued


def _classify(definition: PipelineDefinition, status: dict[str, str]) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Update `status` in place for blocks that cannot run, and return (ready,
    skipped by a condition, [(upstream-failed block, the upstream that failed)])."""
    ready: list[str] = []
    skipped: list[str] = []
    broken: list[tuple[str, str]] = []
    # Block runs of blocks deleted since the run began come last, with no upstreams:
    # they run and fail with "no longer exists" rather than wait forever.
    order = [u for u in definition.order if u in status]
    order += [u for u in status if u not in definition.graph]
    for uuid in order:
        if status[uuid] != S.INITIAL:
            continue
        ups = [u for u in definition.graph.get(uuid, ()) if u in status]
        bad = next((u for u in ups if status[u] in _FAILED_UPSTREAM), None)
        if bad is not None:
            status[uuid] = S.UPSTREAM_FAILED
            broken.append((uuid, bad))
        elif any(status[u] == S.CONDITION_FAILED for u in ups):
            status[uuid] = S.CONDITION_FAILED
            skipped.append(uuid)
        elif all(status[u] == S.COMPLETED for u in ups):
            ready.append(uuid)
    return ready, skipped, broken


def _block_limit(pipeline: Pipeline) -> int | None:
    """How many block runs of one run may be active at once: a run in one process runs
    its blocks one after another, in one process."""
    return 1 if pipeline.run_pipeline_in_one_process else pipeline.block_run_limit


def _room_in_run(limit: int | None, status: dict[str, str]) -> int:
    if not limit:
        return len(status)
    return limit - sum(1 for s in status.values() if s in BLOCK_ACTIVE)


def _take_global_slots(wanted: int) -> tuple[int, bool]:
    """How many of `wanted` blocks may be queued under the global limit, and whether some
    ready blocks are left waiting for a slot. On PostgreSQL an advisory lock, held to the
    end of the transaction, makes the count and the queueing one step across runs; SQLite
    already runs one write transaction at a time."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_SLOTS_LOCK_KEY])
    active = BlockRun.objects.filter(status__in=list(BLOCK_ACTIVE)).count()
    free = max(0, settings.MILLRACE_CONCURRENCY - active)
    granted = min(wanted, free)
    return granted, granted < wanted


def _set_run_status(run: PipelineRun, status: dict[str, str], waiting: bool, now: datetime) -> None:
    changes: dict[str, Any] = {}
    if all(s in BLOCK_TERMINAL for s in status.values()):
        values = set(status.values())
        # Blocks below a cancelled block are upstream_failed too; with no failure in the
        # run, it was cancelled.
        if S.FAILED in values:
            final = PipelineRunStatus.FAILED
        elif S.CANCELLED in values:
            final = PipelineRunStatus.CANCELLED
        elif S.UPSTREAM_FAILED in values:
            final = PipelineRunStatus.FAILED
        else:
            final = PipelineRunStatus.COMPLETED
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

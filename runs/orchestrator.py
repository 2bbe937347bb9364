"""The run state machine: the one place where run and block-run statuses change.

1. Create: `run_create` makes a run with one block run per executable block (`initial`).
2. Advance: `advance` moves a run forward (see its docstring).
3. Execute: `block_run_execute` claims a queued block run, runs its code in a child
   process, and `_finish` records the result and advances the run in the same
   transaction, so no polling gap separates one block from the next.
4. Reconcile: `reconcile` repairs what a dead worker left behind.

Every transition is a compare-and-swap (`filter(status=...).update(...)`) so that two
workers, or a worker and a cancel, can never both win.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid as uuidlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from pipelines import dag
from pipelines.execution import BlockSpec, ExecutionResult, LogLine, UpstreamInput, run_block
from pipelines.models import Pipeline
from pipelines.selectors import BlockDefinition, PipelineDefinition, pipeline_definition
from runs.models import (
    BLOCK_ACTIVE,
    BLOCK_TERMINAL,
    RUN_TERMINAL,
    BlockRun,
    BlockRunStatus,
    LogEntry,
    PipelineRun,
    PipelineRunStatus,
    RunAction,
    RunType,
)

log = logging.getLogger(__name__)

S = BlockRunStatus
_FAILED_UPSTREAM = frozenset({S.FAILED, S.UPSTREAM_FAILED, S.CANCELLED})
# Postgres advisory lock key guarding the global concurrency count ("millrace").
_SLOTS_LOCK_KEY = 0x6D696C6C


# --- 1. create -----------------------------------------------------------------------------

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
            room = min(_room_in_run(run.pipeline.block_run_limit, status), len(ready))
            if free is None:
                free, _ = _take_global_slots(settings.MILLRACE_CONCURRENCY)
            take = min(room, free)
            free -= take
            queued += [blocks[u][0] for u in ready[:take]]
            (waiting if take < len(ready) else started).append(run.pk)
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


# --- 2. advance ----------------------------------------------------------------------------

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
    list. `known` is the run (with its pipeline) as the caller last loaded it: only what
    can change is read again, or nothing when the caller has read it already (`read`,
    in this transaction, with the run's row locked).
    """
    now = timezone.now()
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
            room = _room_in_run(run.pipeline.block_run_limit, status)
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
    for run_id in waiting.order_by("created_at", "id").values_list("id", flat=True)[:50]:
        queued.extend(advance(run_id))
        if PipelineRun.objects.filter(pk=run_id, status=PipelineRunStatus.INITIAL).exists():
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


# --- 3. execute ----------------------------------------------------------------------------

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


def worker_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def block_run_execute(block_run_id: int, *, inline: bool = False) -> list[int]:
    """Claim a queued block run, run it in a child process, record the result, and advance
    its run. Returns the block runs that the advance queued (not yet dispatched). A block
    run that is not `queued` any more (run twice by a redelivered task, or cancelled) is
    left alone.

    With `inline`, when finishing a block makes exactly one block ready, that block is
    claimed in the same transaction and run here next: a chain then moves at the speed
    of its blocks, with no broker round trip and one commit per block."""
    claim = uuidlib.uuid4().hex
    if not _claim(block_run_id, claim, timezone.now()):
        return []
    block_run = BlockRun.objects.select_related("pipeline_run__pipeline").get(pk=block_run_id)
    run = block_run.pipeline_run
    definition = pipeline_definition(run.pipeline_id, run.pipeline.version)
    upstream_outputs = None
    while True:
        result, logs = _execute(block_run, claim, definition, upstream_outputs)
        queued, claimed = _finish(block_run, claim, result, logs=logs, claim_next=inline)
        if claimed is None:
            return queued
        block_run, upstream_outputs = _claimed_block_run(claimed, block_run, result.outputs)
        claim, definition = claimed.claim, claimed.definition


# --- hot-path SQL ---------------------------------------------------------------------------
# The statements every block of every run goes through are written out by hand: for these
# one-row statements the ORM spends several times longer building the SQL than the
# database spends running it (measured: 0.2-0.35 ms against 0.04 ms), and a chain of
# blocks is a loop over them. Values go through the fields' own adapters, so both
# databases get what the ORM would send.

_BR = BlockRun._meta.db_table


def _db_time(value: datetime) -> Any:
    return connection.ops.adapt_datetimefield_value(value)


def _db_json(field: str, value: Any) -> Any:
    return BlockRun._meta.get_field(field).get_db_prep_save(value, connection)


_CONCURRENCY = Pipeline._meta.get_field("concurrency_config")
_REFRESH_RUN_SQL = (
    f"SELECT r.status, r.waiting_for_slot, r.waiting_for_run_slot, r.started_at IS NULL, "
    f"p.version, p.concurrency_config "
    f"FROM {PipelineRun._meta.db_table} r JOIN {Pipeline._meta.db_table} p ON p.id = r.pipeline_id WHERE r.id = %s"
)


def _refresh_run_sql() -> str:
    # Locks the run's row only, as `select_for_update(of=("self",))` does; SQLite has
    # one writer at a time anyway.
    return _REFRESH_RUN_SQL + (" FOR UPDATE OF r" if connection.features.has_select_for_update else "")


_STATUSES_SQL = (
    f"SELECT id, block_uuid, status, attempt, (next_retry_at IS NOT NULL AND next_retry_at > %s) "
    f"FROM {_BR} WHERE pipeline_run_id = %s AND dynamic_parent_id IS NULL"
)


def _block_statuses(run_id: int, now: datetime) -> list[tuple[int, str, str, int, bool]]:
    """(id, block_uuid, status, attempt, waiting for a retry) of a run's block runs (not
    dynamic children)."""
    with connection.cursor() as cursor:
        cursor.execute(_STATUSES_SQL, [_db_time(now), run_id])
        return _status_rows(cursor.fetchall())


def _status_rows(rows: list[tuple]) -> list[tuple[int, str, str, int, bool]]:
    return [(pk, uuid, st, attempt, bool(waits)) for pk, uuid, st, attempt, waits in rows]


def _claim(block_run_id: int, claim: str, now: datetime, *, from_status: str = S.QUEUED) -> bool:
    """Compare-and-swap a block run to `running` under a new claim token (fencing)."""
    ts = _db_time(now)
    queued_at = ", queued_at = %s" if from_status == S.INITIAL else ""
    params: list[Any] = [S.RUNNING, claim, ts, ts, worker_label(), ts] + ([ts] if queued_at else []) + [block_run_id, from_status]
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {_BR} SET status = %s, claim = %s, attempt = attempt + 1, started_at = %s, heartbeat_at = %s, "
            f"completed_at = NULL, next_retry_at = NULL, worker = %s, error = '', traceback = '', updated_at = %s{queued_at} "
            "WHERE id = %s AND status = %s",
            params,
        )
        return cursor.rowcount == 1


_RECORD_SQL = (
    f"UPDATE {_BR} SET status = %s, completed_at = %s, outputs = %s, error = %s, traceback = %s, "
    "metrics = %s, code_hash = %s, updated_at = %s WHERE id = %s AND claim = %s AND status = %s"
)


def _record_params(block_run_id: int, claim: str, status: str, result: ExecutionResult, code_hash: str, now: datetime) -> list[Any]:
    ts = _db_time(now)
    return [
        status, ts, _db_json("outputs", result.outputs), result.error[:10000], result.traceback,
        _db_json("metrics", result.metrics), code_hash, ts, block_run_id, claim, S.RUNNING,
    ]


def _record_result(block_run_id: int, claim: str, status: str, result: ExecutionResult, code_hash: str, now: datetime) -> bool:
    """Write an attempt's result, if the attempt still holds its claim (fencing)."""
    with connection.cursor() as cursor:
        cursor.execute(_RECORD_SQL, _record_params(block_run_id, claim, status, result, code_hash, now))
        return cursor.rowcount == 1


@dataclass
class _RunRead:
    """What `_advance` reads first, read ahead by `_record_result_and_read`."""

    run_row: tuple | None
    block_rows: list[tuple[int, str, str, int, bool]]


def _record_result_and_read(
    block_run_id: int, claim: str, status: str, result: ExecutionResult, code_hash: str, now: datetime, run_id: int,
) -> tuple[bool, _RunRead]:
    """`_record_result`, then lock the run and read what `_advance` needs, all in one
    round trip to PostgreSQL (three statements in one query): each round trip costs
    the chain a wake-up of the database server and of this process. If the result was
    not recorded (the claim was lost), the caller ends the transaction and the lock
    goes with it."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"{_RECORD_SQL}; {_refresh_run_sql()}; {_STATUSES_SQL}",
            [*_record_params(block_run_id, claim, status, result, code_hash, now), run_id, _db_time(now), run_id],
        )
        won = cursor.rowcount == 1
        cursor.nextset()
        run_row = cursor.fetchone()
        cursor.nextset()
        return won, _RunRead(run_row, _status_rows(cursor.fetchall()))


def _claimed_block_run(claimed: _Claimed, finished: BlockRun, outputs: list[dict]) -> tuple[BlockRun, dict[str, list[dict]]]:
    """The block run `_advance` claimed, with its upstreams' outputs. In a chain the only
    upstream is the block that just finished, whose outputs are in hand: no query."""
    block = claimed.definition.blocks.get(claimed.block_uuid)
    upstreams = list(block.upstreams) if block else []
    block_run = BlockRun(
        pk=claimed.block_run_id, pipeline_run=claimed.run, block_uuid=claimed.block_uuid,
        block_type=block.type if block else "", attempt=claimed.attempt, claim=claimed.claim, status=S.RUNNING,
    )
    known = {finished.block_uuid: outputs}
    missing = [u for u in upstreams if u not in known]
    if missing:
        known.update(BlockRun.objects.filter(
            pipeline_run_id=claimed.run.pk, block_uuid__in=missing, dynamic_parent__isnull=True,
        ).values_list("block_uuid", "outputs"))
    return block_run, {u: known.get(u) or [] for u in upstreams}


def _execute(
    block_run: BlockRun, claim: str, definition: PipelineDefinition, upstream_outputs: dict[str, list[dict]] | None,
) -> tuple[ExecutionResult, _LogWriter]:
    """Run a claimed block run's code. Returns the result and the log lines not written
    yet (`_finish` writes them with the result, if the attempt still holds its claim)."""
    logs = _LogWriter(block_run, claim)
    block = definition.blocks.get(block_run.block_uuid)
    if block is None:
        error = f"Block {block_run.block_uuid} no longer exists in pipeline {block_run.pipeline_run.pipeline.uuid}"
        return ExecutionResult(status=S.FAILED, error=error), logs
    logs.code_hash = block.content_hash
    spec = _spec(block_run, block, upstream_outputs)
    result = run_block(spec, on_log=logs.add, on_tick=logs.heartbeat, tick=settings.MILLRACE_HEARTBEAT_INTERVAL)
    return result, logs


def _spec(block_run: BlockRun, block: BlockDefinition, outputs: dict[str, list[dict]] | None = None) -> BlockSpec:
    run = block_run.pipeline_run
    if outputs is None and block.upstreams:
        outputs = dict(
            BlockRun.objects.filter(pipeline_run=run, block_uuid__in=block.upstreams, dynamic_parent__isnull=True).values_list("block_uuid", "outputs")
        )
    execution_date = run.execution_date or run.created_at
    kwargs = {
        **(run.variables or {}),
        "execution_date": execution_date,
        "ds": execution_date.strftime("%Y-%m-%d"),
        "hr": execution_date.strftime("%H"),
        "event": run.event or {},
        "pipeline_uuid": run.pipeline.uuid,
        "block_uuid": block.uuid,
        "pipeline_run_id": run.pk,
        "retry": {"attempts": block_run.attempt},
    }
    outputs = outputs or {}
    return BlockSpec(
        pipeline_uuid=run.pipeline.uuid,
        block_uuid=block.uuid,
        block_type=block.type,
        language=block.language,
        content=block.content,
        configuration=block.configuration or {},
        inputs=[UpstreamInput(u, outputs.get(u) or []) for u in block.upstreams],
        kwargs=kwargs,
        output_prefix=f"pipeline_runs/{run.pk}/{block.uuid}/{block_run.claim}",
        timeout=block.timeout,
    )


class _LogWriter:
    """Collects a running attempt's log lines and writes them in batches, each batch in
    one transaction with a heartbeat that succeeds only while the attempt holds its
    claim: once a block run is cancelled or taken over, its old attempt writes nothing
    more, not even a log line."""

    BATCH = 500
    EVERY = 0.5  # seconds

    def __init__(self, block_run: BlockRun, claim: str):
        self.block_run = block_run
        self.claim = claim
        self.code_hash = ""
        self.lines: list[LogLine] = []
        self.last = time.monotonic()
        self.fenced = False

    def add(self, lines: list[LogLine]) -> None:
        self.lines.extend(lines)
        if len(self.lines) >= self.BATCH or time.monotonic() - self.last >= self.EVERY:
            self.heartbeat()

    def heartbeat(self) -> bool:
        """Record a heartbeat and write the waiting lines; False once the claim is lost
        (the caller then kills the block)."""
        self.last = time.monotonic()
        if self.fenced:
            return False
        with transaction.atomic():
            alive = BlockRun.objects.filter(pk=self.block_run.pk, claim=self.claim, status=S.RUNNING).update(
                heartbeat_at=timezone.now()
            )
            if alive:
                self.write()
        if not alive:
            self.fenced, self.lines = True, []
        return bool(alive)

    def write(self) -> None:
        """Write the waiting lines; the caller has checked the claim in this transaction."""
        if not self.lines:
            return
        br = self.block_run
        rows = [
            _log_row(br.pipeline_run_id, br.pk, datetime.fromtimestamp(line.timestamp, tz=UTC), line.level, line.message, br.block_uuid, br.block_type, br.attempt)
            for line in self.lines
        ]
        self.lines = []
        LogEntry.objects.bulk_create(rows, batch_size=self.BATCH)


def _log_row(
    run_id: int, block_run_id: int | None, ts: datetime, level: str, message: str,
    block_uuid: str = "", block_type: str = "", attempt: int = 0,
) -> LogEntry:
    return LogEntry(
        pipeline_run_id=run_id, block_run_id=block_run_id, timestamp=ts, level=level[:10],
        message=message, block_uuid=block_uuid, block_type=block_type, attempt=attempt,
    )


def _finish(
    block_run: BlockRun, claim: str, result: ExecutionResult, *, logs: _LogWriter | None = None, claim_next: bool = False,
) -> tuple[list[int], _Claimed | None]:
    """Record the result (and the hash of the code that ran) if this attempt still holds
    the claim, then advance the run in the same transaction. A failed attempt with
    retries left goes back to `initial` with the time of its next attempt instead.
    Returns the block runs the advance queued and, with `claim_next` and exactly one
    block ready, that one already claimed for the caller to run."""
    now = timezone.now()
    status = result.status if result.status in BLOCK_TERMINAL else S.FAILED
    retry_at = _retry_at(block_run, now) if status == S.FAILED else None
    # The run as the caller holds it (with its pipeline), if it does: then only what can
    # have changed is read again.
    known = block_run.pipeline_run if BlockRun.pipeline_run.is_cached(block_run) else None
    if known is not None and not PipelineRun.pipeline.is_cached(known):
        known = None
    read = None
    with transaction.atomic():
        code_hash = logs.code_hash if logs else ""
        if retry_at is not None:
            won = _record_retry(block_run, claim, result, retry_at, now)
        elif known is not None and connection.vendor == "postgresql":
            won, read = _record_result_and_read(block_run.pk, claim, status, result, code_hash, now, block_run.pipeline_run_id)
        else:
            won = _record_result(block_run.pk, claim, status, result, code_hash, now)
        if not won:
            return [], None
        if logs is not None:
            logs.write()
        if status == S.FAILED:
            then = f"; attempt {block_run.attempt + 1} at {retry_at:%H:%M:%S} UTC" if retry_at else ""
            LogEntry.objects.create(
                pipeline_run_id=block_run.pipeline_run_id, block_run_id=block_run.pk, timestamp=now, level="ERROR",
                message=f"Block {block_run.block_uuid} failed (attempt {block_run.attempt}){then}: {result.error}"
                + (f"\n{result.traceback}" if result.traceback else ""),
                block_uuid=block_run.block_uuid, block_type=block_run.block_type, attempt=block_run.attempt,
            )
        return _advance(
            block_run.pipeline_run_id, freed=1, claim=uuidlib.uuid4().hex if claim_next and not retry_at else "",
            known=known, read=read,
        )


# --- automatic retries ---------------------------------------------------------------------

def retry_policy(block_config: dict | None, pipeline_config: dict | None) -> tuple[int, float, bool, float | None]:
    """(retries, delay, exponential_backoff, max_delay) for a block: its own
    `retry_config` when it has one, else its pipeline's (unlike Mage, which ignores the
    pipeline's). No config: no retry."""
    config = block_config or pipeline_config or {}
    retries = max(0, int(config.get("retries") or 0))
    delay = max(0.0, float(config.get("delay") if config.get("delay") is not None else 5))
    max_delay = config.get("max_delay")
    return retries, delay, bool(config.get("exponential_backoff")), float(max_delay) if max_delay is not None else None


def retry_delay(attempt: int, delay: float, exponential: bool, max_delay: float | None) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based)."""
    wait = delay * (2 ** (attempt - 1)) if exponential else delay
    return min(wait, max_delay) if max_delay is not None else wait


def _retry_at(block_run: BlockRun, now: datetime) -> datetime | None:
    """When the next attempt of a failed block run is due, or None when it has used its
    retries (`retries: 0` means exactly one attempt, a timeout included)."""
    run = block_run.pipeline_run
    block = pipeline_definition(run.pipeline_id, run.pipeline.version).blocks.get(block_run.block_uuid)
    if block is None:
        return None
    retries, delay, exponential, max_delay = retry_policy(block.retry_config, run.pipeline.retry_config)
    attempt = max(block_run.attempt - block_run.attempt_base, 1)
    if attempt > retries:
        return None
    return now + timedelta(seconds=retry_delay(attempt, delay, exponential, max_delay))


def _record_retry(block_run: BlockRun, claim: str, result: ExecutionResult, retry_at: datetime, now: datetime) -> bool:
    """Put a failed attempt aside (in `attempts`) and send the block run back to
    `initial` until `retry_at`, if the attempt still holds its claim."""
    current = BlockRun.objects.filter(pk=block_run.pk, claim=claim, status=S.RUNNING).values(
        "attempt", "attempts", "started_at", "worker"
    ).first()
    if current is None:
        return False
    history = list(current["attempts"] or []) + [{
        "attempt": current["attempt"], "status": S.FAILED, "error": result.error[:10000], "traceback": result.traceback,
        "started_at": current["started_at"].isoformat() if current["started_at"] else None,
        "completed_at": now.isoformat(), "worker": current["worker"],
    }]
    return bool(BlockRun.objects.filter(pk=block_run.pk, claim=claim, status=S.RUNNING).update(
        status=S.INITIAL, claim="", next_retry_at=retry_at, attempts=history, error=result.error[:10000],
        traceback=result.traceback, metrics=result.metrics, completed_at=None, updated_at=now,
    ))


def retries_due(now: datetime | None = None) -> list[int]:
    """Advance the runs whose block runs wait for a retry that is due now (the
    scheduler's pass calls it; a run executed by `run_pipeline --sync` polls by itself).
    Returns what was queued."""
    now = now or timezone.now()
    run_ids = set(BlockRun.objects.filter(
        status=S.INITIAL, next_retry_at__isnull=False, next_retry_at__lte=now,
    ).values_list("pipeline_run_id", flat=True))
    queued: list[int] = []
    for run_id in sorted(run_ids):
        queued += advance(run_id)
    return queued


def wake_waiting_runs(limit: int = 20) -> list[int]:
    """Advance runs whose ready blocks were waiting for a global slot; called when a
    block finishes and frees one. Returns what they queued."""
    queued: list[int] = []
    waiting = PipelineRun.objects.filter(waiting_for_slot=True).order_by("created_at").values_list("id", flat=True)[:limit]
    for run_id in waiting:
        got = advance(run_id)
        queued.extend(got)
        if not got:
            break
    return queued


# --- stopping a run -----------------------------------------------------------------------

def run_stop(run_id: int, *, status: str = PipelineRunStatus.CANCELLED, reason: str = "") -> bool:
    """End a run now with `status` (`cancelled` or `failed`): its block runs that have
    not finished become `cancelled` (a running one becomes `failed` when the run fails).
    A worker running one of them sees its claim gone at its next heartbeat, kills the
    block's process group and writes nothing more. Returns False when the run had
    already finished."""
    now = timezone.now()
    with transaction.atomic():
        run = _lock_run(run_id)
        if run is None or run.status in RUN_TERMINAL:
            return False
        open_runs = BlockRun.objects.filter(pipeline_run_id=run_id, status__in=[S.INITIAL, S.QUEUED, S.RUNNING])
        if status == PipelineRunStatus.FAILED:
            open_runs.filter(status=S.RUNNING).update(status=S.FAILED, error=reason[:10000], completed_at=now, updated_at=now)
        open_runs.update(status=S.CANCELLED, completed_at=now, updated_at=now)
        changes: dict[str, Any] = {
            "status": status, "completed_at": now, "started_at": run.started_at or now,
            "waiting_for_slot": False, "waiting_for_run_slot": False, "updated_at": now,
        }
        if run.sla and now > run.created_at + timedelta(seconds=run.sla):
            changes["passed_sla"] = True
        PipelineRun.objects.filter(pk=run_id).update(**changes)
        LogEntry.objects.create(
            pipeline_run_id=run_id, timestamp=now, level="ERROR" if status == PipelineRunStatus.FAILED else "WARNING",
            message=f"Run {status}" + (f": {reason}" if reason else ""),
        )
        queued = start_waiting_runs(run.pipeline_id) if run.pipeline.pipeline_run_limit else []
        queued += wake_waiting_runs()
        dispatch(queued)
    return True


def enforce_deadlines(now: datetime | None = None) -> dict[str, int]:
    """The scheduler's timeout and SLA pass: a running run past its `timeout` ends with
    its `timeout_status`; a run still unfinished past its `sla` (counted from its
    creation) is marked `passed_sla` and logged once."""
    now = now or timezone.now()
    done = {"timed_out": 0, "passed_sla": 0}
    timed = PipelineRun.objects.filter(status=PipelineRunStatus.RUNNING, timeout__isnull=False)
    for run_id, started_at, timeout, timeout_status in timed.values_list("id", "started_at", "timeout", "timeout_status"):
        if started_at and now >= started_at + timedelta(seconds=timeout):
            if run_stop(run_id, status=timeout_status or PipelineRunStatus.FAILED, reason=f"timed out after {timeout} s"):
                done["timed_out"] += 1
    late = PipelineRun.objects.filter(
        status__in=[PipelineRunStatus.INITIAL, PipelineRunStatus.RUNNING], sla__isnull=False, passed_sla=False,
    )
    for run_id, created_at, sla in late.values_list("id", "created_at", "sla"):
        if now > created_at + timedelta(seconds=sla):
            if PipelineRun.objects.filter(pk=run_id, passed_sla=False).update(passed_sla=True, updated_at=now):
                LogEntry.objects.create(
                    pipeline_run_id=run_id, timestamp=now, level="WARNING",
                    message=f"SLA missed: the run was not finished {sla} s after it was created",
                )
                done["passed_sla"] += 1
    return done


# --- operations: retry and cancel, each recorded in the run's audit trail -------------------

class ActionRefused(Exception):
    """The operation makes no sense for the run or block run as it is; says why."""


RETRY_MODES = {"all": RunAction.Kind.RETRY, "incomplete": RunAction.Kind.RETRY_INCOMPLETE, "from_block": RunAction.Kind.RETRY_FROM_BLOCK}


def run_retry(run_id: int, *, mode: str = "all", block_uuid: str | None = None, user: Any = None) -> list[str]:
    """Run a finished run again, with the blocks' current code, and return the uuids of
    the block runs that will run again.

    1. Refuse a run that has not finished (cancel it first).
    2. Choose the block runs: `all` (from scratch), `incomplete` (every one not
       completed), `from_block` (that block and everything downstream of it, whatever
       their status). Completed block runs left out keep their outputs, which the
       retried blocks read.
    3. Put each chosen one back to `initial`, its last attempt kept in `attempts`, its
       attempt counter kept, and a fresh budget of automatic retries.
    4. Put the run back to `initial` (its timeout clock starts again when it starts),
       record who did what, and advance it once the transaction commits.
    """
    if mode not in RETRY_MODES:
        raise ActionRefused(f"Unknown retry mode {mode!r}; use one of {', '.join(RETRY_MODES)}")
    now = timezone.now()
    with transaction.atomic():
        run = _lock_run(run_id)
        if run is None:
            raise ActionRefused(f"Run {run_id} does not exist")
        if run.status not in RUN_TERMINAL:
            raise ActionRefused(f"Run {run_id} is {run.status}: only a finished run can be retried (cancel it first)")
        targets = _retry_targets(run, mode, block_uuid)
        rows = [_reset_block_run(row, now) for row in BlockRun.objects.filter(pipeline_run_id=run_id, block_uuid__in=targets)]
        BlockRun.objects.bulk_update(rows, _RESET_FIELDS)
        PipelineRun.objects.filter(pk=run_id).update(
            status=PipelineRunStatus.INITIAL, started_at=None, completed_at=None,
            waiting_for_slot=False, waiting_for_run_slot=False, updated_at=now,
        )
        detail = {"block_runs": targets, "previous_status": run.status, **({"block_uuid": block_uuid} if block_uuid else {})}
        _audit(run_id, RETRY_MODES[mode], user, detail)
        LogEntry.objects.create(
            pipeline_run_id=run_id, timestamp=now, level="INFO",
            message=f"Run retried ({mode.replace('_', ' ')}) by {_who(user)}: {', '.join(targets)}",
        )
        dispatch(advance(run_id))
    return targets


def _retry_targets(run: PipelineRun, mode: str, block_uuid: str | None) -> list[str]:
    rows = dict(BlockRun.objects.filter(pipeline_run=run, dynamic_parent__isnull=True).values_list("block_uuid", "status"))
    if mode == "all":
        targets = list(rows)
    elif mode == "incomplete":
        targets = [u for u, st in rows.items() if st != S.COMPLETED]
    else:
        if not block_uuid or block_uuid not in rows:
            raise ActionRefused(f"Run {run.pk} has no block {block_uuid!r} to retry from")
        definition = pipeline_definition(run.pipeline_id, run.pipeline.version)
        below = dag.descendants(definition.graph, block_uuid) if block_uuid in definition.graph else set()
        targets = [u for u in rows if u == block_uuid or u in below]
    if not targets:
        raise ActionRefused(f"Run {run.pk} has nothing to retry: every block run completed")
    return targets


_RESET_FIELDS = (
    "status", "claim", "next_retry_at", "attempts", "attempt_base", "error", "traceback", "outputs",
    "queued_at", "started_at", "completed_at", "heartbeat_at", "updated_at",
)


def _reset_block_run(row: BlockRun, now: datetime) -> BlockRun:
    """`row` back to `initial` (in memory; the caller writes all of them at once), its
    last attempt moved to `attempts`."""
    if row.attempt and row.started_at:
        row.attempts = list(row.attempts or []) + [{
            "attempt": row.attempt, "status": row.status, "error": row.error, "traceback": row.traceback,
            "started_at": row.started_at.isoformat(), "completed_at": row.completed_at.isoformat() if row.completed_at else None,
            "worker": row.worker,
        }]
    row.status, row.claim, row.next_retry_at, row.attempt_base = S.INITIAL, "", None, row.attempt
    row.error, row.traceback, row.outputs = "", "", []
    row.queued_at = row.started_at = row.completed_at = row.heartbeat_at = None
    row.updated_at = now
    return row


def run_cancel(run_id: int, *, user: Any = None) -> None:
    """Cancel a run: every unfinished block run becomes `cancelled`, and the workers
    kill the process tree of each running one at their next heartbeat (within
    MILLRACE_HEARTBEAT_INTERVAL). A finished run is refused, so cancelling twice changes
    nothing."""
    with transaction.atomic():
        status = PipelineRun.objects.filter(pk=run_id).values_list("status", flat=True).first()
        if status is None:
            raise ActionRefused(f"Run {run_id} does not exist")
        if not run_stop(run_id, status=PipelineRunStatus.CANCELLED, reason=f"cancelled by {_who(user)}"):
            raise ActionRefused(f"Run {run_id} is {status}: it has already finished")
        _audit(run_id, RunAction.Kind.CANCEL, user, {"previous_status": status})


def block_run_cancel(block_run_id: int, *, user: Any = None) -> None:
    """Cancel one block run that has not finished; its downstream blocks will not run
    (upstream_failed) and the rest of the run goes on."""
    now = timezone.now()
    with transaction.atomic():
        row = BlockRun.objects.filter(pk=block_run_id).values_list("pipeline_run_id", "block_uuid", "status").first()
        if row is None:
            raise ActionRefused(f"Block run {block_run_id} does not exist")
        run_id, uuid, status = row
        if not BlockRun.objects.filter(pk=block_run_id, status__in=[S.INITIAL, S.QUEUED, S.RUNNING]).update(
            status=S.CANCELLED, claim="", next_retry_at=None, completed_at=now, updated_at=now,
        ):
            raise ActionRefused(f"Block run {uuid} of run {run_id} is {status}: it has already finished")
        _audit(run_id, RunAction.Kind.CANCEL_BLOCK, user, {"block_uuid": uuid, "previous_status": status})
        LogEntry.objects.create(
            pipeline_run_id=run_id, block_run_id=block_run_id, timestamp=now, level="WARNING",
            message=f"Block {uuid} cancelled by {_who(user)}", block_uuid=uuid,
        )
        dispatch(advance(run_id) + wake_waiting_runs())


def _audit(run_id: int, action: str, user: Any, detail: dict) -> None:
    RunAction.objects.create(pipeline_run_id=run_id, action=action, user=user if getattr(user, "pk", None) else None, detail=detail)


def _who(user: Any) -> str:
    return getattr(user, "username", "") or "the system"


# --- 4. reconcile --------------------------------------------------------------------------

def reconcile(now: datetime | None = None) -> dict[str, int]:
    """Repair what dead workers left: a running block run whose heartbeat (or, before the
    first one, start) is older than the limit is failed, or retried when it has retries
    left, which also frees its concurrency slot; a queued one whose task went missing is
    sent again; retries that are due are queued; a run with nothing active is advanced.
    Returns counts of what it did."""
    now = now or timezone.now()
    limit = timedelta(seconds=settings.MILLRACE_HEARTBEAT_LIMIT)
    done = {"failed": 0, "requeued": 0, "retried": 0, "advanced": 0}
    stale = Q(heartbeat_at__lt=now - limit) | Q(heartbeat_at__isnull=True, started_at__lt=now - limit)
    for br in BlockRun.objects.filter(stale, status=S.RUNNING).select_related("pipeline_run__pipeline"):
        seen = br.heartbeat_at or br.started_at
        error = f"The worker running this block stopped heartbeating (last sign of life {seen:%Y-%m-%d %H:%M:%S} UTC); it is presumed dead"
        dispatch(_finish(br, br.claim, ExecutionResult(status=S.FAILED, error=error))[0])
        done["failed"] += 1
    if done["failed"]:
        # The dead attempts' global slots are free: runs waiting for one go on now.
        dispatch(wake_waiting_runs())
    retried = retries_due(now)
    dispatch(retried)
    done["retried"] = len(retried)
    lost = list(BlockRun.objects.filter(status=S.QUEUED, queued_at__lt=now - limit).values_list("id", flat=True))
    if lost:
        BlockRun.objects.filter(id__in=lost, status=S.QUEUED).update(queued_at=now)
        dispatch(lost)
        done["requeued"] = len(lost)
    # Only runs untouched for a while: a run being created or advanced right now is not
    # stalled, and the tick stays cheap.
    idle = PipelineRun.objects.filter(
        status__in=[PipelineRunStatus.INITIAL, PipelineRunStatus.RUNNING], updated_at__lt=now - limit,
    ).exclude(block_runs__status__in=list(BLOCK_ACTIVE)).order_by("created_at").values_list("id", flat=True)
    for run_id in idle:
        dispatch(advance(run_id))
        done["advanced"] += 1
    return done

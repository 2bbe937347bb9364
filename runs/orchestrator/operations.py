"""Stopping a run (cancel, timeout, SLA), and the operations people run on runs:
retry and cancel, each recorded in the run's audit trail."""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import partial
from typing import Any

from django.db import transaction
from django.utils import timezone

from pipelines import dag
from pipelines.selectors import pipeline_definition
from runs.models import (
    RUN_TERMINAL,
    BlockRun,
    BlockRunStatus,
    LogEntry,
    PipelineRun,
    PipelineRunStatus,
    RunAction,
)
from runs.orchestrator.advance import advance, dispatch, lock_run, start_waiting_runs
from runs.orchestrator.isolate import isolated, run_fail
from runs.orchestrator.retries import wake_waiting_runs
from runs.orchestrator.sql import lock_run_row

S = BlockRunStatus


def run_stop(run_id: int, *, status: str = PipelineRunStatus.CANCELLED, reason: str = "") -> bool:
    """End a run now with `status` (`cancelled` or `failed`): its block runs that have
    not finished become `cancelled` (a running one becomes `failed` when the run fails).
    A worker running one of them sees its claim gone at its next heartbeat, kills the
    block's process group and writes nothing more. Returns False when the run had
    already finished."""
    now = timezone.now()
    with transaction.atomic():
        run = lock_run(run_id)
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
        if started_at and timeout is not None and now >= started_at + timedelta(seconds=timeout):
            reason = f"timed out after {timeout} s"
            stopped = isolated(
                f"deadlines: stopping run {run_id}",
                partial(run_stop, run_id, status=timeout_status or PipelineRunStatus.FAILED, reason=reason),
                partial(_timeout_failed, run_id, reason, now=now),
            )
            if stopped is not False:
                done["timed_out"] += 1
    late = PipelineRun.objects.filter(
        status__in=[PipelineRunStatus.INITIAL, PipelineRunStatus.RUNNING], sla__isnull=False, passed_sla=False,
    )
    for run_id, created_at, sla in late.values_list("id", "created_at", "sla"):
        if sla is not None and now > created_at + timedelta(seconds=sla):
            if isolated(f"deadlines: marking the SLA miss of run {run_id}", partial(_mark_sla_missed, run_id, sla, now)):
                done["passed_sla"] += 1
    return done


def _timeout_failed(run_id: int, reason: str, why: str, *, now: datetime) -> None:
    run_fail(run_id, f"{reason}; {why}", now=now)


def _mark_sla_missed(run_id: int, sla: int, now: datetime) -> bool:
    if not PipelineRun.objects.filter(pk=run_id, passed_sla=False).update(passed_sla=True, updated_at=now):
        return False
    LogEntry.objects.create(
        pipeline_run_id=run_id, timestamp=now, level="WARNING",
        message=f"SLA missed: the run was not finished {sla} s after it was created",
    )
    return True


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
        run = lock_run(run_id)
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
        # The run first, then its block run: the order a finishing block takes too.
        lock_run_row(run_id)
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

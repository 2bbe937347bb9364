"""Automatic retries of failed block runs, and runs waiting for a global slot."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from functools import partial
from typing import Any, NamedTuple

from django.db.models import F
from django.utils import timezone

from pipelines.execution import INTERRUPTED, ExecutionResult
from pipelines.selectors import pipeline_definition
from runs.models import (
    BlockRun,
    BlockRunStatus,
    PipelineRun,
)
from runs.orchestrator.advance import advance
from runs.orchestrator.isolate import isolated
from runs.orchestrator.salvage import run_advance_or_fail

S = BlockRunStatus

_LONGEST_WAIT = 365 * 24 * 3600.0


class RetryPolicy(NamedTuple):
    retries: int  # automatic retries after the first attempt
    delay: float  # seconds before the first retry
    exponential_backoff: bool  # the delay doubles with each retry
    max_delay: float | None  # the longest delay, if any


def retry_policy(block_config: dict | None, pipeline_config: dict | None) -> RetryPolicy:
    """The retry policy of a block: its own `retry_config` when it has one, else its
    pipeline's (unlike Mage, which ignores the pipeline's). No config: no retry."""
    config: dict[str, Any] = block_config or pipeline_config or {}
    retries = max(0, int(config.get("retries") or 0))
    given = config.get("delay")
    delay = max(0.0, float(given if given is not None else 5))
    max_delay = config.get("max_delay")
    return RetryPolicy(retries, delay, bool(config.get("exponential_backoff")), float(max_delay) if max_delay is not None else None)


def retry_delay(attempt: int, delay: float, exponential: bool, max_delay: float | None) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based)."""
    wait = delay * (2 ** (attempt - 1)) if exponential else delay
    return min(wait, max_delay) if max_delay is not None else wait


def next_attempt_at(block_run: BlockRun, now: datetime) -> tuple[datetime | None, str]:
    """When the next attempt of a failed block run is due, or None when it has used its
    retries (`retries: 0` means exactly one attempt, a timeout included); and, when its
    retry config cannot be read (stored before it was validated), why it is not retried,
    for the caller to log with the failure it records."""
    run = block_run.pipeline_run
    block = pipeline_definition(run.pipeline_id, run.pipeline.version).blocks.get(block_run.block_uuid)
    if block is None:
        return None, ""
    try:
        retries, delay, exponential, max_delay = retry_policy(block.retry_config, run.pipeline.retry_config)
        attempt = max(block_run.attempt - block_run.attempt_base, 1)
        if attempt > retries:
            return None, ""
        # Capped: a delay past what a datetime holds (exponential backoff over many
        # attempts) waits the longest a timedelta can.
        wait = min(retry_delay(attempt, delay, exponential, max_delay), _LONGEST_WAIT)
    except (TypeError, ValueError, AttributeError, OverflowError) as exc:
        return None, f"Block {block_run.block_uuid} is not retried: its retry_config cannot be read ({exc})"
    return now + timedelta(seconds=wait), ""


def _attempt_entry(current: Mapping[str, Any], ended_as: str, result: ExecutionResult, now: datetime) -> dict:
    """An attempt as `BlockRun.attempts` keeps it, from the row's current values."""
    return {
        "attempt": current["attempt"], "status": ended_as, "error": result.error[:10000], "traceback": result.traceback,
        "started_at": current["started_at"].isoformat() if current["started_at"] else None,
        "completed_at": now.isoformat(), "worker": current["worker"],
    }


def _put_aside(block_run: BlockRun, claim: str, ended_as: str, result: ExecutionResult, now: datetime, **changes: object) -> bool:
    """Move the attempt that holds `claim` into `attempts` (as `ended_as`) and apply
    `changes` to the block run, if the attempt still holds its claim (fencing)."""
    current = BlockRun.objects.filter(pk=block_run.pk, claim=claim, status=S.RUNNING).values(
        "attempt", "attempts", "started_at", "worker"
    ).first()
    if current is None:
        return False
    history = list(current["attempts"] or []) + [_attempt_entry(current, ended_as, result, now)]
    return bool(BlockRun.objects.filter(pk=block_run.pk, claim=claim, status=S.RUNNING).update(
        claim="", attempts=history, error=result.error[:10000], traceback=result.traceback,
        metrics=result.metrics, completed_at=None, updated_at=now, **changes,
    ))


def record_retry(block_run: BlockRun, claim: str, result: ExecutionResult, retry_at: datetime, now: datetime) -> bool:
    """Put a failed attempt aside (in `attempts`) and send the block run back to
    `initial` until `retry_at`, if the attempt still holds its claim."""
    return _put_aside(block_run, claim, S.FAILED, result, now, status=S.INITIAL, next_retry_at=retry_at)


def record_interrupted(block_run: BlockRun, claim: str, result: ExecutionResult, now: datetime) -> bool:
    """Put an attempt that its worker's shutdown interrupted aside and queue the block
    run again at once, without charging the attempt against its retries (the count of
    automatic retries starts after `attempt_base`)."""
    return _put_aside(
        block_run, claim, INTERRUPTED, result, now,
        status=S.QUEUED, queued_at=now, next_retry_at=None, attempt_base=F("attempt_base") + 1,
    )


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
        queued += isolated(
            f"queueing the due retries of run {run_id}", partial(advance, run_id), partial(_retry_failed, run_id, now=now),
        ) or []
    return queued


def _retry_failed(run_id: int, reason: str, *, now: datetime) -> None:
    """A run whose due retry cannot be queued: the block runs that wait for a retry
    fail with the reason, and the run goes on (or fails)."""
    BlockRun.objects.filter(pipeline_run_id=run_id, status=S.INITIAL, next_retry_at__isnull=False).update(
        status=S.FAILED, next_retry_at=None, error=f"The retry could not be queued: {reason}"[:10000],
        completed_at=now, updated_at=now,
    )
    run_advance_or_fail(run_id, reason, now=now)


def wake_waiting_runs(limit: int = 20) -> list[int]:
    """Advance runs whose ready blocks were waiting for a global slot; called when a
    block finishes and frees one. Returns what they queued."""
    queued: list[int] = []
    waiting = PipelineRun.objects.filter(waiting_for_slot=True).order_by("created_at").values_list("id", flat=True)[:limit]
    for run_id in list(waiting):
        got = isolated(
            f"waking run {run_id}", partial(advance, run_id), partial(run_advance_or_fail, run_id),
        )
        if got is None:
            continue  # that run could not be advanced; the slot may still be free
        queued.extend(got)
        if not got:
            break
    return queued

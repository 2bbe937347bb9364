"""Executing a block run: claim it, run its code in a child process, record the
result and advance its run in one transaction."""

from __future__ import annotations

import logging
import uuid as uuidlib
from collections.abc import Callable
from datetime import datetime

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from pipelines.execution import (
    INTERRUPTED,
    BlockSpec,
    ExecutionResult,
    Session,
    UpstreamInput,
    run_block,
)
from pipelines.selectors import BlockDefinition, PipelineDefinition, pipeline_definition
from runs import stopping
from runs.models import (
    BLOCK_TERMINAL,
    BlockRun,
    BlockRunStatus,
    LogEntry,
    PipelineRun,
)
from runs.orchestrator import decide
from runs.orchestrator.advance import Advanced, Claimed, advance_after_result, dispatch
from runs.orchestrator.logs import LogWriter, output_prefix
from runs.orchestrator.retries import next_attempt_at, record_interrupted, record_retry
from runs.orchestrator.salvage import block_run_fail
from runs.orchestrator.sql import (
    ChainClaim,
    claim_block_run,
    lock_run_row,
    record_result,
    record_result_and_read,
)

S = BlockRunStatus

log = logging.getLogger("millrace.worker")


# Told about each attempt that ended: the block run (its uuid, run and attempt) and the
# result as recorded (the worker logs a line per block run).
Report = Callable[[BlockRun, ExecutionResult], None]


def block_run_execute(block_run_id: int, *, inline: bool = False, report: Report | None = None) -> list[int]:
    """Claim a queued block run, run it in a child process, record the result, and advance
    its run. Returns the block runs that the advance queued (not yet dispatched). A block
    run that is not `queued` any more (run twice by a redelivered task, or cancelled) is
    left alone.

    With `inline`, when finishing a block makes exactly one block ready, that block is
    claimed in the same transaction and run here next: a chain then moves at the speed
    of its blocks, with no broker round trip and one commit per block.

    A run of a pipeline with `run_pipeline_in_one_process` has one block active at a
    time (`advance` sees to it), so with `inline` all its blocks come here one after
    another, and they run in one child process (a `Session`), sharing its memory.

    While the worker's cluster is stopping (`runs.stopping`) no next block is claimed:
    it goes through the broker to a worker that is not stopping."""
    claim = uuidlib.uuid4().hex
    if not claim_block_run(block_run_id, claim, timezone.now()):
        return []
    block_run = BlockRun.objects.select_related("pipeline_run__pipeline").get(pk=block_run_id)
    run = block_run.pipeline_run
    definition = pipeline_definition(run.pipeline_id, run.pipeline.version)
    upstream_outputs = None
    session = Session() if run.pipeline.run_pipeline_in_one_process else None
    try:
        while True:
            result, logs = _execute(block_run, claim, definition, upstream_outputs, session)
            try:
                done = finish(block_run, claim, result, logs=logs, claim_next=inline and not stopping.requested())
            except Exception as exc:  # a row the normal path cannot write: fail it, go on
                log.exception("block run %s: its result could not be recorded", block_run.pk)
                block_run_fail(block_run.pk, f"its result could not be recorded: {type(exc).__name__}: {exc}", claim=claim)
                result = ExecutionResult(status=S.FAILED, error=str(exc), metrics=result.metrics)
                done = Advanced([])
            if report is not None:
                report(block_run, result)
            if done.claimed is None:
                return done.queued
            block_run, upstream_outputs = _claimed_block_run(done.claimed, block_run, result.outputs)
            claim, definition = done.claimed.claim, done.claimed.definition
    finally:
        if session is not None:
            session.close()


def _claimed_block_run(claimed: Claimed, finished: BlockRun, outputs: list[dict]) -> tuple[BlockRun, dict[str, list[dict]]]:
    """The block run the advance claimed, with its upstreams' outputs. In a chain the only
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
    session: Session | None = None,
) -> tuple[ExecutionResult, LogWriter]:
    """Run a claimed block run's code. Returns the result and the log lines not written
    yet (`finish` writes them with the result, if the attempt still holds its claim)."""
    logs = LogWriter(block_run, claim)
    block = definition.blocks.get(block_run.block_uuid)
    if block is None:
        error = f"Block {block_run.block_uuid} no longer exists in pipeline {block_run.pipeline_run.pipeline.uuid}"
        return ExecutionResult(status=S.FAILED, error=error), logs
    logs.code_hash = block.content_hash
    try:
        spec = _spec(block_run, block, upstream_outputs)
    except Exception as exc:  # a stored value the spec cannot be built from
        return ExecutionResult(status=S.FAILED, error=f"The block could not be started: {type(exc).__name__}: {exc}"), logs
    result = run_block(
        spec, on_log=logs.add, on_tick=logs.heartbeat, tick=settings.MILLRACE_HEARTBEAT_INTERVAL, session=session,
    )
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
        output_prefix=output_prefix(run.pk, block.uuid, block_run.claim),
        timeout=block.timeout,
        memory_limit_mb=settings.MILLRACE_BLOCK_MEMORY_MB or None,
        outputs_in_memory=run.pipeline.run_pipeline_in_one_process and run.pipeline.cache_block_output_in_memory,
    )


def _chain_claim(run: PipelineRun, block_uuid: str) -> ChainClaim | None:
    """The next block of a chain below `block_uuid`, to claim with its result (the
    query checks that it may be)."""
    definition = pipeline_definition(run.pipeline_id, run.pipeline.version)
    below = decide.chain_candidate(definition, run.pipeline.block_run_limit, block_uuid)
    return ChainClaim(below, uuidlib.uuid4().hex, run.pipeline.version) if below else None


def finish(
    block_run: BlockRun, claim: str, result: ExecutionResult, *, logs: LogWriter | None = None, claim_next: bool = False,
) -> Advanced:
    """Record an attempt's result (and the hash of the code that ran) if the attempt
    still holds `claim`, then advance the run in the same transaction. A failed attempt
    with retries left goes back to `initial` with the time of its next attempt instead;
    an attempt that its worker's shutdown interrupted is handed back (`_hand_back`).
    Returns what the advance queued and, with `claim_next` and exactly one block
    admitted, that block claimed for the caller to run next.

    A caller that holds the block run with its run and pipeline loaded (the worker) has
    only what can have changed read again; on PostgreSQL the result, the claim of the
    next block of a chain and those reads go in one round trip (`record_result_and_read`)."""
    now = timezone.now()
    if logs is not None:
        logs.close(result)
    if result.status == INTERRUPTED:
        return Advanced(_hand_back(block_run, claim, result, logs, now))
    status = result.status if result.status in BLOCK_TERMINAL else S.FAILED
    retry_at, not_retried = next_attempt_at(block_run, now) if status == S.FAILED else (None, "")
    known = _known_run(block_run)
    read = None
    run_id = block_run.pipeline_run_id
    with transaction.atomic():
        code_hash = logs.code_hash if logs else ""
        # The run's row is locked before the block run's, in the order every other path
        # takes (a cancel locks the run, then changes its block runs): the other order
        # could deadlock with a cancel.
        if retry_at is None and known is not None and connection.vendor == "postgresql":
            chain = _chain_claim(known, block_run.block_uuid) if claim_next and status == S.COMPLETED else None
            won, read = record_result_and_read(block_run.pk, claim, status, result, code_hash, now, run_id, chain)
        else:
            lock_run_row(run_id)
            if retry_at is not None:
                won = record_retry(block_run, claim, result, retry_at, now)
            else:
                won = record_result(block_run.pk, claim, status, result, code_hash, now)
        if not won:
            return Advanced([])
        if logs is not None:
            logs.write()
        _log_failure(block_run, result, status, retry_at, not_retried, now)
        return advance_after_result(
            run_id, known, read, claim=uuidlib.uuid4().hex if claim_next and not retry_at else "",
        )


def _known_run(block_run: BlockRun) -> PipelineRun | None:
    """The run as the caller holds it (with its pipeline), if it does."""
    if not BlockRun.pipeline_run.is_cached(block_run):
        return None
    run = block_run.pipeline_run
    return run if PipelineRun.pipeline.is_cached(run) else None


def _log_failure(block_run: BlockRun, result: ExecutionResult, status: str, retry_at: datetime | None, not_retried: str, now: datetime) -> None:
    """The lines a failed attempt leaves: why it is not retried, if its retry config
    cannot be read, and the error (with when the next attempt is due)."""
    if not not_retried and status != S.FAILED:
        return
    entry = {
        "pipeline_run_id": block_run.pipeline_run_id, "block_run_id": block_run.pk, "timestamp": now,
        "block_uuid": block_run.block_uuid, "block_type": block_run.block_type, "attempt": block_run.attempt,
    }
    if not_retried:
        LogEntry.objects.create(level="WARNING", message=not_retried, **entry)
    if status == S.FAILED:
        then = f"; attempt {block_run.attempt + 1} at {retry_at:%H:%M:%S} UTC" if retry_at else ""
        LogEntry.objects.create(
            level="ERROR", message=f"Block {block_run.block_uuid} failed (attempt {block_run.attempt}){then}: {result.error}"
            + (f"\n{result.traceback}" if result.traceback else ""), **entry,
        )


def _hand_back(block_run: BlockRun, claim: str, result: ExecutionResult, logs: LogWriter | None, now: datetime) -> list[int]:
    """Queue a block run whose attempt was stopped by its worker's shutdown again at
    once, for a worker that is not stopping; the attempt is kept in `attempts` as
    `interrupted` and not counted against the block's retries. Returns nothing to
    dispatch: the task is sent here, after the commit."""
    with transaction.atomic():
        lock_run_row(block_run.pipeline_run_id)
        if not record_interrupted(block_run, claim, result, now):
            return []
        if logs is not None:
            logs.write()
        LogEntry.objects.create(
            pipeline_run_id=block_run.pipeline_run_id, block_run_id=block_run.pk, timestamp=now, level="WARNING",
            message=f"Block {block_run.block_uuid} interrupted (attempt {block_run.attempt}): its worker is shutting down; "
            "it is queued again and the attempt does not count against its retries",
            block_uuid=block_run.block_uuid, block_type=block_run.block_type, attempt=block_run.attempt,
        )
        dispatch([block_run.pk])
    return []

"""django-q2 entry points. Thin: they take ids and call the orchestrator."""

from __future__ import annotations

import logging

from django.conf import settings

from pipelines.execution import ExecutionResult
from runs import orchestrator, stopping
from runs.models import BlockRun

log = logging.getLogger("millrace.worker")


def block_run_execute(block_run_id: int) -> None:
    """Run a queued block run. When finishing it makes exactly one block ready, the
    orchestrator runs that one here too instead of a round trip through the broker: a
    chain then moves at the speed of its blocks. Several ready blocks (a fan-out) go
    back through the broker so they spread over the workers.

    A task that reaches a worker whose cluster is stopping (prefetched before the stop)
    is sent back to the broker unclaimed, for a cluster that is not stopping."""
    if stopping.requested():
        orchestrator.dispatch([block_run_id])  # outside a transaction: sent at once
        return
    queued = orchestrator.block_run_execute(block_run_id, inline=settings.MILLRACE_INLINE_CHAIN, report=_report)
    # The slot of the last block is free now: runs that wait for one may go on.
    queued += orchestrator.wake_waiting_runs()
    orchestrator.dispatch(queued)


def _report(block_run: BlockRun, result: ExecutionResult) -> None:
    duration = result.metrics.get("duration")
    took = f" in {duration:.3f} s" if isinstance(duration, int | float) else ""
    log.info(
        "run %s block %s attempt %s %s%s", block_run.pipeline_run_id, block_run.block_uuid, block_run.attempt,
        result.status, took,
    )

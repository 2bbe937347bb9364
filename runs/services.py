"""Run-level operations built on the orchestrator, used by commands, pages and API."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from pipelines import execution
from runs import orchestrator
from runs.models import RUN_TERMINAL, BlockRunStatus, PipelineRun


def run_execute_sync(run: PipelineRun, *, poll: float = 0.05) -> PipelineRun:
    """Execute a run in this process, block after block (each still in its own child
    process and through the orchestrator), with no worker needed. If the global limit
    keeps blocks waiting on other runs, it polls until a slot frees."""
    execution.prepare()
    pending: deque[int] = deque(orchestrator.advance(run.pk))
    while True:
        while pending:
            pending.extend(orchestrator.block_run_execute(pending.popleft(), inline=True))
        run.refresh_from_db()
        if run.status in RUN_TERMINAL:
            return run
        # Queued block runs of this run that nobody executes (queued by an earlier,
        # interrupted call): this process is their executor now.
        orphans = list(run.block_runs.filter(status=BlockRunStatus.QUEUED).values_list("id", flat=True))
        if orphans:
            pending.extend(orphans)
            continue
        time.sleep(poll)
        pending.extend(orchestrator.advance(run.pk))


def run_wait(run: PipelineRun, *, timeout: float | None = None, poll: float = 0.05) -> PipelineRun:
    """Wait until the workers finish the run (or `timeout` seconds pass)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        run.refresh_from_db()
        if run.status in RUN_TERMINAL:
            return run
        if deadline is not None and time.monotonic() >= deadline:
            return run
        time.sleep(poll)


def run_summary(run: PipelineRun) -> list[dict[str, Any]]:
    rows = []
    for br in run.block_runs.order_by("id"):
        rows.append(
            {
                "block_uuid": br.block_uuid,
                "status": br.status,
                "duration": br.duration,
                "error": br.error,
                "traceback": br.traceback,
            }
        )
    return rows

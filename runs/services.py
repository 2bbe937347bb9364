"""Run-level operations built on the orchestrator, used by commands, pages and API."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pipelines import execution
from pipelines.models import Pipeline
from runs import orchestrator
from runs.models import RUN_TERMINAL, BlockRunStatus, PipelineRun, PipelineRunStatus


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


# --- batch operations (pages, admin actions, API and commands all call these) --------------

@dataclass
class BatchResult:
    """What a batch operation did: the runs it changed, and the runs it refused with
    the reason for each."""

    changed: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.changed)

    def summary(self, verb: str) -> str:
        text = f"{verb} {self.count} run{'s' if self.count != 1 else ''}"
        if self.refused:
            text += f"; refused {len(self.refused)}: " + "; ".join(self.refused.values())
        return text


def _each(run_ids: Iterable[int], operation: Callable[[int], Any]) -> BatchResult:
    result = BatchResult()
    for run_id in run_ids:
        try:
            operation(run_id)
        except orchestrator.ActionRefused as exc:
            result.refused[run_id] = str(exc)
        else:
            result.changed.append(run_id)
    return result


def runs_retry(run_ids: Iterable[int], *, mode: str = "all", user: Any = None) -> BatchResult:
    """Retry each of the runs (`all`: from scratch; `incomplete`: the blocks that did
    not complete). Runs still going are refused."""
    return _each(run_ids, lambda pk: orchestrator.run_retry(pk, mode=mode, user=user))


def pipeline_retry_incomplete(pipeline: Pipeline, *, user: Any = None) -> BatchResult:
    """Retry the incomplete block runs of every failed or cancelled run of a pipeline."""
    ids = PipelineRun.objects.filter(
        pipeline=pipeline, status__in=[PipelineRunStatus.FAILED, PipelineRunStatus.CANCELLED],
    ).order_by("created_at", "id").values_list("id", flat=True)
    return runs_retry(list(ids), mode="incomplete", user=user)


def runs_cancel(run_ids: Iterable[int], *, user: Any = None) -> BatchResult:
    """Cancel each of the runs; finished runs are refused."""
    return _each(run_ids, lambda pk: orchestrator.run_cancel(pk, user=user))


def pipeline_cancel_running(pipeline: Pipeline, *, user: Any = None) -> BatchResult:
    """Cancel every run of a pipeline that has not finished (running, or waiting to)."""
    ids = PipelineRun.objects.filter(
        pipeline=pipeline, status__in=[PipelineRunStatus.INITIAL, PipelineRunStatus.RUNNING],
    ).order_by("created_at", "id").values_list("id", flat=True)
    return runs_cancel(list(ids), user=user)

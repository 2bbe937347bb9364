"""Run-level operations built on the orchestrator, used by commands, pages and API."""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from pipelines import execution
from pipelines.models import Pipeline
from runs import orchestrator
from runs.models import RUN_TERMINAL, BlockRunStatus, Heartbeat, PipelineRun, PipelineRunStatus
from runs.selectors import run_no_worker_reason, run_wait_reason


def run_execute_sync(run: PipelineRun, *, poll: float = 0.05, on_wait: Callable[[str], None] | None = None) -> PipelineRun:
    """Execute a run in this process, block after block (each still in its own child
    process and through the orchestrator), with no worker needed. If the global limit
    keeps blocks waiting on other runs, it polls until a slot frees, and tells `on_wait`
    what it waits for (once, and again whenever the reason changes)."""
    execution.prepare()
    pending: deque[int] = deque(orchestrator.advance(run.pk))
    told = ""
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
        reason = run_wait_reason(run)
        if on_wait is not None and reason and reason != told:
            on_wait(reason)
        told = reason
        time.sleep(poll)
        pending.extend(orchestrator.advance(run.pk))


def run_wait(
    run: PipelineRun, *, timeout: float | None = None, poll: float = 0.05, on_wait: Callable[[str], None] | None = None,
) -> PipelineRun:
    """Wait until the workers finish the run (or `timeout` seconds pass), telling
    `on_wait` when it waits for something other than running blocks: a slot, or a
    worker cluster when none is alive."""
    deadline = None if timeout is None else time.monotonic() + timeout
    told, next_look = "", 0.0
    while True:
        run.refresh_from_db()
        if run.status in RUN_TERMINAL:
            return run
        if deadline is not None and time.monotonic() >= deadline:
            return run
        if on_wait is not None and time.monotonic() >= next_look:
            next_look = time.monotonic() + 1.0
            reason = run_wait_reason(run) or run_no_worker_reason(run)
            if reason and reason != told:
                on_wait(reason)
            told = reason
        time.sleep(poll)


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


# --- heartbeats of long-running processes (worker clusters, schedulers) ---------------------

def pipeline_delete(pipeline: Pipeline) -> int:
    """Delete a pipeline with its blocks, triggers and runs (and their block runs and
    logs); returns how many runs went with it. Refused (ValidationError) while any of
    its runs has not finished: a worker would lose the rows under a running block.
    Its runs' stored block outputs stay in the variable store (retention removes them)."""
    with transaction.atomic():
        runs = PipelineRun.objects.filter(pipeline=pipeline)
        active = runs.exclude(status__in=list(RUN_TERMINAL)).count()
        if active:
            raise ValidationError(f"{pipeline.uuid} has {active} run{'s' if active > 1 else ''} not finished: cancel {'them' if active > 1 else 'it'} first")
        count = runs.count()
        pipeline.delete()
    return count


def heartbeat_beat(
    *, kind: str, name: str, started_at: datetime, info: dict[str, Any] | None = None,
    stopping_since: datetime | None = None,
) -> None:
    """Say that the process (`kind`, `name`) is alive now, creating its row if need be
    (its first beat, or a row the reconcile pass took for dead after a long stall)."""
    changes: dict[str, Any] = {"beat_at": timezone.now(), "info": info or {}}
    if stopping_since is not None:
        changes["stopping_since"] = stopping_since
    if not Heartbeat.objects.filter(kind=kind, name=name).update(**changes):
        Heartbeat.objects.update_or_create(
            kind=kind, name=name,
            defaults={"host": socket.gethostname(), "pid": os.getpid(), "started_at": started_at, **changes},
        )


def heartbeat_end(*, kind: str, name: str) -> None:
    """The process stopped cleanly: it leaves nothing for the reconcile pass to take back."""
    Heartbeat.objects.filter(kind=kind, name=name).delete()

"""Run-level operations built on the orchestrator, used by commands, pages and API."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.utils import timezone

from pipelines import execution, variables
from pipelines.models import Pipeline
from runs import orchestrator
from runs.models import (
    RUN_TERMINAL,
    BlockRun,
    BlockRunStatus,
    Heartbeat,
    LogEntry,
    PipelineRun,
    PipelineRunStatus,
)
from runs.selectors import run_no_worker_reason, run_wait_reason

log = logging.getLogger("millrace.runs")


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


@dataclass
class Pruned:
    """What `runs_prune` deleted (or, with `dry_run`, would delete)."""

    runs: int = 0
    block_runs: int = 0
    logs: int = 0


PRUNE_BATCH = 500  # runs a transaction: short enough that no scheduler or worker waits long


def runs_prune(
    *, older_than: timedelta, status: str | None = None, pipeline: Pipeline | None = None, dry_run: bool = False,
    now: datetime | None = None, batch: int = PRUNE_BATCH,
) -> Pruned:
    """Delete finished runs created more than `older_than` ago (of `pipeline`, with
    `status`, if given) with their block runs, logs, audit rows and stored outputs. A
    run that has not finished is never touched, nor one that a retry starts again while
    the prune goes on: each batch locks its runs and deletes only those still finished.
    Runs go in batches of `batch`, each its own short transaction; stored outputs are
    removed after each commit. A failing batch is logged and the prune goes on."""
    if status is not None and status not in RUN_TERMINAL:
        raise ValidationError({"status": f"status must be one of {', '.join(sorted(RUN_TERMINAL))}, not {status!r}"})
    cutoff = (now or timezone.now()) - older_than
    finished = [status] if status else list(RUN_TERMINAL)
    runs = PipelineRun.objects.filter(status__in=finished, created_at__lt=cutoff)
    if pipeline is not None:
        runs = runs.filter(pipeline=pipeline)
    done = Pruned()
    if dry_run:
        chosen = runs.values("id")
        done.runs = runs.count()
        done.block_runs = BlockRun.objects.filter(pipeline_run_id__in=chosen).count()
        done.logs = LogEntry.objects.filter(pipeline_run_id__in=chosen).count()
        return done
    after = 0
    while True:
        ids = list(runs.filter(id__gt=after).order_by("id").values_list("id", flat=True)[:batch])
        if not ids:
            return done
        after = ids[-1]
        try:
            _prune_batch(ids, finished, done)
        except Exception:  # one bad batch must not stop the others
            log.exception("prune: the runs %s..%s could not be deleted", ids[0], ids[-1])


def _prune_batch(ids: list[int], finished: list[str], done: Pruned) -> None:
    with transaction.atomic():
        locked = PipelineRun.objects.filter(id__in=ids, status__in=finished)
        if connection.features.has_select_for_update_skip_locked:
            locked = locked.select_for_update(skip_locked=True)
        ids = list(locked.values_list("id", flat=True))
        if not ids:
            return
        done.logs += LogEntry.objects.filter(pipeline_run_id__in=ids).delete()[0]
        # Block runs by hand: the ORM would load each one to follow its dynamic children,
        # which go in the same statement anyway.
        table = BlockRun._meta.db_table
        with connection.cursor() as cursor:
            cursor.execute(f"DELETE FROM {table} WHERE pipeline_run_id IN ({', '.join(['%s'] * len(ids))})", ids)
            done.block_runs += cursor.rowcount
        PipelineRun.objects.filter(id__in=ids).delete()
        done.runs += len(ids)
    for run_id in ids:  # slow I/O, after the commit
        variables.delete_prefix(f"pipeline_runs/{run_id}")


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

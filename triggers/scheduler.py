"""The scheduler: `tick()` fires the time triggers that are due and runs the periodic
passes of the orchestrator; `run_loop()` calls it every few seconds (`manage.py
run_scheduler`).

Several schedulers may run at once on PostgreSQL: each locks the due triggers it takes
(`FOR UPDATE SKIP LOCKED`), so they split the work, and the unique constraint on
(trigger, execution_date) of scheduled runs makes a duplicate impossible even if two
of them ever evaluate the same trigger. SQLite has one writer at a time and no row
locks, so there the command allows a single scheduler (`single_scheduler_lock`).
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, close_old_connections, connection, transaction
from django.db.models import Q
from django.utils import timezone

from pipelines.selectors import pipeline_definition
from runs import orchestrator
from runs import services as run_services
from runs.models import HeartbeatKind, PipelineRun, PipelineRunStatus, RunType
from runs.services import heartbeat_beat, heartbeat_end
from triggers import schedule, services
from triggers.models import ScheduleType, Trigger, TriggerStatus

log = logging.getLogger("millrace.scheduler")

# Due triggers taken (and locked) per transaction. Small enough that the locks are
# short and a second scheduler finds work; large enough that a tick with many due
# triggers makes few round trips.
BATCH_SIZE = 100
# With `catch_up`, at most this many missed runs of one trigger per tick; the rest come
# in the following ticks, so one trigger back from a long outage cannot stall the tick.
CATCH_UP_LIMIT = 100

_UNFINISHED = (PipelineRunStatus.INITIAL, PipelineRunStatus.RUNNING)


class Unschedulable(Exception):
    """A stored trigger the scheduler cannot evaluate; the message names the field."""


class SchedulerAlreadyRunning(Exception):
    """Another scheduler holds the SQLite database's scheduler lock."""


# --- the tick ------------------------------------------------------------------------------

def tick(now: datetime | None = None, *, batch_size: int = BATCH_SIZE) -> dict[str, int]:
    """One pass of the scheduler. Returns counts of what it did.

    1. Fire the due time triggers, batch by batch (see `_fire`); runs are started once
       their batch has committed.
    2. Enforce run timeouts and SLAs (`orchestrator.enforce_deadlines`).
    3. Repair what dead workers left (`orchestrator.reconcile`).
    4. Mark backfills whose runs have all finished.
    5. Once a day, with `MILLRACE_RUN_RETENTION` set, delete the finished runs older
       than it (`runs.services.runs_prune`).

    Each pass is guarded: a failing pass is logged and counted in `errors`, and the
    following passes still run."""
    now = now or timezone.now()
    counts = dict.fromkeys(("created", "skipped", "duplicates", "errors", "deactivated"), 0)
    passes: list[tuple[str, Callable[[], dict[str, int] | None]]] = [
        ("triggers", lambda: _fire_due_triggers(now, counts, batch_size)),
        ("deadlines", lambda: orchestrator.enforce_deadlines(now)),
        ("reconcile", lambda: _renamed(orchestrator.reconcile(now))),
        ("backfills", lambda: {"backfills_finished": services.backfills_update_status(now)}),
        ("retention", lambda: _prune_daily(now)),
    ]
    for name, call in passes:
        try:
            counts.update(call() or {})
        except Exception:  # one failing pass must not stop the others
            log.exception("scheduler: the %s pass failed", name)
            counts["errors"] += 1
    return counts


# When this scheduler last pruned old runs. Kept in the process: two schedulers each
# prune once a day, which is harmless (a prune skips what another is deleting).
_last_prune: datetime | None = None
PRUNE_EVERY = timedelta(days=1)


def _prune_daily(now: datetime) -> dict[str, int]:
    global _last_prune
    retention = settings.MILLRACE_RUN_RETENTION
    if retention is None or (_last_prune is not None and now - _last_prune < PRUNE_EVERY):
        return {}
    _last_prune = now
    return {"runs_pruned": run_services.runs_prune(older_than=retention, now=now).runs}


def _renamed(done: dict[str, int]) -> dict[str, int]:
    names = {"failed": "block_runs_failed", "requeued": "block_runs_requeued", "advanced": "runs_advanced"}
    return {names.get(key, key): value for key, value in done.items()}


class _Batch:
    """What evaluating one batch of due triggers produced: the runs to start once it
    commits, and the triggers' new bookkeeping, written grouped (triggers sharing a
    schedule get the same values, so a batch costs a few UPDATEs, not one per trigger)."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts
        self.created: list[int] = []
        self.changes: dict[tuple[tuple[str, Any], ...], list[int]] = defaultdict(list)

    def set(self, trigger: Trigger, **changes: Any) -> None:
        self.changes[tuple(sorted(changes.items()))].append(trigger.pk)

    def write(self) -> None:
        for changes, ids in self.changes.items():
            Trigger.objects.filter(pk__in=ids).update(**dict(changes))


def _fire_due_triggers(now: datetime, counts: dict[str, int], batch_size: int) -> None:
    after: tuple[datetime, int] | None = None
    while True:
        batch = _Batch(counts)
        with transaction.atomic():
            triggers = _due_batch(now, batch_size, after)
            for trigger in triggers:
                _fire(trigger, now, batch)
            batch.write()
        # Started after the commit: starting a run takes the orchestrator's locks (the
        # global slot count), which must not be held for a whole batch.
        _start(batch.created)
        if len(triggers) < batch_size:
            return
        after = (_due_at(triggers[-1]), triggers[-1].pk)


def _due_batch(now: datetime, batch_size: int, after: tuple[datetime, int] | None) -> list[Trigger]:
    """The scheduler's one query, on the partial index `trigger_due`. On PostgreSQL the
    rows are locked and rows locked by another scheduler skipped.

    Batches follow each other by (next_run_at, id): a fired trigger leaves the due set,
    but one that stays due (`@always_on`, a catch-up waiting for its previous run) must
    not be met again in the same tick, nor keep the triggers behind it waiting."""
    due = Trigger.objects.filter(status=TriggerStatus.ACTIVE, schedule_type=ScheduleType.TIME, next_run_at__lte=now)
    if after is not None:
        due = due.filter(Q(next_run_at__gt=after[0]) | Q(next_run_at=after[0], pk__gt=after[1]))
    due = due.select_related("pipeline").order_by("next_run_at", "id")
    if connection.features.has_select_for_update_skip_locked:
        due = due.select_for_update(skip_locked=True, of=("self",))
    return list(due[:batch_size])


def _due_at(trigger: Trigger) -> datetime:
    """The `next_run_at` of a trigger `_due_batch` took: set, since the query only takes
    rows with `next_run_at <= now`."""
    due = trigger.next_run_at
    assert due is not None, f"trigger {trigger.pk} was taken as due without a next_run_at"
    return due


def _start(run_ids: list[int]) -> None:
    """Start the runs a batch created, together (`orchestrator.runs_start` counts the
    global slots once for all of them), after the batch's commit: the slot lock is one
    that workers finishing blocks need too, and is not held while triggers are read."""
    if not run_ids:
        return
    try:
        orchestrator.dispatch(orchestrator.runs_start(run_ids))
    except Exception:  # the runs exist; reconcile advances them later
        log.exception("scheduler: runs %s could not be started", run_ids)


def _fire(trigger: Trigger, now: datetime, batch: _Batch) -> None:
    """Evaluate one due trigger in its own savepoint. A trigger that cannot be evaluated
    is flagged (`error`, no `next_run_at`) and the others go on."""
    created: list[int] = []
    try:
        with transaction.atomic():
            _evaluate(trigger, now, batch, created)
    except Exception as exc:
        log.exception("scheduler: trigger %s (%s) cannot be scheduled", trigger.pk, trigger.name)
        message = str(exc) if isinstance(exc, Unschedulable) else f"{type(exc).__name__}: {exc}"
        Trigger.objects.filter(pk=trigger.pk).update(
            error=f"{now:%Y-%m-%d %H:%M:%S} UTC: not scheduled any more: {message}"[:4000], next_run_at=None,
        )
        batch.counts["errors"] += 1
        return
    batch.created += created


def _evaluate(trigger: Trigger, now: datetime, batch: _Batch, created: list[int]) -> None:
    interval, tz = _checked(trigger)
    if interval == schedule.ONCE:
        _fire_once(trigger, batch, created)
    elif interval == schedule.ALWAYS_ON:
        _fire_always_on(trigger, now, batch, created)
    else:
        _fire_periodic(trigger, interval, tz, now, batch, created)


def _checked(trigger: Trigger) -> tuple[str, str]:
    """The trigger's interval and zone, and proof that its pipeline loads; values stored
    by an older version may not pass."""
    try:
        interval = schedule.validate_interval(trigger.schedule_interval)
    except schedule.ScheduleError as exc:
        raise Unschedulable(f"schedule_interval: {exc}") from None
    try:
        tz = schedule.validate_timezone(trigger.timezone)
    except schedule.ScheduleError as exc:
        raise Unschedulable(f"timezone: {exc}") from None
    try:
        pipeline_definition(trigger.pipeline_id, trigger.pipeline.version)
    except Exception as exc:
        raise Unschedulable(f"pipeline {trigger.pipeline.uuid} cannot be loaded: {type(exc).__name__}: {exc}") from None
    return interval, tz


def _fire_once(trigger: Trigger, batch: _Batch, created: list[int]) -> None:
    """`@once`: one run at its due time, then the trigger is done (inactive). With
    `skip_if_previous_running` and a run of the trigger unfinished, the one time is
    skipped."""
    due = _due_at(trigger)
    if (trigger.settings or {}).get("skip_if_previous_running") and _has_unfinished_run(trigger):
        batch.counts["skipped"] += 1
    else:
        _create_runs(trigger, [due], batch.counts, created)
    batch.set(trigger, status=TriggerStatus.INACTIVE, next_run_at=None, last_run_at=due)
    batch.counts["deactivated"] += 1


def _fire_always_on(trigger: Trigger, now: datetime, batch: _Batch, created: list[int]) -> None:
    """`@always_on`: a new run whenever the trigger has none unfinished. `next_run_at`
    stays in the past, so the trigger is looked at on every tick. On PostgreSQL the row
    lock keeps two schedulers from both seeing "none unfinished"."""
    if not _has_unfinished_run(trigger):
        _create_runs(trigger, [now], batch.counts, created)
        batch.set(trigger, last_run_at=now)


def _fire_periodic(trigger: Trigger, interval: str, tz: str, now: datetime, batch: _Batch, created: list[int]) -> None:
    """A cron or preset. Without `catch_up` one run for the latest due time, however
    many were missed (no stampede after an outage); with it, one run per missed time,
    oldest first. Then `next_run_at` moves to the first fire time after now.

    `skip_if_previous_running`: while a run of the trigger is unfinished the due time is
    skipped (not queued). With `catch_up` too, the missed times are not dropped but run
    one after the other: the next one waits until the previous run has finished."""
    settings = trigger.settings or {}
    serial = bool(settings.get("skip_if_previous_running"))
    due = _due_at(trigger)
    if settings.get("catch_up") is True:
        if serial and _has_unfinished_run(trigger):
            return  # the missed times wait for the unfinished run
        limit = 1 if serial else CATCH_UP_LIMIT
        times = list(islice(schedule.fire_times(interval, start=due, end=now, tz=tz), limit + 1))
        # More missed times than one tick takes: resume after the last one taken.
        resume_after = times[limit - 1] if len(times) > limit else now
        times = times[:limit]
    else:
        latest = _latest_fire_time(interval, tz, now, due)
        times = [latest] if latest is not None else []
        resume_after = now
        if serial and times and _has_unfinished_run(trigger):
            batch.counts["skipped"] += len(times)
            times = []
    if trigger.start_time is not None:
        times = [t for t in times if t >= trigger.start_time]
    _create_runs(trigger, times, batch.counts, created)
    changes: dict[str, Any] = {
        "next_run_at": _next_fire_time(interval, tz, resume_after, trigger.start_time),
    }
    if times:
        changes["last_run_at"] = times[-1]
    batch.set(trigger, **changes)


# Many triggers share a schedule (every @daily trigger is due at the same instant), so
# within a tick the same question comes again and again: answer it once.
@functools.lru_cache(maxsize=4096)
def _latest_fire_time(interval: str, tz: str, now: datetime, not_before: datetime) -> datetime | None:
    return schedule.latest_fire_time(interval, at_or_before=now, tz=tz, not_before=not_before)


@functools.lru_cache(maxsize=4096)
def _next_fire_time(interval: str, tz: str, after: datetime, start_time: datetime | None) -> datetime | None:
    return schedule.next_fire_time(interval, after=after, tz=tz, start_time=start_time)


def _create_runs(trigger: Trigger, times: list[datetime], counts: dict[str, int], created: list[int]) -> None:
    """One scheduled run per logical time. An IntegrityError from the unique constraint
    means another scheduler made that run first: counted, never raised.

    No savepoint of our own around each run: `run_create` makes the run inside its own
    atomic block, a savepoint here, which the IntegrityError rolls back, leaving this
    transaction usable (and a tick of 1,000 due triggers two round trips shorter each)."""
    for at in times:
        try:
            run = services.trigger_create_run(trigger, run_type=RunType.SCHEDULED, execution_date=at, start=False)
        except IntegrityError:
            if not PipelineRun.objects.filter(trigger=trigger, run_type=RunType.SCHEDULED, execution_date=at).exists():
                raise  # not the duplicate we expect: the trigger gets flagged
            counts["duplicates"] += 1
            continue
        counts["created"] += 1
        created.append(run.pk)


def _has_unfinished_run(trigger: Trigger) -> bool:
    return PipelineRun.objects.filter(trigger=trigger, status__in=_UNFINISHED).exists()


# --- the loop ------------------------------------------------------------------------------

def run_loop(*, interval: float = 5.0, ticks: int = 0, should_stop: Callable[[], bool] = lambda: False) -> int:
    """Call `tick()` every `interval` seconds until `should_stop()` (checked between
    ticks and while sleeping) or `ticks` ticks (0: no limit). A failing tick is logged
    and the loop goes on. After each tick the scheduler's heartbeat says when it last
    ticked (`manage.py health` reads it); a clean stop removes it. Returns the number of
    ticks made."""
    done = 0
    name = f"{socket.gethostname()}:{os.getpid()}"
    started_at = timezone.now()
    try:
        while not should_stop():
            started = time.monotonic()
            # A long-lived process outlives connections (a database restart, CONN_MAX_AGE):
            # drop a broken or expired one before and after each tick, as a request would.
            close_old_connections()
            counts: dict[str, int] = {}
            try:
                counts = tick()
                if any(counts.values()):
                    log.info("tick: %s", {key: value for key, value in counts.items() if value})
                _beat(name, started_at, interval, counts)
            except Exception:  # a bad tick is logged; the loop must keep going
                log.exception("scheduler tick failed")
            finally:
                close_old_connections()
            done += 1
            if ticks and done >= ticks:
                break
            _sleep_until(started + interval, should_stop)
    finally:
        try:
            heartbeat_end(kind=HeartbeatKind.SCHEDULER, name=name)
        except Exception:  # the database is gone: the row goes stale, which says as much
            log.exception("scheduler: its heartbeat could not be removed")
    return done


def _beat(name: str, started_at: datetime, interval: float, counts: dict[str, int]) -> None:
    info = {"interval": interval, "last_tick": {key: value for key, value in counts.items() if value}}
    heartbeat_beat(kind=HeartbeatKind.SCHEDULER, name=name, started_at=started_at, info=info)


def _sleep_until(deadline: float, should_stop: Callable[[], bool]) -> None:
    while not should_stop():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(min(remaining, 0.2))


def scheduler_lock_path() -> Path | None:
    """The lock file beside the SQLite database file; None on PostgreSQL (any number of
    schedulers) and for an in-memory SQLite database."""
    if connection.vendor != "sqlite":
        return None
    name = str(connection.settings_dict["NAME"])
    if not name or name == ":memory:" or name.startswith("file:"):
        return None
    return Path(f"{name}.scheduler.lock")


@contextmanager
def single_scheduler_lock() -> Iterator[Path | None]:
    """On SQLite, hold an exclusive `flock` on the database's scheduler lock file for
    the life of the block, or raise SchedulerAlreadyRunning at once. The kernel drops
    the lock when the process dies, so a crashed scheduler never blocks the next."""
    path = scheduler_lock_path()
    if path is None:
        yield None
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise SchedulerAlreadyRunning(
                f"another scheduler (pid {holder}) is already running on this SQLite database "
                f"(it holds {path}). SQLite allows one scheduler; use PostgreSQL to run several."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock

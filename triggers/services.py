"""Every write of the triggers app: triggers, API calls, events and backfills.

CONTRACT (agreed between the lead and the helpers; keep the signatures):
every function validates its input and raises `django.core.exceptions.ValidationError`
with a dict naming the field (`{"schedule_interval": ["..."]}`) and changes nothing
when the input is bad.

Runs are only ever created through `runs.orchestrator.run_create`, with the trigger's
variables under the caller's and the trigger's timeout and SLA settings copied onto the
run. `next_run_at` is written here (when a trigger is created, activated, paused or its
schedule changes) and by the scheduler (when a trigger fires), nowhere else.
"""

from __future__ import annotations

import hmac
import logging
import time
import zoneinfo
from collections.abc import Mapping
from datetime import date, datetime
from datetime import time as dtime
from itertools import islice
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Count, Q
from django.utils import timezone as djtz

from config.common import jsonsafe, limits
from pipelines.models import Pipeline
from pipelines.selectors import pipeline_definition
from runs import orchestrator
from runs.models import RUN_TERMINAL, PipelineRun, PipelineRunStatus, RunType
from triggers import schedule
from triggers.models import (
    ApiRequest,
    Backfill,
    BackfillStatus,
    Event,
    ScheduleType,
    Trigger,
    TriggerStatus,
    new_token,
)

log = logging.getLogger(__name__)

# The fields `trigger_create` takes and `trigger_update` may change.
TRIGGER_FIELDS = (
    "pipeline", "name", "description", "schedule_type", "status", "start_time",
    "schedule_interval", "timezone", "variables", "settings", "event_matcher",
)
# A change to any of these moves `next_run_at` (recomputed from now).
_SCHEDULE_FIELDS = frozenset({"schedule_type", "status", "start_time", "schedule_interval", "timezone"})
_BOOL_SETTINGS = ("skip_if_previous_running", "create_initial_pipeline_run", "catch_up")
_SECONDS_SETTINGS = ("timeout", "sla")
SETTINGS_KEYS = (*_BOOL_SETTINGS, *_SECONDS_SETTINGS, "timeout_status")
_EVENT_MATCHER_KEYS = ("source", "name", "filters")
MAX_BACKFILL_RUNS = 10_000
_TEXT_MAX = 255
# How long a request that lost an idempotency-key race waits for the winner's run.
_IDEMPOTENCY_WAIT = 10.0


class TriggerNotFound(Exception):
    """No trigger with that id (API answers 404)."""


class TokenRejected(Exception):
    """Wrong or missing API-trigger token (API answers 403)."""


class TriggerInactive(Exception):
    """The trigger is paused (API answers 409)."""


# --- validation ----------------------------------------------------------------------------

def _invalid(field: str, message: str) -> ValidationError:
    return ValidationError({field: [message]})


def _check_text(field: str, value: Any, *, required: bool) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise _invalid(field, f"{field} must be text, not {type(value).__name__}")
    value = jsonsafe.validate_text(field, value).strip()
    if required and not value:
        raise _invalid(field, f"{field} is required")
    if len(value) > _TEXT_MAX:
        raise _invalid(field, f"{field} is {len(value)} characters long; at most {_TEXT_MAX} are allowed")
    return value


def validate_json_object(field: str, value: Any) -> dict:
    """A JSON object both databases can store as it is (config.common.jsonsafe: no NaN,
    NUL, lone surrogate, 65th level or second megabyte); None is an empty one. Every
    JSON field of a trigger, an event, a backfill and a run's variables passes here."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid(field, f"{field} must be a JSON object, not {type(value).__name__}")
    return jsonsafe.validate(field, value)


def _check_choice(field: str, value: Any, choices: list[str]) -> str:
    if value not in choices:
        raise _invalid(field, f"{field} must be one of {', '.join(choices)}, not {value!r}")
    return value


def _check_timezone(field: str, value: Any) -> str:
    try:
        return schedule.validate_timezone(value)
    except schedule.ScheduleError as exc:
        raise _invalid(field, str(exc)) from None


def _check_interval(field: str, value: Any) -> str:
    try:
        return schedule.validate_interval(value)
    except schedule.ScheduleError as exc:
        raise _invalid(field, str(exc)) from None


def _aware_datetime(field: str, value: Any, tz: str) -> datetime:
    """A datetime, made aware: a naive one (or a bare date, at midnight) is read as wall
    time in `tz`, the zone the trigger or backfill is defined in."""
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime.combine(value, dtime())
    if not isinstance(value, datetime):
        raise _invalid(field, f"{field} must be a date and time, not {type(value).__name__}")
    if djtz.is_naive(value):
        value = djtz.make_aware(value, zoneinfo.ZoneInfo(tz))
    return value


def validate_settings(value: Any) -> dict:
    """The trigger's `settings`, checked key by key; an error names `settings.<key>`.
    `timeout` and `sla` are seconds up to limits.MAX_SECONDS (0 or null: none), which
    the run's integer columns hold."""
    value = validate_json_object("settings", value)
    for key, item in value.items():
        name = f"settings.{key}"
        if key not in SETTINGS_KEYS:
            raise _invalid("settings", f"{name} is not a known setting; known: {', '.join(SETTINGS_KEYS)}")
        if key in _BOOL_SETTINGS and not isinstance(item, bool):
            raise _invalid("settings", f"{name} must be true or false, not {item!r}")
        if key in _SECONDS_SETTINGS and item is not None:
            limits.validate_seconds("settings", item, name=name)
        if key == "timeout_status" and item not in (PipelineRunStatus.FAILED, PipelineRunStatus.CANCELLED):
            raise _invalid("settings", f"{name} must be 'failed' or 'cancelled', not {item!r}")
    return value


def validate_event_matcher(value: Any, *, required: bool) -> dict:
    value = validate_json_object("event_matcher", value)
    if not required and not value:
        return {}
    unknown = [k for k in value if k not in _EVENT_MATCHER_KEYS]
    if unknown:
        raise _invalid("event_matcher", f"event_matcher.{unknown[0]} is not known; an event matcher has source, name and filters")
    for key in ("source", "name"):
        item = value.get(key)
        if not isinstance(item, str) or not item.strip():
            raise _invalid("event_matcher", f"event_matcher.{key} is required (non-empty text)")
    filters = value.get("filters")
    if filters is not None and not isinstance(filters, dict):
        raise _invalid("event_matcher", f"event_matcher.filters must be a JSON object, not {type(filters).__name__}")
    return {"source": value["source"].strip(), "name": value["name"].strip(), "filters": filters or {}}


def validate_trigger_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Check a complete set of trigger fields (as `trigger_create` takes them) and return
    them normalised. Raises ValidationError naming the first bad field."""
    cleaned = dict(fields)
    if not isinstance(fields.get("pipeline"), Pipeline):
        raise _invalid("pipeline", "pipeline is required")
    cleaned["name"] = _check_text("name", fields.get("name"), required=True)
    if not isinstance(fields.get("description", ""), str):
        raise _invalid("description", "description must be text")
    jsonsafe.validate_text("description", fields.get("description") or "")
    cleaned["schedule_type"] = _check_choice("schedule_type", fields.get("schedule_type"), ScheduleType.values)
    cleaned["status"] = _check_choice("status", fields.get("status"), TriggerStatus.values)
    cleaned["timezone"] = _check_timezone("timezone", fields.get("timezone") or "UTC")
    interval = fields.get("schedule_interval") or ""
    if cleaned["schedule_type"] == ScheduleType.TIME and not (isinstance(interval, str) and interval.strip()):
        raise _invalid("schedule_interval", "a time trigger needs a schedule interval (a preset such as @daily, or a cron expression)")
    # Event and API triggers have no schedule; one given anyway must still be valid.
    cleaned["schedule_interval"] = _check_interval("schedule_interval", interval) if interval else ""
    start = fields.get("start_time")
    cleaned["start_time"] = None if start is None else _aware_datetime("start_time", start, cleaned["timezone"])
    cleaned["variables"] = validate_json_object("variables", fields.get("variables"))
    cleaned["settings"] = validate_settings(fields.get("settings"))
    cleaned["event_matcher"] = validate_event_matcher(
        fields.get("event_matcher"), required=cleaned["schedule_type"] == ScheduleType.EVENT,
    )
    return cleaned


# --- the fire-time bookkeeping ---------------------------------------------------------------

def first_run_at(trigger: Trigger, now: datetime) -> datetime | None:
    """When a trigger that becomes active now (or whose schedule just changed) is first
    due: the first fire time after now for a cron or preset (never an immediate run),
    `start_time` or now for `@once`, now for `@always_on`; None when it is not an
    active time trigger."""
    if not trigger.is_active or trigger.schedule_type != ScheduleType.TIME:
        return None
    interval = trigger.schedule_interval
    if interval == schedule.ONCE:
        return trigger.start_time or now
    if interval == schedule.ALWAYS_ON:
        return max(now, trigger.start_time) if trigger.start_time else now
    return schedule.next_fire_time(interval, after=now, tz=trigger.timezone, start_time=trigger.start_time)


def trigger_create_run(
    trigger: Trigger,
    *,
    run_type: str,
    execution_date: datetime | None = None,
    variables: dict | None = None,
    event: dict | None = None,
    created_by: Any = None,
    start: bool = True,
) -> PipelineRun:
    """A run of the trigger's pipeline: the trigger's variables with `variables` on top,
    its timeout and SLA settings copied onto the run. The scheduler passes start=False
    and starts the runs itself once its transaction has committed."""
    settings = trigger.settings or {}
    return orchestrator.run_create(
        trigger.pipeline,
        variables={**(trigger.variables or {}), **(variables or {})},
        run_type=run_type,
        execution_date=execution_date,
        trigger=trigger,
        event=event,
        created_by=created_by,
        timeout=settings.get("timeout") or None,
        timeout_status=settings.get("timeout_status", "") if settings.get("timeout") else "",
        sla=settings.get("sla") or None,
        start=start,
    )


def _initial_run(trigger: Trigger, now: datetime, created_by: Any) -> PipelineRun:
    """`create_initial_pipeline_run`: one run at once when the trigger is activated. For
    a time trigger it is a scheduled run at `now`, so the unique (trigger, execution
    date) constraint also covers an `@once` trigger due at that same instant."""
    if trigger.schedule_type == ScheduleType.TIME:
        run = trigger_create_run(trigger, run_type=RunType.SCHEDULED, execution_date=now, created_by=created_by)
        Trigger.objects.filter(pk=trigger.pk).update(last_run_at=now)
        trigger.last_run_at = now
        return run
    return trigger_create_run(trigger, run_type=RunType.MANUAL, created_by=created_by)


def _after_activation(trigger: Trigger, was_active: bool, now: datetime, created_by: Any) -> None:
    if trigger.is_active and not was_active and (trigger.settings or {}).get("create_initial_pipeline_run"):
        _initial_run(trigger, now, created_by)


# --- triggers ------------------------------------------------------------------------------

def trigger_create(
    *,
    pipeline: Any,
    name: str,
    schedule_type: str = "time",
    schedule_interval: str = "",
    start_time: datetime | None = None,
    timezone: str = "UTC",
    variables: dict | None = None,
    settings: dict | None = None,
    event_matcher: dict | None = None,
    status: str = "inactive",
    description: str = "",
    created_by: Any = None,
    now: datetime | None = None,
) -> Trigger:
    now = now or djtz.now()
    cleaned = validate_trigger_fields({
        "pipeline": pipeline, "name": name, "description": description, "schedule_type": schedule_type,
        "status": status, "start_time": start_time, "schedule_interval": schedule_interval,
        "timezone": timezone, "variables": variables, "settings": settings, "event_matcher": event_matcher,
    })
    trigger = Trigger(**cleaned, created_by=created_by if getattr(created_by, "pk", None) else None)
    trigger.next_run_at = first_run_at(trigger, now)
    trigger.full_clean(validate_unique=False, validate_constraints=False)
    with transaction.atomic():
        trigger.save()
        _after_activation(trigger, False, now, created_by)
    return trigger


def trigger_update(trigger: Trigger, *, now: datetime | None = None, **fields: Any) -> Trigger:
    """Change any of the fields `trigger_create` takes. A schedule change recomputes
    `next_run_at` from now: editing creates no immediate run."""
    now = now or djtz.now()
    unknown = [key for key in fields if key not in TRIGGER_FIELDS]
    if unknown:
        raise _invalid(unknown[0], f"{unknown[0]} is not a trigger field that can be changed")
    # The whole trigger is checked, not only the changed fields: a value stored by an
    # older version must be fixed before anything else is saved.
    current = {name: getattr(trigger, name) for name in TRIGGER_FIELDS}
    cleaned = validate_trigger_fields({**current, **fields})
    changed = [name for name in TRIGGER_FIELDS if _differs(cleaned[name], current[name])]
    was_active = trigger.is_active
    for name in changed:
        setattr(trigger, name, cleaned[name])
    write = set(changed)
    if not trigger.is_active:
        if trigger.next_run_at is not None:
            trigger.next_run_at = None
            write.add("next_run_at")
    elif write & _SCHEDULE_FIELDS or trigger.error or (trigger.next_run_at is None and trigger.schedule_type == ScheduleType.TIME):
        # Also when the scheduler flagged the trigger (error, no next_run_at): a valid
        # edit puts it back on schedule.
        trigger.next_run_at = first_run_at(trigger, now)
        write.add("next_run_at")
    if trigger.error:
        trigger.error = ""
        write.add("error")
    if not write:
        return trigger
    trigger.full_clean(validate_unique=False, validate_constraints=False)
    with transaction.atomic():
        # Only the changed columns: the scheduler writes next_run_at, last_run_at and
        # status (@once) concurrently, and a stale copy must not undo its work.
        trigger.save(update_fields=sorted({*write, "updated_at"}))
        _after_activation(trigger, was_active, now, None)
    return trigger


def _differs(new: Any, old: Any) -> bool:
    if isinstance(new, Pipeline) or isinstance(old, Pipeline):
        return getattr(new, "pk", None) != getattr(old, "pk", None)
    return new != old


def trigger_activate(trigger: Trigger, *, now: datetime | None = None) -> Trigger:
    """Make the trigger active (validating everything it holds) and put it on schedule;
    with `create_initial_pipeline_run`, one run starts at once. Activating an active,
    healthy trigger changes nothing."""
    return trigger_update(trigger, status=TriggerStatus.ACTIVE, now=now)


def trigger_pause(trigger: Trigger) -> Trigger:
    """Inactive, with no next fire time. Always possible, even for a trigger whose stored
    schedule is broken; runs already started go on."""
    Trigger.objects.filter(pk=trigger.pk).update(status=TriggerStatus.INACTIVE, next_run_at=None, updated_at=djtz.now())
    trigger.status = TriggerStatus.INACTIVE
    trigger.next_run_at = None
    return trigger


def trigger_delete(trigger: Trigger) -> None:
    """Delete the trigger; its runs stay (their `trigger` becomes empty)."""
    trigger.delete()


def trigger_rotate_token(trigger: Trigger) -> str:
    """A new token; the old one stops working at once. Returns the new token."""
    token = new_token()
    Trigger.objects.filter(pk=trigger.pk).update(token=token, updated_at=djtz.now())
    trigger.token = token
    return token


def trigger_run_now(trigger: Trigger, *, variables: dict | None = None, created_by: Any = None) -> PipelineRun:
    """"Run once now": a manual run with the trigger's variables (then `variables`).
    Works whether the trigger is active or paused."""
    variables = validate_json_object("variables", variables)
    return trigger_create_run(trigger, run_type=RunType.MANUAL, variables=variables, created_by=created_by)


# --- the API trigger -----------------------------------------------------------------------

def trigger_fire_api(
    *, trigger_id: int, token: str, variables: Any = None, idempotency_key: str | None = None,
) -> tuple[PipelineRun, bool]:
    """The API trigger. Returns (run, created); created is False when an earlier call
    with the same idempotency key made the run. Raises TriggerNotFound, TokenRejected
    (constant-time comparison), TriggerInactive, or ValidationError for variables that
    are not a JSON object. Nothing is created unless a run is.

    Only `api` triggers can be fired this way: any other id answers TriggerNotFound,
    so the answer says nothing about time or event triggers.

    With an idempotency key, the `ApiRequest` row is inserted first, in the same
    savepoint as the run: of concurrent requests with one key the unique constraint lets
    exactly one insert through; the others get IntegrityError (on PostgreSQL only once
    the winner has committed) and return the winner's run."""
    trigger = _api_trigger(trigger_id)
    if not isinstance(token, str) or not hmac.compare_digest(token.encode(), trigger.token.encode()):
        raise TokenRejected("wrong token for this trigger")
    if not trigger.is_active:
        raise TriggerInactive(f"trigger {trigger.pk} is paused")
    variables = validate_json_object("variables", variables)
    key = _check_text("idempotency_key", idempotency_key, required=False)
    if not key:
        return trigger_create_run(trigger, run_type=RunType.API, variables=variables), True
    deadline = time.monotonic() + _IDEMPOTENCY_WAIT
    while True:
        try:
            with transaction.atomic():
                request = ApiRequest.objects.create(trigger=trigger, key=key)
                run = trigger_create_run(trigger, run_type=RunType.API, variables=variables)
                ApiRequest.objects.filter(pk=request.pk).update(run=run)
            return run, True
        except IntegrityError:
            earlier = _earlier_run(trigger, key)
            if earlier is not None:
                return earlier, False
        # The row vanished (its run was deleted, or its transaction rolled back after
        # all): try the insert again, for a bounded time.
        if time.monotonic() > deadline:
            raise TimeoutError(f"idempotency key {key!r}: the earlier request's run did not appear")
        time.sleep(0.05)


def _api_trigger(trigger_id: Any) -> Trigger:
    try:
        pk = int(trigger_id)
    except (TypeError, ValueError):
        raise TriggerNotFound(f"no API trigger {trigger_id!r}") from None
    trigger = Trigger.objects.select_related("pipeline").filter(pk=pk, schedule_type=ScheduleType.API).first()
    if trigger is None:
        raise TriggerNotFound(f"no API trigger {pk}")
    return trigger


def _earlier_run(trigger: Trigger, key: str) -> PipelineRun | None:
    row = ApiRequest.objects.filter(trigger=trigger, key=key).select_related("run").first()
    return row.run if row is not None else None


# --- events --------------------------------------------------------------------------------

def event_matches(matcher: Mapping[str, Any], source: str, name: str, payload: Mapping[str, Any]) -> bool:
    """Source and name equal, and every filter key present in the payload with an equal
    value (top-level keys)."""
    if matcher.get("source") != source or matcher.get("name") != name:
        return False
    filters = matcher.get("filters") or {}
    return all(key in payload and payload[key] == value for key, value in filters.items())


def event_record(*, source: str, name: str, payload: Any = None, created_by: Any = None) -> Event:
    """Store an event and start a run for every active event trigger that matches it.
    Each trigger's run is made in its own savepoint: a trigger whose run cannot be made
    is logged and the others still run."""
    source = _check_text("source", source, required=True)
    name = _check_text("name", name, required=True)
    payload = validate_json_object("payload", payload)
    user = created_by if getattr(created_by, "pk", None) else None
    with transaction.atomic():
        event = Event.objects.create(source=source, name=name, payload=payload, created_by=user)
        candidates = Trigger.objects.filter(
            schedule_type=ScheduleType.EVENT, status=TriggerStatus.ACTIVE,
            event_matcher__source=source, event_matcher__name=name,
        ).select_related("pipeline").order_by("id")
        runs = []
        for trigger in candidates:
            if not event_matches(trigger.event_matcher or {}, source, name, payload):
                continue
            try:
                with transaction.atomic():
                    runs.append(trigger_create_run(trigger, run_type=RunType.EVENT, event=payload, created_by=user))
            except Exception:  # one broken trigger must not keep the others from running
                log.exception("event %s: trigger %s could not start a run", event.pk, trigger.pk)
        if runs:
            event.runs.add(*runs)
    return event


# --- backfills -----------------------------------------------------------------------------

def backfill_dates(*, start: datetime, end: datetime, interval: str, timezone: str = "UTC") -> list[datetime]:
    """The logical dates of a backfill, validated: every fire time of `interval` from
    `start` to `end` inclusive (naive datetimes are read in `timezone`)."""
    tz = _check_timezone("timezone", timezone)
    interval = _check_interval("interval", interval)
    if not schedule.is_periodic(interval):
        raise _invalid("interval", f"a backfill needs a periodic interval (a preset such as @daily or a cron expression), not {interval}")
    start = _aware_datetime("start", start, tz)
    end = _aware_datetime("end", end, tz)
    if end < start:
        raise _invalid("end", f"end ({end.isoformat()}) is before start ({start.isoformat()})")
    dates = list(islice(schedule.fire_times(interval, start=start, end=end, tz=tz), MAX_BACKFILL_RUNS + 1))
    if len(dates) > MAX_BACKFILL_RUNS:
        raise _invalid("end", f"{interval} from start to end gives more than {MAX_BACKFILL_RUNS:,} runs; shorten the range or use a longer interval")
    if not dates:
        raise _invalid("interval", f"{interval} does not fire between start and end")
    return dates


def backfill_create(
    *,
    pipeline: Any,
    start: datetime,
    end: datetime,
    interval: str,
    timezone: str = "UTC",
    variables: dict | None = None,
    name: str = "",
    created_by: Any = None,
) -> Backfill:
    """One run (run_type `backfill`) per logical date, in date order, in one transaction:
    either every run exists or none. Runs beyond the pipeline's `pipeline_run_limit`
    wait in `initial` and start in order."""
    if not isinstance(pipeline, Pipeline):
        raise _invalid("pipeline", "pipeline is required")
    variables = validate_json_object("variables", variables)
    name = _check_text("name", name, required=False)
    tz = _check_timezone("timezone", timezone)
    dates = backfill_dates(start=start, end=end, interval=interval, timezone=tz)
    user = created_by if getattr(created_by, "pk", None) else None
    try:
        pipeline_definition(pipeline.pk, pipeline.version)
    except Exception as exc:  # a stored cycle or a block that cannot be read: no run could start
        raise _invalid("pipeline", f"pipeline {pipeline.uuid} cannot be loaded: {exc}") from None
    with transaction.atomic():
        backfill = Backfill.objects.create(
            pipeline=pipeline, name=name, start_datetime=_aware_datetime("start", start, tz),
            end_datetime=_aware_datetime("end", end, tz), interval=schedule.validate_interval(interval),
            timezone=tz, variables=variables, status=BackfillStatus.RUNNING, total_runs=len(dates), created_by=user,
        )
        run_ids = [
            orchestrator.run_create(
                pipeline, variables=variables, run_type=RunType.BACKFILL, execution_date=logical_date,
                backfill=backfill, created_by=user, start=False,
            ).pk
            for logical_date in dates
        ]
    # Started together once they all exist: one count of the global slots for the whole
    # backfill, and no slot lock held while hundreds of runs are written.
    orchestrator.dispatch(orchestrator.runs_start(run_ids))
    return backfill


def backfill_cancel(backfill: Backfill) -> int:
    """Cancel every unfinished run of the backfill; returns how many were cancelled.

    The backfill is marked cancelled first so the scheduler does not mark it failed
    meanwhile; runs are stopped newest first, so that stopping one never starts a
    waiting run of the same backfill only to stop it next."""
    now = djtz.now()
    Backfill.objects.filter(
        pk=backfill.pk, status__in=[BackfillStatus.INITIAL, BackfillStatus.RUNNING],
    ).update(status=BackfillStatus.CANCELLED, completed_at=now)
    open_runs = PipelineRun.objects.filter(backfill=backfill).exclude(status__in=list(RUN_TERMINAL))
    cancelled = 0
    for run_id in open_runs.order_by("-execution_date", "-id").values_list("id", flat=True):
        if orchestrator.run_stop(run_id, status=PipelineRunStatus.CANCELLED, reason=f"backfill {backfill.pk} cancelled"):
            cancelled += 1
    backfill.refresh_from_db()
    return cancelled


def backfills_update_status(now: datetime | None = None) -> int:
    """Mark each running backfill whose runs have all finished `completed` (every run
    completed) or `failed`. Returns how many changed. Called by the scheduler's tick."""
    now = now or djtz.now()
    open_statuses = [PipelineRunStatus.INITIAL, PipelineRunStatus.RUNNING]
    rows = (
        Backfill.objects.filter(status__in=[BackfillStatus.INITIAL, BackfillStatus.RUNNING])
        .annotate(
            unfinished=Count("runs", filter=Q(runs__status__in=open_statuses)),
            completed=Count("runs", filter=Q(runs__status=PipelineRunStatus.COMPLETED)),
        )
        .values_list("id", "unfinished", "completed", "total_runs")
    )
    changed = 0
    for pk, unfinished, completed, total in rows:
        if unfinished:
            continue
        final = BackfillStatus.COMPLETED if completed >= total else BackfillStatus.FAILED
        # Each backfill in a savepoint of its own: one that cannot be written must not
        # keep the others from finishing.
        changed += orchestrator.isolated(
            f"backfills: finishing backfill {pk}",
            lambda pk=pk, final=final: Backfill.objects.filter(
                pk=pk, status__in=[BackfillStatus.INITIAL, BackfillStatus.RUNNING],
            ).update(status=final, completed_at=now),
        ) or 0
    return changed

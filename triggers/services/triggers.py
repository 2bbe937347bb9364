"""Writes of a trigger's own row: create, update (fields and status together),
activate, pause, delete, "run once now", and the run a trigger makes.

`next_run_at` is written here (when a trigger is created, activated, paused or its
schedule changes) and by the scheduler (when a trigger fires), nowhere else.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db import transaction
from django.utils import timezone as djtz

from pipelines.models import Pipeline
from runs import orchestrator
from runs.models import PipelineRun, RunType
from triggers import schedule
from triggers.models import ScheduleType, Trigger, TriggerStatus
from triggers.services.validation import (
    TRIGGER_FIELDS,
    field_error,
    validate_json_object,
    validate_trigger_fields,
)

# A change to any of these moves `next_run_at` (recomputed from now).
_SCHEDULE_FIELDS = frozenset({"schedule_type", "status", "start_time", "schedule_interval", "timezone"})


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
    """Change any of the fields `trigger_create` takes, `status` included: the one
    service behind the API's PUT/PATCH and the admin's change form.

    1. A field that is not a trigger field is refused.
    2. A `status` alone that is the current one changes nothing; `inactive` alone
       pauses (`trigger_pause`: always possible, even for a trigger whose stored
       schedule is broken). Nothing at all changes nothing.
    3. Otherwise the whole trigger with the new values, status included, is validated
       once and saved in one transaction, so activating reads the new schedule and a
       refused value leaves every field as it was. A schedule change recomputes
       `next_run_at` from now: editing creates no immediate run; activating may (with
       `create_initial_pipeline_run`)."""
    unknown = [key for key in fields if key not in TRIGGER_FIELDS]
    if unknown:
        raise field_error(unknown[0], f"{unknown[0]} is not a trigger field that can be changed")
    if not fields:
        return trigger
    if fields.keys() == {"status"}:
        if fields["status"] == trigger.status:
            return trigger
        if fields["status"] == TriggerStatus.INACTIVE:
            return trigger_pause(trigger)
    return _trigger_write(trigger, fields, now or djtz.now())


def _trigger_write(trigger: Trigger, fields: dict[str, Any], now: datetime) -> Trigger:
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
    healthy trigger changes nothing; an active trigger the scheduler flagged is checked
    again and, if valid, put back on schedule."""
    return _trigger_write(trigger, {"status": TriggerStatus.ACTIVE}, now or djtz.now())


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


def trigger_run_now(trigger: Trigger, *, variables: dict | None = None, created_by: Any = None) -> PipelineRun:
    """"Run once now": a manual run with the trigger's variables (then `variables`).
    Works whether the trigger is active or paused."""
    variables = validate_json_object("variables", variables)
    return trigger_create_run(trigger, run_type=RunType.MANUAL, variables=variables, created_by=created_by)

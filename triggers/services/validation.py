"""The checks every trigger service runs on its input before it writes anything.

Each raises `django.core.exceptions.ValidationError` with a dict naming the field
(`{"schedule_interval": ["..."]}`); the `clean_*` helpers return the value normalised.
The admin's forms call the same functions, so every interface refuses the same input
with the same message.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Mapping
from datetime import date, datetime
from datetime import time as dtime
from typing import Any

from django.core.exceptions import ValidationError
from django.utils import timezone as djtz

from config.common import jsonsafe, limits
from pipelines.models import Pipeline
from runs.models import PipelineRunStatus
from triggers import schedule
from triggers.models import ScheduleType, TriggerStatus

# The fields `trigger_create` takes and `trigger_update` may change.
TRIGGER_FIELDS = (
    "pipeline", "name", "description", "schedule_type", "status", "start_time",
    "schedule_interval", "timezone", "variables", "settings", "event_matcher",
)
_BOOL_SETTINGS = ("skip_if_previous_running", "create_initial_pipeline_run", "catch_up")
_SECONDS_SETTINGS = ("timeout", "sla")
SETTINGS_KEYS = (*_BOOL_SETTINGS, *_SECONDS_SETTINGS, "timeout_status")
_EVENT_MATCHER_KEYS = ("source", "name", "filters")
_TEXT_MAX = 255


def field_error(field: str, message: str) -> ValidationError:
    return ValidationError({field: [message]})


def clean_text(field: str, value: Any, *, required: bool) -> str:
    """Text for a varchar(255) column, stripped; None is empty."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise field_error(field, f"{field} must be text, not {type(value).__name__}")
    value = jsonsafe.validate_text(field, value).strip()
    if required and not value:
        raise field_error(field, f"{field} is required")
    if len(value) > _TEXT_MAX:
        raise field_error(field, f"{field} is {len(value)} characters long; at most {_TEXT_MAX} are allowed")
    return value


def validate_json_object(field: str, value: Any) -> dict:
    """A JSON object both databases can store as it is (config.common.jsonsafe: no NaN,
    NUL, lone surrogate, 65th level or second megabyte); None is an empty one. Every
    JSON field of a trigger, an event, a backfill and a run's variables passes here."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise field_error(field, f"{field} must be a JSON object, not {type(value).__name__}")
    return jsonsafe.validate(field, value)


def clean_choice(field: str, value: Any, choices: list[str]) -> str:
    if value not in choices:
        raise field_error(field, f"{field} must be one of {', '.join(choices)}, not {value!r}")
    return value


def clean_timezone(field: str, value: Any) -> str:
    try:
        return schedule.validate_timezone(value)
    except schedule.ScheduleError as exc:
        raise field_error(field, str(exc)) from None


def clean_interval(field: str, value: Any) -> str:
    try:
        return schedule.validate_interval(value)
    except schedule.ScheduleError as exc:
        raise field_error(field, str(exc)) from None


def clean_datetime(field: str, value: Any, tz: str) -> datetime:
    """A datetime, made aware: a naive one (or a bare date, at midnight) is read as wall
    time in `tz`, the zone the trigger or backfill is defined in."""
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime.combine(value, dtime())
    if not isinstance(value, datetime):
        raise field_error(field, f"{field} must be a date and time, not {type(value).__name__}")
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
            raise field_error("settings", f"{name} is not a known setting; known: {', '.join(SETTINGS_KEYS)}")
        if key in _BOOL_SETTINGS and not isinstance(item, bool):
            raise field_error("settings", f"{name} must be true or false, not {item!r}")
        if key in _SECONDS_SETTINGS and item is not None:
            limits.validate_seconds("settings", item, name=name)
        if key == "timeout_status" and item not in (PipelineRunStatus.FAILED, PipelineRunStatus.CANCELLED):
            raise field_error("settings", f"{name} must be 'failed' or 'cancelled', not {item!r}")
    return value


def validate_event_matcher(value: Any, *, required: bool) -> dict:
    value = validate_json_object("event_matcher", value)
    if not required and not value:
        return {}
    unknown = [k for k in value if k not in _EVENT_MATCHER_KEYS]
    if unknown:
        raise field_error("event_matcher", f"event_matcher.{unknown[0]} is not known; an event matcher has source, name and filters")
    for key in ("source", "name"):
        item = value.get(key)
        if not isinstance(item, str) or not item.strip():
            raise field_error("event_matcher", f"event_matcher.{key} is required (non-empty text)")
    filters = value.get("filters")
    if filters is not None and not isinstance(filters, dict):
        raise field_error("event_matcher", f"event_matcher.filters must be a JSON object, not {type(filters).__name__}")
    return {"source": value["source"].strip(), "name": value["name"].strip(), "filters": filters or {}}


def validate_trigger_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Check a complete set of trigger fields (as `trigger_create` takes them) and return
    them normalised. Raises ValidationError naming the first bad field."""
    cleaned = dict(fields)
    if not isinstance(fields.get("pipeline"), Pipeline):
        raise field_error("pipeline", "pipeline is required")
    cleaned["name"] = clean_text("name", fields.get("name"), required=True)
    if not isinstance(fields.get("description", ""), str):
        raise field_error("description", "description must be text")
    jsonsafe.validate_text("description", fields.get("description") or "")
    cleaned["schedule_type"] = clean_choice("schedule_type", fields.get("schedule_type"), ScheduleType.values)
    cleaned["status"] = clean_choice("status", fields.get("status"), TriggerStatus.values)
    cleaned["timezone"] = clean_timezone("timezone", fields.get("timezone") or "UTC")
    interval = fields.get("schedule_interval") or ""
    if cleaned["schedule_type"] == ScheduleType.TIME and not (isinstance(interval, str) and interval.strip()):
        raise field_error("schedule_interval", "a time trigger needs a schedule interval (a preset such as @daily, or a cron expression)")
    # Event and API triggers have no schedule; one given anyway must still be valid.
    cleaned["schedule_interval"] = clean_interval("schedule_interval", interval) if interval else ""
    start = fields.get("start_time")
    cleaned["start_time"] = None if start is None else clean_datetime("start_time", start, cleaned["timezone"])
    cleaned["variables"] = validate_json_object("variables", fields.get("variables"))
    cleaned["settings"] = validate_settings(fields.get("settings"))
    cleaned["event_matcher"] = validate_event_matcher(
        fields.get("event_matcher"), required=cleaned["schedule_type"] == ScheduleType.EVENT,
    )
    return cleaned

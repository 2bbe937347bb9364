"""Events: recording one, and starting a run of every active event trigger it matches."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from django.db import transaction

from runs.models import PipelineRun, RunType
from triggers.models import Event, ScheduleType, Trigger, TriggerStatus
from triggers.services.triggers import trigger_create_run
from triggers.services.validation import clean_text, validate_json_object

log = logging.getLogger(__name__)


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
    source = clean_text("source", source, required=True)
    name = clean_text("name", name, required=True)
    payload = validate_json_object("payload", payload)
    user = created_by if getattr(created_by, "pk", None) else None
    with transaction.atomic():
        event = Event.objects.create(source=source, name=name, payload=payload, created_by=user)
        candidates = Trigger.objects.filter(
            schedule_type=ScheduleType.EVENT, status=TriggerStatus.ACTIVE,
            event_matcher__source=source, event_matcher__name=name,
        ).select_related("pipeline").order_by("id")
        runs: list[PipelineRun] = []
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

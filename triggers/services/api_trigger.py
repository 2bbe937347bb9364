"""The API trigger: its secret token, and firing a run from
`POST /api/pipeline_schedules/<id>/pipeline_runs/<token>`."""

from __future__ import annotations

import hmac
import time
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone as djtz

from runs.models import PipelineRun, RunType
from triggers.models import ApiRequest, ScheduleType, Trigger, new_token
from triggers.services.triggers import trigger_create_run
from triggers.services.validation import clean_text, validate_json_object

# How long a request that lost an idempotency-key race waits for the winner's run.
_IDEMPOTENCY_WAIT = 10.0


class TriggerNotFound(Exception):
    """No trigger with that id (API answers 404)."""


class TokenRejected(Exception):
    """Wrong or missing API-trigger token (API answers 403)."""


class TriggerInactive(Exception):
    """The trigger is paused (API answers 409)."""


def trigger_rotate_token(trigger: Trigger) -> str:
    """A new token; the old one stops working at once. Returns the new token."""
    token = new_token()
    Trigger.objects.filter(pk=trigger.pk).update(token=token, updated_at=djtz.now())
    trigger.token = token
    return token


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
    key = clean_text("idempotency_key", idempotency_key, required=False)
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

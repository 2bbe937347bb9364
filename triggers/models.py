"""Triggers (time schedules, events, API calls), backfills and recorded events.

A trigger only ever creates runs; what happens to a run afterwards belongs to
`runs.orchestrator`.
"""

from __future__ import annotations

import secrets

from django.conf import settings as conf
from django.db import models

from pipelines.models import Pipeline


def new_token() -> str:
    return secrets.token_urlsafe(32)


class ScheduleType(models.TextChoices):
    TIME = "time"
    EVENT = "event"
    API = "api"


class TriggerStatus(models.TextChoices):
    ACTIVE = "active"
    INACTIVE = "inactive"


class Trigger(models.Model):
    """Mage's "pipeline schedule". `settings` holds Mage's trigger settings:
    `skip_if_previous_running`, `create_initial_pipeline_run`, `timeout` (seconds),
    `timeout_status` (`failed` | `cancelled`), `sla` (seconds), `catch_up`."""

    pipeline = models.ForeignKey(Pipeline, on_delete=models.CASCADE, related_name="triggers")
    name = models.CharField(max_length=255)
    description = models.TextField(blank=True, default="")
    schedule_type = models.CharField(max_length=8, choices=ScheduleType.choices, default=ScheduleType.TIME)
    status = models.CharField(max_length=8, choices=TriggerStatus.choices, default=TriggerStatus.INACTIVE)
    start_time = models.DateTimeField(null=True, blank=True)
    # `@once`, `@hourly`, `@daily`, `@weekly`, `@monthly`, `@always_on` or a 5-field cron.
    schedule_interval = models.CharField(max_length=100, blank=True, default="")
    # IANA zone in which cron fields and presets are read (time triggers).
    timezone = models.CharField(max_length=64, default="UTC")
    variables = models.JSONField(default=dict, blank=True)
    settings = models.JSONField(default=dict, blank=True)
    # Event triggers: {"source": str, "name": str, "filters": {payload key: value}}.
    event_matcher = models.JSONField(default=dict, blank=True)
    # API triggers: stored, so it survives restarts and deploys; rotated on request.
    token = models.CharField(max_length=64, default=new_token)
    # The next logical time this time trigger is due (UTC); NULL when it never fires
    # again. Only the scheduler and the services write it.
    next_run_at = models.DateTimeField(null=True, blank=True)
    last_run_at = models.DateTimeField(null=True, blank=True)
    # Why the scheduler could not evaluate this trigger (empty when healthy).
    error = models.TextField(blank=True, default="")
    created_by = models.ForeignKey(
        conf.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["pipeline_id", "name", "id"]
        indexes = [
            # The scheduler's one query: active time triggers that are due.
            models.Index(
                fields=["next_run_at"], name="trigger_due",
                condition=models.Q(status="active", schedule_type="time"),
            ),
            models.Index(fields=["pipeline", "status"], name="trigger_pipeline_status"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.schedule_type}, {self.status})"

    @property
    def is_active(self) -> bool:
        return self.status == TriggerStatus.ACTIVE


class BackfillStatus(models.TextChoices):
    INITIAL = "initial"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Backfill(models.Model):
    """One run per logical date from `start_datetime` to `end_datetime` (inclusive) every
    `interval` (a preset or a cron expression)."""

    pipeline = models.ForeignKey(Pipeline, on_delete=models.CASCADE, related_name="backfills")
    name = models.CharField(max_length=255, blank=True, default="")
    start_datetime = models.DateTimeField()
    end_datetime = models.DateTimeField()
    interval = models.CharField(max_length=100)
    timezone = models.CharField(max_length=64, default="UTC")
    variables = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=BackfillStatus.choices, default=BackfillStatus.INITIAL)
    total_runs = models.PositiveIntegerField(default=0)
    created_by = models.ForeignKey(
        conf.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        # The pipeline's uuid, not its database id: this is the admin's page title.
        return f"backfill {self.pk} of {self.pipeline.uuid if self.pipeline_id else '?'} ({self.status})"


class Event(models.Model):
    """An event received by `POST /api/events/`, kept with the runs it started."""

    source = models.CharField(max_length=255)
    name = models.CharField(max_length=255)
    payload = models.JSONField(default=dict, blank=True)
    runs = models.ManyToManyField("runs.PipelineRun", blank=True, related_name="events")
    created_by = models.ForeignKey(
        conf.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["source", "name", "-created_at"], name="event_source_name")]

    def __str__(self) -> str:
        return f"{self.source}/{self.name} at {self.created_at:%Y-%m-%d %H:%M:%S}"


class ApiRequest(models.Model):
    """An API-trigger call made with an `Idempotency-Key`: the unique constraint makes a
    retried or concurrent POST with the same key find the first call's run."""

    trigger = models.ForeignKey(Trigger, on_delete=models.CASCADE, related_name="api_requests")
    key = models.CharField(max_length=255)
    run = models.ForeignKey("runs.PipelineRun", null=True, on_delete=models.CASCADE, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["trigger", "key"], name="apirequest_unique_key")]

    def __str__(self) -> str:
        return f"API call {self.key!r} to trigger {self.trigger.name if self.trigger_id else '?'}"

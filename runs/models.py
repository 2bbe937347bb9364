from __future__ import annotations

from django.conf import settings
from django.db import models

from pipelines.models import Pipeline


class PipelineRunStatus(models.TextChoices):
    INITIAL = "initial"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class BlockRunStatus(models.TextChoices):
    INITIAL = "initial"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UPSTREAM_FAILED = "upstream_failed"
    CONDITION_FAILED = "condition_failed"


class RunType(models.TextChoices):
    MANUAL = "manual"
    SCHEDULED = "scheduled"
    API = "api"
    EVENT = "event"
    BACKFILL = "backfill"


RUN_TERMINAL = frozenset({PipelineRunStatus.COMPLETED, PipelineRunStatus.FAILED, PipelineRunStatus.CANCELLED})
BLOCK_ACTIVE = frozenset({BlockRunStatus.QUEUED, BlockRunStatus.RUNNING})
BLOCK_TERMINAL = frozenset(
    {
        BlockRunStatus.COMPLETED,
        BlockRunStatus.FAILED,
        BlockRunStatus.CANCELLED,
        BlockRunStatus.UPSTREAM_FAILED,
        BlockRunStatus.CONDITION_FAILED,
    }
)


class PipelineRun(models.Model):
    pipeline = models.ForeignKey(Pipeline, on_delete=models.CASCADE, related_name="runs")
    status = models.CharField(max_length=16, choices=PipelineRunStatus.choices, default=PipelineRunStatus.INITIAL)
    run_type = models.CharField(max_length=16, choices=RunType.choices, default=RunType.MANUAL)
    execution_date = models.DateTimeField(null=True, blank=True)
    variables = models.JSONField(default=dict, blank=True)
    event = models.JSONField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    passed_sla = models.BooleanField(default=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    metrics = models.JSONField(default=dict, blank=True)
    # What started the run. String references: `runs` never imports `triggers`.
    trigger = models.ForeignKey("triggers.Trigger", null=True, blank=True, on_delete=models.SET_NULL, related_name="runs")
    backfill = models.ForeignKey("triggers.Backfill", null=True, blank=True, on_delete=models.SET_NULL, related_name="runs")
    # Copied from the trigger when the run is created, so the scheduler's timeout and SLA
    # checks read only runs. Seconds from the run's start; NULL: none.
    timeout = models.PositiveIntegerField(null=True, blank=True)
    timeout_status = models.CharField(max_length=16, blank=True, default="")
    sla = models.PositiveIntegerField(null=True, blank=True)
    # Set while the run waits in `initial` for a slot of its pipeline's
    # `pipeline_run_limit`; such runs start oldest first when a run of the pipeline ends.
    waiting_for_run_slot = models.BooleanField(default=False)
    # Set when ready blocks of this run wait for a slot of the global concurrency limit,
    # so that a block finishing in another run knows to advance this one.
    waiting_for_slot = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["-created_at"], name="pipelinerun_created"),
            models.Index(fields=["status", "-created_at"], name="pipelinerun_status_created"),
            models.Index(fields=["pipeline", "-created_at"], name="pipelinerun_pipeline_created"),
            models.Index(fields=["pipeline", "status"], name="pipelinerun_pipeline_status"),
            models.Index(
                fields=["created_at"], name="pipelinerun_waiting_slot",
                condition=models.Q(waiting_for_slot=True),
            ),
            models.Index(
                fields=["pipeline", "created_at"], name="pipelinerun_waiting_run_slot",
                condition=models.Q(waiting_for_run_slot=True),
            ),
            models.Index(fields=["trigger", "-created_at"], name="pipelinerun_trigger_created"),
        ]
        constraints = [
            # One scheduled run per trigger and logical time, whatever the number of
            # schedulers (the scheduler relies on this, not on a check before insert).
            models.UniqueConstraint(
                fields=["trigger", "execution_date"], name="pipelinerun_unique_schedule",
                condition=models.Q(run_type="scheduled"),
            ),
        ]

    def __str__(self) -> str:
        # The pipeline's uuid, not its database id: this is the admin's page title.
        return f"run {self.pk} of {self.pipeline.uuid if self.pipeline_id else '?'} ({self.status})"

    @property
    def is_terminal(self) -> bool:
        return self.status in RUN_TERMINAL

    @property
    def duration(self) -> float | None:
        if self.started_at and self.completed_at:
            return (self.completed_at - self.started_at).total_seconds()
        return None


class BlockRun(models.Model):
    # Every status change of a block run writes a new row version into each index of this
    # table, so it has no index it does not need: the run's own lookups use the
    # (pipeline_run, status) index, and only dynamic children are indexed by parent.
    pipeline_run = models.ForeignKey(PipelineRun, on_delete=models.CASCADE, related_name="block_runs", db_index=False)
    block_uuid = models.CharField(max_length=255)
    block_type = models.CharField(max_length=32, blank=True, default="")
    status = models.CharField(max_length=20, choices=BlockRunStatus.choices, default=BlockRunStatus.INITIAL)
    attempt = models.PositiveIntegerField(default=0)
    # The attempt that currently owns this block run; its writes count only while it
    # still holds the claim (fencing against a redelivered task).
    claim = models.CharField(max_length=32, blank=True, default="")
    queued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # Set while a failed attempt waits for its automatic retry (the block run is back in
    # `initial`); the orchestrator queues it when the time comes, no worker sleeps.
    next_retry_at = models.DateTimeField(null=True, blank=True)
    # Earlier attempts, oldest first: [{"attempt", "status", "error", "traceback",
    # "started_at", "completed_at", "worker"}]; the row itself holds the latest.
    attempts = models.JSONField(default=list, blank=True)
    # `attempt` when the block run was last retried by hand: automatic retries count the
    # attempts since then, so a manual retry gets the full `retries` again.
    attempt_base = models.PositiveIntegerField(default=0)
    worker = models.CharField(max_length=255, blank=True, default="")
    error = models.TextField(blank=True, default="")
    traceback = models.TextField(blank=True, default="")
    code_hash = models.CharField(max_length=16, blank=True, default="")
    # [{"name": "output_0", "kind": "dataframe"|"json"|"pickle", "key": ..., "shape": ..., "columns": ...}]
    outputs = models.JSONField(default=list, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    dynamic_parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="dynamic_children", db_index=False,
    )
    dynamic_index = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["pipeline_run_id", "id"]
        indexes = [
            # The global concurrency count and the reconcile pass read only active rows.
            models.Index(
                fields=["status", "heartbeat_at"], name="blockrun_active",
                condition=models.Q(status__in=["queued", "running"]),
            ),
            models.Index(fields=["pipeline_run", "status"], name="blockrun_run_status"),
            models.Index(fields=["status", "-created_at"], name="blockrun_status_created"),
            models.Index(
                fields=["next_retry_at"], name="blockrun_retry_due",
                condition=models.Q(next_retry_at__isnull=False),
            ),
            models.Index(
                fields=["dynamic_parent"], name="blockrun_dynamic_parent",
                condition=models.Q(dynamic_parent__isnull=False),
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["pipeline_run", "block_uuid"], name="blockrun_one_per_block",
                condition=models.Q(dynamic_parent__isnull=True),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.block_uuid} in run {self.pipeline_run_id} ({self.status})"

    @property
    def duration(self) -> float | None:
        if self.started_at and self.completed_at:
            return (self.completed_at - self.started_at).total_seconds()
        return None


class LogEntry(models.Model):
    pipeline_run = models.ForeignKey(PipelineRun, on_delete=models.CASCADE, related_name="logs")
    block_run = models.ForeignKey(BlockRun, null=True, blank=True, on_delete=models.CASCADE, related_name="logs")
    timestamp = models.DateTimeField()
    level = models.CharField(max_length=10, default="INFO")
    message = models.TextField()
    block_uuid = models.CharField(max_length=255, blank=True, default="")
    block_type = models.CharField(max_length=32, blank=True, default="")
    # Which attempt of the block run wrote the line (0: the run itself).
    attempt = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["id"]
        verbose_name_plural = "log entries"
        indexes = [
            models.Index(fields=["pipeline_run", "id"], name="logentry_run"),
            models.Index(fields=["pipeline_run", "block_uuid", "id"], name="logentry_run_block"),
            models.Index(fields=["-timestamp"], name="logentry_time"),
        ]

    def __str__(self) -> str:
        return f"[{self.level}] {self.message[:80]}"


class RunAction(models.Model):
    """The audit trail of a run: who retried or cancelled it, when, and what changed."""

    class Kind(models.TextChoices):
        RETRY = "retry"
        RETRY_INCOMPLETE = "retry_incomplete"
        RETRY_FROM_BLOCK = "retry_from_block"
        CANCEL = "cancel"
        CANCEL_BLOCK = "cancel_block"

    pipeline_run = models.ForeignKey(PipelineRun, on_delete=models.CASCADE, related_name="actions")
    action = models.CharField(max_length=32, choices=Kind.choices)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # What the action changed, e.g. {"block_runs": ["load", "clean"], "block_uuid": "clean"}.
    detail = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["pipeline_run", "id"], name="runaction_run")]

    def __str__(self) -> str:
        return f"{self.action} of run {self.pipeline_run_id} at {self.created_at:%Y-%m-%d %H:%M:%S}"


class HeartbeatKind(models.TextChoices):
    CLUSTER = "cluster"
    SCHEDULER = "scheduler"


class Heartbeat(models.Model):
    """A long-running Millrace process that says it is alive: a worker cluster (`manage.py
    qcluster`) or a scheduler. A cluster's row names it in the `worker` label of every
    block run it claims, so that when its heartbeat stops the reconcile pass knows which
    block runs and tasks it took with it. A clean stop deletes the row."""

    kind = models.CharField(max_length=16, choices=HeartbeatKind.choices)
    # The cluster's id (in block runs' worker labels), or a scheduler's host:pid.
    name = models.CharField(max_length=64)
    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    beat_at = models.DateTimeField()
    # Set when the process began a clean stop (it drains, then deletes its row).
    stopping_since = models.DateTimeField(null=True, blank=True)
    # What the process says about itself: worker count, broker, grace, last tick's counts.
    info = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["kind", "host", "pid"]
        constraints = [models.UniqueConstraint(fields=["kind", "name"], name="heartbeat_unique_name")]

    def __str__(self) -> str:
        return f"{self.kind} {self.name} on {self.host} (pid {self.pid})"

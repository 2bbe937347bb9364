from __future__ import annotations

import hashlib

from django.db import models


def content_hash(content: str) -> str:
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


class PipelineType(models.TextChoices):
    PYTHON = "python"
    STREAMING = "streaming"


class BlockType(models.TextChoices):
    DATA_LOADER = "data_loader"
    TRANSFORMER = "transformer"
    DATA_EXPORTER = "data_exporter"
    SENSOR = "sensor"
    CUSTOM = "custom"
    SCRATCHPAD = "scratchpad"
    CHART = "chart"
    MARKDOWN = "markdown"
    CONDITIONAL = "conditional"
    CALLBACK = "callback"


# Blocks of these types are part of the editor, not of a run (as in Mage).
NON_EXECUTABLE_TYPES = frozenset({BlockType.SCRATCHPAD, BlockType.CHART, BlockType.MARKDOWN})


class BlockLanguage(models.TextChoices):
    PYTHON = "python"
    SQL = "sql"
    R = "r"
    MARKDOWN = "markdown"
    YAML = "yaml"


class Pipeline(models.Model):
    uuid = models.SlugField(max_length=255, unique=True)
    name = models.CharField(max_length=255)
    description = models.TextField(blank=True, default="")
    tags = models.JSONField(default=list, blank=True)
    type = models.CharField(max_length=32, choices=PipelineType.choices, default=PipelineType.PYTHON)
    variables = models.JSONField(default=dict, blank=True)
    # {"block_run_limit": int, "pipeline_run_limit": int}
    concurrency_config = models.JSONField(default=dict, blank=True)
    # {"retries": int, "delay": s, "exponential_backoff": bool, "max_delay": s}
    retry_config = models.JSONField(default=dict, blank=True)
    cache_block_output_in_memory = models.BooleanField(default=False)
    run_pipeline_in_one_process = models.BooleanField(default=False)
    notification_config = models.JSONField(default=dict, blank=True)
    # Keys of a Mage metadata.yaml that Millrace does not interpret, kept so that an
    # export writes back what was imported.
    extra = models.JSONField(default=dict, blank=True)
    # Bumped by the services on every change to the pipeline's blocks or edges, so that
    # workers can keep the definition in memory and know when to read it again.
    version = models.PositiveIntegerField(default=1, editable=False)
    # Fingerprint of the definition as it stood right after its last import from a Mage
    # project (mage_format.definition_hash), empty if never imported: `import_mage_project
    # --keep-edited` leaves a pipeline alone once its definition no longer matches.
    # Millrace's own bookkeeping, never exported.
    imported_hash = models.CharField(max_length=64, blank=True, default="", editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["uuid"]

    def __str__(self) -> str:
        return self.uuid

    @property
    def block_run_limit(self) -> int | None:
        value = (self.concurrency_config or {}).get("block_run_limit")
        return int(value) if value else None

    @property
    def pipeline_run_limit(self) -> int | None:
        value = (self.concurrency_config or {}).get("pipeline_run_limit")
        return int(value) if value else None


class Block(models.Model):
    pipeline = models.ForeignKey(Pipeline, on_delete=models.CASCADE, related_name="blocks")
    uuid = models.SlugField(max_length=255)
    name = models.CharField(max_length=255, blank=True, default="")
    type = models.CharField(max_length=32, choices=BlockType.choices)
    language = models.CharField(max_length=16, choices=BlockLanguage.choices, default=BlockLanguage.PYTHON)
    content = models.TextField(blank=True, default="")
    content_hash = models.CharField(max_length=16, blank=True, default="")
    configuration = models.JSONField(default=dict, blank=True)
    retry_config = models.JSONField(null=True, blank=True)
    timeout = models.PositiveIntegerField(null=True, blank=True, help_text="seconds")
    # The block's place in the pipeline's metadata.yaml (and the editor's order).
    position = models.PositiveIntegerField(default=0)
    extra = models.JSONField(default=dict, blank=True)
    upstreams: models.ManyToManyField[Block, BlockEdge] = models.ManyToManyField(
        "self", through="BlockEdge", through_fields=("downstream", "upstream"),
        symmetrical=False, related_name="downstreams",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["pipeline_id", "position", "id"]
        constraints = [
            models.UniqueConstraint(fields=["pipeline", "uuid"], name="block_uuid_unique_in_pipeline"),
        ]

    def __str__(self) -> str:
        return f"{self.pipeline_label}/{self.uuid}"

    @property
    def pipeline_label(self) -> str:
        """The pipeline's uuid for titles (a query unless select_related); a block not
        yet attached to a pipeline, or whose pipeline is gone, still has a title."""
        if self.pipeline_id is None:
            return "(no pipeline)"
        try:
            return self.pipeline.uuid
        except Pipeline.DoesNotExist:
            return f"(pipeline #{self.pipeline_id})"

    @property
    def executable(self) -> bool:
        return self.type not in NON_EXECUTABLE_TYPES


class BlockEdge(models.Model):
    """An edge upstream -> downstream. `position` orders a block's upstreams, which is
    the order of the positional arguments its function receives."""

    downstream = models.ForeignKey(Block, on_delete=models.CASCADE, related_name="upstream_edges")
    upstream = models.ForeignKey(Block, on_delete=models.CASCADE, related_name="downstream_edges")
    position = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["downstream_id", "position"]
        constraints = [
            models.UniqueConstraint(fields=["downstream", "upstream"], name="block_edge_unique"),
            models.CheckConstraint(condition=~models.Q(downstream=models.F("upstream")), name="block_edge_no_self_loop"),
        ]

    def __str__(self) -> str:
        # Both ends are in one pipeline (the services refuse anything else), so it is
        # named once: "etl: load -> clean".
        down = _block_or_none(self, "downstream")
        up = _block_or_none(self, "upstream")
        pipeline = down.pipeline_label if down else up.pipeline_label if up else "(no pipeline)"
        return f"{pipeline}: {up.uuid if up else '?'} -> {down.uuid if down else '?'}"


def _block_or_none(edge: BlockEdge, end: str) -> Block | None:
    try:
        return getattr(edge, end)
    except Block.DoesNotExist:
        return None

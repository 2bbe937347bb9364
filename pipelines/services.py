"""Every write to pipelines and blocks goes through here, so the admin, the import, the
API and the pages all refuse the same bad input with the same message."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import F

from config.common import jsonsafe, limits
from pipelines import dag
from pipelines.execution.checks import BlockCodeError, check_python_syntax
from pipelines.models import Block, BlockEdge, BlockLanguage, BlockType, Pipeline, content_hash
from pipelines.selectors import pipeline_graph

PIPELINE_FIELDS = (
    "name", "description", "tags", "type", "variables", "concurrency_config", "retry_config",
    "cache_block_output_in_memory", "run_pipeline_in_one_process", "notification_config", "extra",
)
BLOCK_FIELDS = ("name", "type", "language", "content", "configuration", "retry_config", "timeout", "position", "extra")


def _check_json_object(field: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise ValidationError({field: f"{field} must be a JSON object, not {type(value).__name__}"})
    jsonsafe.validate(field, value)


def _check_texts(fields: Mapping[str, Any], names: Sequence[str]) -> None:
    # A NUL or a lone surrogate would fail the save on PostgreSQL (or the page that
    # shows it): refused here, naming the field, like any other bad value.
    for name in names:
        if isinstance(fields.get(name), str):
            jsonsafe.validate_text(name, fields[name])


def validate_pipeline_fields(fields: Mapping[str, Any]) -> None:
    """Every pipeline field that is given: JSON fields are objects (tags a list) that
    both databases store as they are (config.common.jsonsafe), and the settings stay
    within config.common.limits. Raises ValidationError naming the field."""
    _check_texts(fields, ("name", "description"))
    for name in ("variables", "concurrency_config", "notification_config", "extra"):
        if name in fields and fields[name] is not None:
            _check_json_object(name, fields[name])
    if "tags" in fields:
        if not isinstance(fields["tags"], list):
            raise ValidationError({"tags": "tags must be a list"})
        jsonsafe.validate("tags", fields["tags"])
    if fields.get("concurrency_config") is not None:
        limits.validate_concurrency_config("concurrency_config", fields["concurrency_config"])
    if fields.get("retry_config") is not None:
        _check_json_object("retry_config", fields["retry_config"])
        limits.validate_retry_config("retry_config", fields["retry_config"])


def validate_block_fields(fields: Mapping[str, Any], *, label: str = "block") -> None:
    """Every block field that is given, as `validate_pipeline_fields` does, plus the
    type, the language, a timeout within limits.MAX_SECONDS and, for Python, the
    code's syntax. `label` (`transformer/clean`) starts the messages."""
    if "type" in fields and fields["type"] not in BlockType.values:
        raise ValidationError({"type": f"{label}: unknown block type {fields['type']!r}; expected one of {', '.join(BlockType.values)}"})
    if "language" in fields and fields["language"] not in BlockLanguage.values:
        raise ValidationError({"language": f"{label}: unknown language {fields['language']!r}"})
    try:
        _check_block_values(fields)
    except ValidationError as exc:  # which block, for an import of many
        raise ValidationError({k: [f"{label}: {m}" for m in msgs] for k, msgs in exc.message_dict.items()}) from None
    if fields.get("timeout") is not None:
        limits.validate_seconds("timeout", fields["timeout"], name=f"{label}: timeout", minimum=1)
    if fields.get("language", BlockLanguage.PYTHON) == BlockLanguage.PYTHON and "content" in fields:
        try:
            check_python_syntax(fields["content"] or "", filename=label)
        except BlockCodeError as exc:
            raise ValidationError({"content": str(exc)}) from None


def _check_block_values(fields: Mapping[str, Any]) -> None:
    _check_texts(fields, ("name", "content"))
    for name in ("configuration", "extra"):
        if name in fields and fields[name] is not None:
            _check_json_object(name, fields[name])
    if fields.get("retry_config") is not None:
        _check_json_object("retry_config", fields["retry_config"])
        limits.validate_retry_config("retry_config", fields["retry_config"])


def pipeline_create(*, uuid: str, name: str = "", **fields: Any) -> Pipeline:
    validate_pipeline_fields(fields)
    pipeline = Pipeline(uuid=uuid, name=name or uuid, **fields)
    pipeline.full_clean()
    pipeline.save()
    return pipeline


def pipeline_update(pipeline: Pipeline, **fields: Any) -> Pipeline:
    validate_pipeline_fields(fields)
    for key, value in fields.items():
        if key not in PIPELINE_FIELDS:
            raise ValidationError({key: f"Unknown pipeline field {key!r}"})
        setattr(pipeline, key, value)
    pipeline.full_clean()
    pipeline.save()
    return pipeline


def _bump_version(pipeline_id: int) -> None:
    Pipeline.objects.filter(pk=pipeline_id).update(version=F("version") + 1)


def block_create(*, pipeline: Pipeline, uuid: str, type: str, upstream_blocks: Sequence[str] = (), **fields: Any) -> Block:
    """Create a block and its upstream edges; refuses bad code and a cycle."""
    fields = {"type": type, **fields}
    validate_block_fields(fields, label=f"{type}/{uuid}")
    with transaction.atomic():
        block = Block(pipeline=pipeline, uuid=uuid, **fields)
        block.content_hash = content_hash(block.content)
        if "position" not in fields:
            block.position = pipeline.blocks.count()
        block.full_clean()
        block.save()
        _bump_version(pipeline.pk)
        if upstream_blocks:
            block_set_upstreams(block, upstream_blocks)
    return block


def block_update(block: Block, *, upstream_blocks: Sequence[str] | None = None, **fields: Any) -> Block:
    merged = {"language": block.language, **fields}
    validate_block_fields(merged, label=f"{fields.get('type', block.type)}/{block.uuid}")
    with transaction.atomic():
        for key, value in fields.items():
            if key not in BLOCK_FIELDS:
                raise ValidationError({key: f"Unknown block field {key!r}"})
            setattr(block, key, value)
        block.content_hash = content_hash(block.content)
        block.full_clean()
        block.save()
        _bump_version(block.pipeline_id)
        if upstream_blocks is not None:
            block_set_upstreams(block, upstream_blocks)
    return block


def block_set_upstreams(block: Block, upstream_blocks: Sequence[str]) -> None:
    """Replace the block's upstream edges, in the order given. Refuses an unknown block,
    a block listed twice, and an edge that would close a cycle (naming the cycle)."""
    if len(set(upstream_blocks)) != len(upstream_blocks):
        raise ValidationError({"upstream_blocks": f"{block.uuid}: an upstream block is listed twice: {list(upstream_blocks)}"})
    with transaction.atomic():
        by_uuid = {b.uuid: b for b in Block.objects.select_for_update().filter(pipeline_id=block.pipeline_id)}
        missing = [u for u in upstream_blocks if u not in by_uuid]
        if missing:
            raise ValidationError({"upstream_blocks": f"{block.uuid}: unknown upstream block(s): {', '.join(missing)}"})
        graph = pipeline_graph(block.pipeline_id)
        graph[block.uuid] = list(upstream_blocks)
        try:
            dag.check_acyclic(graph)
        except dag.CycleError as exc:
            raise ValidationError({"upstream_blocks": str(exc)}) from None
        BlockEdge.objects.filter(downstream=block).delete()
        BlockEdge.objects.bulk_create(
            BlockEdge(downstream=block, upstream=by_uuid[u], position=i) for i, u in enumerate(upstream_blocks)
        )
        _bump_version(block.pipeline_id)


def block_delete(block: Block) -> None:
    with transaction.atomic():
        block.delete()
        _bump_version(block.pipeline_id)

"""Importing a Mage project: its pipelines, read and checked first (reading.py), are
then written in one transaction through the services, which check again, so a broken
project changes nothing.

`project_import(..., keep_edited=True)` (what `make run` does with examples/) leaves
alone a pipeline changed in Millrace since its last import, told by the fingerprint of
its definition recorded at that import (hashing.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from django.core.exceptions import ValidationError
from django.db import transaction

from pipelines import services
from pipelines.mage_format.hashing import definition_hash
from pipelines.mage_format.layout import MageFormatError
from pipelines.mage_format.reading import PipelineDef, read_project
from pipelines.models import Block, Pipeline


@dataclass
class ImportResult:
    imported: list[Pipeline] = field(default_factory=list)
    # (pipeline uuid, why it was left as it is), with keep_edited only
    kept: list[tuple[str, str]] = field(default_factory=list)


def import_project(path: str | Path) -> list[Pipeline]:
    """Create or update every pipeline of the Mage project at `path`, all or nothing.
    An existing pipeline keeps its row (and its runs); its blocks and edges become the
    file's. Raises MageFormatError, naming the file, and then changes nothing."""
    return project_import(path).imported


def project_import(path: str | Path, *, keep_edited: bool = False) -> ImportResult:
    """`import_project`, and with `keep_edited` a pipeline changed in Millrace since its
    last import (or never imported) is left as it is and listed in `kept`, so that
    `make run` can import the examples every time without undoing a user's edits. Still
    all or nothing: every file is read and checked before the first write."""
    definitions = read_project(path)
    result = ImportResult()
    with transaction.atomic():
        for definition in definitions:
            reason = _why_keep(definition.uuid) if keep_edited else None
            if reason is None:
                result.imported.append(_save_pipeline(definition))
            else:
                result.kept.append((definition.uuid, reason))
    return result


def _why_keep(uuid: str) -> str | None:
    """Why the pipeline `uuid` must not be overwritten, or None when it is absent or
    unchanged since its last import. Locks its row until the import commits, so that
    two imports never both decide from the same state."""
    pipeline = Pipeline.objects.select_for_update().filter(uuid=uuid).first()
    if pipeline is None:
        return None
    if not pipeline.imported_hash:
        return "not made by an import (or imported before Millrace recorded imports)"
    try:
        unchanged = definition_hash(pipeline) == pipeline.imported_hash
    except MageFormatError:  # it no longer exports (a block path edited), so it was edited
        unchanged = False
    return None if unchanged else "changed since it was imported"


def _save_pipeline(definition: PipelineDef) -> Pipeline:
    """1. Create or update the pipeline row.
    2. Delete the blocks the file no longer lists; update or create the others.
    3. Clear every edge, then set each block's upstreams in the file's order. Clearing
       first means an edge the file reverses never looks like a cycle half-way."""
    label = definition.source
    try:
        pipeline = Pipeline.objects.select_for_update().filter(uuid=definition.uuid).first()
        fields = dict(definition.fields, name=definition.fields["name"] or definition.uuid)
        if pipeline is None:
            pipeline = services.pipeline_create(uuid=definition.uuid, **fields)
        else:
            pipeline = services.pipeline_update(pipeline, **fields)
        current = {b.uuid: b for b in Block.objects.filter(pipeline=pipeline)}
        wanted = {b.uuid for b in definition.blocks}
        for uuid, block in current.items():
            if uuid not in wanted:
                services.block_delete(block)
        saved: dict[str, Block] = {}
        for block_def in definition.blocks:
            existing = current.get(block_def.uuid)
            if existing is None:
                saved[block_def.uuid] = services.block_create(pipeline=pipeline, uuid=block_def.uuid, **block_def.fields)
            else:
                services.block_set_upstreams(existing, [])
                saved[block_def.uuid] = services.block_update(existing, **block_def.fields)
        for block_def in definition.blocks:
            if block_def.upstreams:
                services.block_set_upstreams(saved[block_def.uuid], block_def.upstreams)
    except ValidationError as exc:
        raise MageFormatError(f"{label}: {_validation_message(exc)}") from None
    # Read back from the database (jsonb reorders keys) so that the next import compares
    # like with like. The import's own bookkeeping, not a user's write: no service.
    pipeline.imported_hash = definition_hash(pipeline)
    Pipeline.objects.filter(pk=pipeline.pk).update(imported_hash=pipeline.imported_hash)
    return pipeline


def _validation_message(exc: ValidationError) -> str:
    if hasattr(exc, "error_dict"):
        return "; ".join(f"{key}: {' '.join(messages)}" for key, messages in exc.message_dict.items())
    return " ".join(exc.messages)

"""Exporting a pipeline to Mage's format: its metadata.yaml (the Mage keys kept at
import, then Millrace's fields) and the code file of every block, so that a project
survives import -> export -> import unchanged."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from pipelines import dag
from pipelines.mage_format.layout import (
    FILES_KEY,
    METADATA,
    PIPELINES_DIR,
    PROJECT_METADATA,
    export_path,
    safe_relpath,
)
from pipelines.models import Block, Pipeline
from pipelines.selectors import pipeline_graph


def pipeline_to_dict(pipeline: Pipeline) -> dict[str, Any]:
    """The pipeline's metadata.yaml as a dict: the kept Mage keys, then Millrace's fields."""
    blocks = list(Block.objects.filter(pipeline=pipeline).order_by("position", "id"))
    graph = pipeline_graph(pipeline.pk)
    downstreams = dag.downstream_map(graph)
    data: dict[str, Any] = {k: v for k, v in (pipeline.extra or {}).items() if k != FILES_KEY}
    data.update(
        uuid=pipeline.uuid,
        name=pipeline.name,
        description=pipeline.description or None,
        type=pipeline.type,
        tags=list(pipeline.tags or []),
        concurrency_config=pipeline.concurrency_config or {},
        retry_config=pipeline.retry_config or {},
        notification_config=pipeline.notification_config or {},
        cache_block_output_in_memory=pipeline.cache_block_output_in_memory,
        run_pipeline_in_one_process=pipeline.run_pipeline_in_one_process,
        blocks=[_block_to_dict(b, graph[b.uuid], downstreams.get(b.uuid, [])) for b in blocks],
    )
    if pipeline.variables:
        data["variables"] = pipeline.variables
    return data


def _block_to_dict(block: Block, upstreams: Sequence[str], downstreams: Sequence[str]) -> dict[str, Any]:
    data = dict(block.extra or {})
    data.update(
        uuid=block.uuid,
        name=block.name,
        type=block.type,
        language=block.language,
        upstream_blocks=list(upstreams),
        downstream_blocks=list(downstreams),
        configuration=block.configuration or {},
        retry_config=block.retry_config,
        timeout=block.timeout,
    )
    return data


def code_files(pipeline: Pipeline) -> dict[PurePosixPath, str]:
    """Every code file export writes for `pipeline`, by path in the project."""
    files: dict[PurePosixPath, str] = {}
    for block in Block.objects.filter(pipeline=pipeline).order_by("position", "id"):
        files[export_path(block)] = block.content
    for raw, content in ((pipeline.extra or {}).get(FILES_KEY) or {}).items():
        files.setdefault(safe_relpath(raw, f"pipeline {pipeline.uuid!r}"), content)
    return files


def _dump_yaml(data: dict[str, Any]) -> str:
    # Sorted keys and block style, as Mage writes its own files.
    return yaml.safe_dump(data, sort_keys=True, default_flow_style=False, allow_unicode=True)


def export_pipeline(pipeline: Pipeline, directory: str | Path) -> list[Path]:
    """Write `pipeline` into the Mage project at `directory` (created if need be) and
    return the files written. Other pipelines' files there are left alone; a block file
    of the same path is overwritten, since in Mage a block's code belongs to the project.
    The same pipeline always gives the same bytes."""
    root = Path(directory)
    pipeline = Pipeline.objects.get(pk=pipeline.pk)  # the stored values, not the caller's copy
    files = code_files(pipeline)
    folder = PurePosixPath(PIPELINES_DIR, pipeline.uuid)
    files[folder / METADATA] = _dump_yaml(pipeline_to_dict(pipeline))
    written = []
    for relpath, content in files.items():
        target = root / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode("utf-8"))
        written.append(target)
    # Mage's own layout: the project file and empty package markers, only where missing.
    defaults = {PurePosixPath(METADATA): PROJECT_METADATA, folder / "__init__.py": ""}
    for relpath in files:
        if relpath.suffix == ".py" and len(relpath.parts) > 1:
            defaults.setdefault(relpath.parent / "__init__.py", "")
    for relpath, content in defaults.items():
        target = root / relpath
        if not target.exists():
            target.write_text(content, encoding="utf-8")
            written.append(target)
    return written

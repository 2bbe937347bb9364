"""Mage's on-disk project format: import a project into pipelines and blocks, export a
pipeline back to it.

A Mage project is a folder with an optional project `metadata.yaml`, one folder per
pipeline under `pipelines/<uuid>/` holding its `metadata.yaml`, and the code of every
block in a folder per block type (`data_loaders/<uuid>.py`, `transformers/<uuid>.sql`...).

Import reads and checks every file first, with no database access, so that a broken file
is reported (naming the file and the problem) before anything is written; then it writes
every pipeline in one transaction through the services, which check again. Keys of a
metadata.yaml that Millrace does not interpret are kept in `extra` and written back by
export, so a project survives import -> export -> import unchanged.

A project may come from anyone: its YAML is read by config.common.safe_yaml (size,
aliases, depth and characters bounded, each refusal naming the file and line), code
files have MAX_CODE_BYTES, and every value must be one config.common.jsonsafe accepts,
refused naming the file and the key path.

Each imported pipeline records a fingerprint of its definition (`definition_hash`), so
that `project_import(..., keep_edited=True)` (what `make run` does with examples/) can
leave alone a pipeline changed in Millrace since its last import.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from django.core.exceptions import ValidationError
from django.db import transaction

from config.common import jsonsafe, safe_yaml
from pipelines import dag, services
from pipelines.execution.checks import BlockCodeError, check_python_syntax
from pipelines.models import Block, BlockLanguage, BlockType, Pipeline
from pipelines.selectors import pipeline_graph

METADATA = "metadata.yaml"
PIPELINES_DIR = "pipelines"

TYPE_DIRS = {
    BlockType.DATA_LOADER: "data_loaders", BlockType.TRANSFORMER: "transformers",
    BlockType.DATA_EXPORTER: "data_exporters", BlockType.CUSTOM: "custom", BlockType.SENSOR: "sensors",
    BlockType.SCRATCHPAD: "scratchpads", BlockType.CHART: "charts", BlockType.MARKDOWN: "markdowns",
    BlockType.CONDITIONAL: "conditionals", BlockType.CALLBACK: "callbacks",
}
EXTENSIONS = {
    BlockLanguage.PYTHON: "py", BlockLanguage.SQL: "sql", BlockLanguage.R: "r",
    BlockLanguage.MARKDOWN: "md", BlockLanguage.YAML: "yaml",
}

# Keys of a pipeline's metadata.yaml that map to Pipeline fields; every other key goes to
# Pipeline.extra. `blocks` become Block rows; `uuid` is the folder's name, as in Mage.
PIPELINE_KEYS = (
    "uuid", "name", "description", "type", "tags", "variables", "concurrency_config", "retry_config",
    "cache_block_output_in_memory", "run_pipeline_in_one_process", "notification_config", "blocks",
)
# Keys of a block entry that map to Block fields and edges. `downstream_blocks` is
# derived from the other blocks' `upstream_blocks` on export and ignored on import.
BLOCK_KEYS = (
    "uuid", "name", "type", "language", "upstream_blocks", "downstream_blocks",
    "configuration", "retry_config", "timeout",
)
# Pipeline keys whose entries are blocks kept outside `blocks:` (Mage's callback and
# conditional blocks, and its charts). Millrace does not run them, but it carries their
# code files in Pipeline.extra[FILES_KEY] so that an export writes them back.
ATTACHED_BLOCK_LISTS = ("callbacks", "conditionals", "widgets")
FILES_KEY = "_millrace_files"

# Django's slug rule (Block.uuid and Pipeline.uuid are SlugFields). Checked before a
# uuid is used to build a file path, which also keeps paths inside the project.
_SLUG = re.compile(r"^[-a-zA-Z0-9_]+$")

# Block code files (and the files of callback and conditional blocks) larger than this
# are refused, naming the file; YAML files have safe_yaml.MAX_BYTES. Documented in the
# README ("Limits").
MAX_CODE_BYTES = 1024 * 1024

PROJECT_METADATA = (
    "# A minimal Mage project file, written by Millrace's export_pipeline.\n"
    "variables_dir: ~/.mage_data\n"
)


class MageFormatError(Exception):
    """A project file Millrace cannot import (or a pipeline it cannot export). The
    message starts with the file, relative to the project, and says what is wrong."""


@dataclass
class BlockDef:
    uuid: str
    fields: dict[str, Any]
    upstreams: list[str]


@dataclass
class PipelineDef:
    uuid: str
    source: str  # the metadata.yaml, relative to the project
    fields: dict[str, Any]
    blocks: list[BlockDef] = field(default_factory=list)


@dataclass
class ImportResult:
    imported: list[Pipeline] = field(default_factory=list)
    # (pipeline uuid, why it was left as it is), with keep_edited only
    kept: list[tuple[str, str]] = field(default_factory=list)


# --- YAML ----------------------------------------------------------------------------------

def _load_yaml(path: Path, label: str) -> Any:
    """The file's value; its size, aliases, depth and characters are checked by
    safe_yaml, which also leaves timestamps as strings."""
    try:
        return safe_yaml.load_file(path, label)
    except safe_yaml.YAMLSafetyError as exc:
        raise MageFormatError(str(exc)) from None


def _dump_yaml(data: dict[str, Any]) -> str:
    # Sorted keys and block style, as Mage writes its own files.
    return yaml.safe_dump(data, sort_keys=True, default_flow_style=False, allow_unicode=True)


def _check_json(config: dict[str, Any], label: str) -> None:
    """Refuse what a JSON field cannot hold as it is (so that import -> export -> import
    gives back the same value, and both databases can store it), naming the key path."""
    try:
        jsonsafe.check(config)
    except jsonsafe.JSONValueError as exc:
        raise MageFormatError(f"{label}: {exc.path or 'the file'} {exc.problem}") from None


def _read_text(path: Path, label: str) -> str:
    """A code file's text. Reads one byte past the limit at most, so that a huge file
    is refused without being loaded."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CODE_BYTES + 1)
    except OSError as exc:
        raise MageFormatError(f"{label}: cannot be read: {exc.strerror}") from None
    if len(data) > MAX_CODE_BYTES:
        raise MageFormatError(f"{label}: file too large: more than {MAX_CODE_BYTES:,} bytes (mage_format.MAX_CODE_BYTES)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MageFormatError(f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


# --- block files ---------------------------------------------------------------------------

def _configured_path(configuration: dict[str, Any]) -> str | None:
    """The block file named by newer Mage versions, if any."""
    source = configuration.get("file_source")
    if isinstance(source, dict) and isinstance(source.get("path"), str) and source["path"]:
        return source["path"]
    path = configuration.get("file_path")
    return path if isinstance(path, str) and path else None


def _safe_relpath(raw: str, label: str) -> PurePosixPath:
    path = PurePosixPath(raw)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise MageFormatError(f"{label}: block file path {raw!r} must be relative and stay inside the project")
    return path


def _candidate_paths(project_name: str, block_type: str, uuid: str, language: str, configuration: dict, label: str) -> list[PurePosixPath]:
    """Where the block's code may be, best first. A configured path is relative to the
    project, or to its parent and then starts with the project folder's name (which
    may have been renamed since, so a path whose second part is a block-type folder
    counts as prefixed too)."""
    raw = _configured_path(configuration)
    if raw is None:
        return [PurePosixPath(TYPE_DIRS[block_type], f"{uuid}.{EXTENSIONS[language]}")]
    path = _safe_relpath(raw, label)
    candidates = [path]
    parts = path.parts
    if len(parts) > 1 and (parts[0] == project_name or parts[1] in TYPE_DIRS.values()):
        candidates.append(PurePosixPath(*parts[1:]))
    return candidates


def _export_path(block: Block) -> PurePosixPath:
    """Where export writes a block's code: the first place import will look."""
    label = f"block {block.uuid!r}"
    raw = _configured_path(block.configuration or {})
    if raw is None:
        return PurePosixPath(TYPE_DIRS[block.type], f"{block.uuid}.{EXTENSIONS[block.language]}")
    path = _safe_relpath(raw, label)
    parts = path.parts
    if len(parts) > 1 and parts[0] not in TYPE_DIRS.values() and parts[1] in TYPE_DIRS.values():
        return PurePosixPath(*parts[1:])
    return path


# --- reading a project ---------------------------------------------------------------------

def read_project(path: str | Path) -> list[PipelineDef]:
    """Read and check every pipeline of the project at `path`, without the database."""
    project = Path(path)
    if not project.is_dir():
        raise MageFormatError(f"{path}: not a directory")
    # The project file holds project-wide settings (variables_dir, notification_config...)
    # that Millrace takes from its own settings; minimal projects omit it. When present it
    # must still be a mapping, so that a corrupt project is not half-understood.
    if (project / METADATA).is_file():
        config = _load_yaml(project / METADATA, METADATA)
        if config is not None and not isinstance(config, dict):
            raise MageFormatError(f"{METADATA}: expected a mapping of settings, not a {type(config).__name__}")
    pipelines_dir = project / PIPELINES_DIR
    if not pipelines_dir.is_dir():
        raise MageFormatError(f"{path}: not a Mage project: it has no {PIPELINES_DIR}/ folder")
    # As in Mage, a folder under pipelines/ without a metadata.yaml is not a pipeline.
    folders = sorted(p for p in pipelines_dir.iterdir() if p.is_dir() and (p / METADATA).is_file())
    return [_read_pipeline(project, folder) for folder in folders]


def _read_pipeline(project: Path, folder: Path) -> PipelineDef:
    label = f"{PIPELINES_DIR}/{folder.name}/{METADATA}"
    if not _SLUG.match(folder.name):
        raise MageFormatError(f"{label}: pipeline folder name {folder.name!r} is not a valid uuid (letters, digits, _ and - only)")
    config = _load_yaml(folder / METADATA, label)
    if config is None:
        raise MageFormatError(f"{label}: the file is empty")
    if not isinstance(config, dict):
        raise MageFormatError(f"{label}: expected a mapping, not a {type(config).__name__}")
    _check_json(config, label)
    fields = _pipeline_fields(config, label)
    files = _attached_files(project, config, label)
    if files:
        fields["extra"][FILES_KEY] = files
    entries = config.get("blocks") or []
    if not isinstance(entries, list):
        raise MageFormatError(f"{label}: blocks must be a list, not a {type(entries).__name__}")
    uuids = [e.get("uuid") for e in entries if isinstance(e, dict)]
    twice = next((u for i, u in enumerate(uuids) if u in uuids[:i]), None)
    if twice is not None:
        raise MageFormatError(f"{label}: block {twice!r} is listed twice")
    blocks = [_read_block(project, entry, i, label) for i, entry in enumerate(entries)]
    pipeline = PipelineDef(uuid=folder.name, source=label, fields=fields, blocks=blocks)
    _check_graph(pipeline)
    return pipeline


def _object(config: dict, key: str, label: str, *, nullable: bool = False) -> dict | None:
    value = config.get(key)
    if value is None:
        return None if nullable else {}
    if not isinstance(value, dict):
        raise MageFormatError(f"{label}: {key} must be a mapping, not a {type(value).__name__}")
    return value


def _text(value: Any, default: str) -> str:
    return default if value is None else str(value)


def _flag(config: dict, key: str, label: str) -> bool:
    value = config.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise MageFormatError(f"{label}: {key} must be true or false, not {value!r}")
    return value


def _pipeline_fields(config: dict, label: str) -> dict[str, Any]:
    tags = config.get("tags") or []
    if not isinstance(tags, list):
        raise MageFormatError(f"{label}: tags must be a list, not a {type(tags).__name__}")
    return {
        "name": _text(config.get("name"), ""),
        "description": _text(config.get("description"), ""),
        "type": _text(config.get("type"), "python"),
        "tags": tags,
        "variables": _object(config, "variables", label),
        "concurrency_config": _object(config, "concurrency_config", label),
        "retry_config": _object(config, "retry_config", label),
        "notification_config": _object(config, "notification_config", label),
        "cache_block_output_in_memory": _flag(config, "cache_block_output_in_memory", label),
        "run_pipeline_in_one_process": _flag(config, "run_pipeline_in_one_process", label),
        "extra": {k: v for k, v in config.items() if k not in PIPELINE_KEYS},
    }


def _read_block(project: Path, entry: Any, index: int, label: str) -> BlockDef:
    if not isinstance(entry, dict):
        raise MageFormatError(f"{label}: block #{index + 1} must be a mapping, not a {type(entry).__name__}")
    uuid = entry.get("uuid")
    if not isinstance(uuid, str) or not uuid:
        raise MageFormatError(f"{label}: block #{index + 1} has no uuid")
    if not _SLUG.match(uuid):
        raise MageFormatError(
            f"{label}: block uuid {uuid!r} is not supported: a block uuid has letters, digits, _ and - only"
            " (blocks in sub-folders are not supported yet)"
        )
    where = f"{label}: block {uuid!r}"
    block_type = entry.get("type")
    if block_type not in BlockType.values:
        raise MageFormatError(f"{where} has unknown type {block_type!r}; expected one of {', '.join(BlockType.values)}")
    language = entry.get("language") or BlockLanguage.PYTHON
    if language not in BlockLanguage.values:
        raise MageFormatError(f"{where} has unknown language {language!r}; expected one of {', '.join(BlockLanguage.values)}")
    upstreams = entry.get("upstream_blocks") or []
    if not isinstance(upstreams, list) or not all(isinstance(u, str) for u in upstreams):
        raise MageFormatError(f"{where}: upstream_blocks must be a list of block uuids")
    configuration = _object(entry, "configuration", where)
    retry_config = _object(entry, "retry_config", where, nullable=True)
    content = _block_content(project, block_type, uuid, language, configuration, label)
    fields = {
        "name": _text(entry.get("name"), uuid),
        "type": block_type,
        "language": language,
        "content": content,
        "configuration": configuration,
        "retry_config": retry_config,
        "timeout": entry.get("timeout"),
        "position": index,
        "extra": {k: v for k, v in entry.items() if k not in BLOCK_KEYS},
    }
    return BlockDef(uuid=uuid, fields=fields, upstreams=list(upstreams))


def _block_content(project: Path, block_type: str, uuid: str, language: str, configuration: dict, label: str) -> str:
    candidates = _candidate_paths(project.name, block_type, uuid, language, configuration, f"{label}: block {uuid!r}")
    found = next((c for c in candidates if (project / c).is_file()), None)
    if found is None:
        raise MageFormatError(f"{candidates[0]}: file not found (the code of block {uuid!r} of {label})")
    content = _read_text(project / found, str(found))
    if language == BlockLanguage.PYTHON:
        try:
            check_python_syntax(content, filename=str(found))
        except BlockCodeError as exc:
            raise MageFormatError(f"{found}: {str(exc).replace(f' in {found}', '', 1)}") from None
    return content


def _attached_files(project: Path, config: dict, label: str) -> dict[str, str]:
    """The code files of callback, conditional and widget blocks, by path. A missing
    one is skipped: Millrace never runs them."""
    files: dict[str, str] = {}
    for key in ATTACHED_BLOCK_LISTS:
        entries = config.get(key) or []
        if not isinstance(entries, list):
            raise MageFormatError(f"{label}: {key} must be a list, not a {type(entries).__name__}")
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            uuid, block_type = entry.get("uuid"), entry.get("type")
            language = entry.get("language") or BlockLanguage.PYTHON
            if not (isinstance(uuid, str) and _SLUG.match(uuid) and block_type in TYPE_DIRS and language in EXTENSIONS):
                continue
            configuration = entry.get("configuration") if isinstance(entry.get("configuration"), dict) else {}
            where = f"{label}: {key} block {uuid!r}"
            for candidate in _candidate_paths(project.name, block_type, uuid, language, configuration, where):
                if (project / candidate).is_file():
                    files[str(candidate)] = _read_text(project / candidate, str(candidate))
                    break
    return files


def _check_graph(pipeline: PipelineDef) -> None:
    label = pipeline.source
    seen = {b.uuid for b in pipeline.blocks}
    for block in pipeline.blocks:
        for up in block.upstreams:
            if up not in seen:
                raise MageFormatError(f"{label}: block {block.uuid!r} lists unknown upstream block {up!r}")
        if len(set(block.upstreams)) != len(block.upstreams):
            raise MageFormatError(f"{label}: block {block.uuid!r} lists an upstream block twice: {block.upstreams}")
    try:
        dag.check_acyclic({b.uuid: b.upstreams for b in pipeline.blocks})
    except dag.CycleError as exc:
        raise MageFormatError(f"{label}: {exc}") from None


# --- writing to the database ---------------------------------------------------------------

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


# --- export --------------------------------------------------------------------------------

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


def _code_files(pipeline: Pipeline) -> dict[PurePosixPath, str]:
    """Every code file export writes for `pipeline`, by path in the project."""
    files: dict[PurePosixPath, str] = {}
    for block in Block.objects.filter(pipeline=pipeline).order_by("position", "id"):
        files[_export_path(block)] = block.content
    for raw, content in ((pipeline.extra or {}).get(FILES_KEY) or {}).items():
        files.setdefault(_safe_relpath(raw, f"pipeline {pipeline.uuid!r}"), content)
    return files


def definition_hash(pipeline: Pipeline) -> str:
    """A fingerprint of what `export_pipeline` would write for the stored pipeline (its
    metadata and every code file), so that any change to a field, a block, its code or
    an edge changes it. JSON with sorted keys instead of the YAML export itself: the
    same content, and much faster to write for a large pipeline."""
    pipeline = Pipeline.objects.get(pk=pipeline.pk)
    files = {str(path): content for path, content in _code_files(pipeline).items()}
    text = json.dumps({"metadata": pipeline_to_dict(pipeline), "files": files}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def export_pipeline(pipeline: Pipeline, directory: str | Path) -> list[Path]:
    """Write `pipeline` into the Mage project at `directory` (created if need be) and
    return the files written. Other pipelines' files there are left alone; a block file
    of the same path is overwritten, since in Mage a block's code belongs to the project.
    The same pipeline always gives the same bytes."""
    root = Path(directory)
    pipeline = Pipeline.objects.get(pk=pipeline.pk)  # the stored values, not the caller's copy
    files = _code_files(pipeline)
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

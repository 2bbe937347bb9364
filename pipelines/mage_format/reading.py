"""Reading a Mage project: every file read and checked, with no database access, into
plain definitions (`PipelineDef`, `BlockDef`) that importing.py then writes. A broken
file is refused naming the file and the problem.

A project may come from anyone: its YAML is read by config.common.safe_yaml (size,
aliases, depth and characters bounded, each refusal naming the file and line), code
files have MAX_CODE_BYTES, and every value must be one config.common.jsonsafe accepts,
refused naming the file and the key path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.common import jsonsafe, safe_yaml
from pipelines import dag
from pipelines.execution.checks import BlockCodeError, check_python_syntax
from pipelines.mage_format.layout import (
    ATTACHED_BLOCK_LISTS,
    BLOCK_KEYS,
    EXTENSIONS,
    FILES_KEY,
    MAX_CODE_BYTES,
    METADATA,
    PIPELINE_KEYS,
    PIPELINES_DIR,
    SLUG,
    TYPE_DIRS,
    MageFormatError,
    candidate_paths,
)
from pipelines.models import BlockLanguage, BlockType


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


def _load_yaml(path: Path, label: str) -> Any:
    """The file's value; its size, aliases, depth and characters are checked by
    safe_yaml, which also leaves timestamps as strings."""
    try:
        return safe_yaml.load_file(path, label)
    except safe_yaml.YAMLSafetyError as exc:
        raise MageFormatError(str(exc)) from None


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
    if not SLUG.match(folder.name):
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


def _mapping(config: dict[str, Any], key: str, label: str) -> dict[str, Any]:
    """The mapping under `key`; an empty one when the key is absent or null."""
    value = _optional_mapping(config, key, label)
    return {} if value is None else value


def _optional_mapping(config: dict[str, Any], key: str, label: str) -> dict[str, Any] | None:
    """The mapping under `key`; None when the key is absent or null."""
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise MageFormatError(f"{label}: {key} must be a mapping, not a {type(value).__name__}")
    return value


def _text(value: Any, default: str) -> str:
    return default if value is None else str(value)


def _flag(config: dict[str, Any], key: str, label: str) -> bool:
    value = config.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise MageFormatError(f"{label}: {key} must be true or false, not {value!r}")
    return value


def _pipeline_fields(config: dict[str, Any], label: str) -> dict[str, Any]:
    tags = config.get("tags") or []
    if not isinstance(tags, list):
        raise MageFormatError(f"{label}: tags must be a list, not a {type(tags).__name__}")
    return {
        "name": _text(config.get("name"), ""),
        "description": _text(config.get("description"), ""),
        "type": _text(config.get("type"), "python"),
        "tags": tags,
        "variables": _mapping(config, "variables", label),
        "concurrency_config": _mapping(config, "concurrency_config", label),
        "retry_config": _mapping(config, "retry_config", label),
        "notification_config": _mapping(config, "notification_config", label),
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
    if not SLUG.match(uuid):
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
    configuration = _mapping(entry, "configuration", where)
    retry_config = _optional_mapping(entry, "retry_config", where)
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


def _block_content(
    project: Path, block_type: str, uuid: str, language: str, configuration: dict[str, Any], label: str,
) -> str:
    candidates = candidate_paths(project.name, block_type, uuid, language, configuration, f"{label}: block {uuid!r}")
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


def _attached_files(project: Path, config: dict[str, Any], label: str) -> dict[str, str]:
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
            if not (isinstance(uuid, str) and SLUG.match(uuid) and block_type in TYPE_DIRS and language in EXTENSIONS):
                continue
            raw_configuration = entry.get("configuration")
            configuration = raw_configuration if isinstance(raw_configuration, dict) else {}
            where = f"{label}: {key} block {uuid!r}"
            for candidate in candidate_paths(project.name, block_type, uuid, language, configuration, where):
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

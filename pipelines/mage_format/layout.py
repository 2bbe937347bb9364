"""Where things are in a Mage project: the names of its files and folders, the keys of a
pipeline's metadata.yaml, and the path of each block's code file."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

from pipelines.models import Block, BlockLanguage, BlockType

METADATA = "metadata.yaml"
PIPELINES_DIR = "pipelines"

# Keyed by the choices' values (a TextChoices member is its str value).
TYPE_DIRS: dict[str, str] = {
    BlockType.DATA_LOADER: "data_loaders", BlockType.TRANSFORMER: "transformers",
    BlockType.DATA_EXPORTER: "data_exporters", BlockType.CUSTOM: "custom", BlockType.SENSOR: "sensors",
    BlockType.SCRATCHPAD: "scratchpads", BlockType.CHART: "charts", BlockType.MARKDOWN: "markdowns",
    BlockType.CONDITIONAL: "conditionals", BlockType.CALLBACK: "callbacks",
}
EXTENSIONS: dict[str, str] = {
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
SLUG = re.compile(r"^[-a-zA-Z0-9_]+$")

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


def configured_path(configuration: dict[str, Any]) -> str | None:
    """The block file named by newer Mage versions, if any."""
    source = configuration.get("file_source")
    if isinstance(source, dict) and isinstance(source.get("path"), str) and source["path"]:
        return source["path"]
    path = configuration.get("file_path")
    return path if isinstance(path, str) and path else None


def safe_relpath(raw: str, label: str) -> PurePosixPath:
    """`raw` as a path, refused unless it is relative and stays inside the project."""
    path = PurePosixPath(raw)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise MageFormatError(f"{label}: block file path {raw!r} must be relative and stay inside the project")
    return path


def candidate_paths(
    project_name: str, block_type: str, uuid: str, language: str, configuration: dict[str, Any], label: str,
) -> list[PurePosixPath]:
    """Where the block's code may be, best first. A configured path is relative to the
    project, or to its parent and then starts with the project folder's name (which
    may have been renamed since, so a path whose second part is a block-type folder
    counts as prefixed too)."""
    raw = configured_path(configuration)
    if raw is None:
        return [PurePosixPath(TYPE_DIRS[block_type], f"{uuid}.{EXTENSIONS[language]}")]
    path = safe_relpath(raw, label)
    candidates = [path]
    parts = path.parts
    if len(parts) > 1 and (parts[0] == project_name or parts[1] in TYPE_DIRS.values()):
        candidates.append(PurePosixPath(*parts[1:]))
    return candidates


def export_path(block: Block) -> PurePosixPath:
    """Where export writes a block's code: the first place import will look."""
    label = f"block {block.uuid!r}"
    raw = configured_path(block.configuration or {})
    if raw is None:
        return PurePosixPath(TYPE_DIRS[block.type], f"{block.uuid}.{EXTENSIONS[block.language]}")
    path = safe_relpath(raw, label)
    parts = path.parts
    if len(parts) > 1 and parts[0] not in TYPE_DIRS.values() and parts[1] in TYPE_DIRS.values():
        return PurePosixPath(*parts[1:])
    return path

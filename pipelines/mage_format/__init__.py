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

One module per step; code outside the package uses only the names exported here:
- layout.py: file and folder names, metadata keys, where a block's code file is;
- reading.py: reading and checking a project's files, without the database;
- importing.py: writing what was read, all or nothing;
- exporting.py: writing a pipeline back as Mage files;
- hashing.py: the fingerprint of a stored definition.
"""

from pipelines.mage_format.exporting import export_pipeline, pipeline_to_dict
from pipelines.mage_format.hashing import definition_hash
from pipelines.mage_format.importing import ImportResult, import_project, project_import
from pipelines.mage_format.layout import (
    ATTACHED_BLOCK_LISTS,
    BLOCK_KEYS,
    EXTENSIONS,
    FILES_KEY,
    MAX_CODE_BYTES,
    METADATA,
    PIPELINE_KEYS,
    PIPELINES_DIR,
    PROJECT_METADATA,
    TYPE_DIRS,
    MageFormatError,
)
from pipelines.mage_format.reading import BlockDef, PipelineDef, read_project

__all__ = [
    "ATTACHED_BLOCK_LISTS", "BLOCK_KEYS", "EXTENSIONS", "FILES_KEY", "MAX_CODE_BYTES", "METADATA",
    "PIPELINE_KEYS", "PIPELINES_DIR", "PROJECT_METADATA", "TYPE_DIRS",
    "BlockDef", "ImportResult", "MageFormatError", "PipelineDef",
    "definition_hash", "export_pipeline", "import_project", "pipeline_to_dict", "project_import", "read_project",
]

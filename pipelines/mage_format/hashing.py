"""The fingerprint of a stored pipeline's definition, recorded at each import so that
`project_import(..., keep_edited=True)` can tell a pipeline edited in Millrace since."""

from __future__ import annotations

import hashlib
import json

from pipelines.mage_format.exporting import code_files, pipeline_to_dict
from pipelines.models import Pipeline


def definition_hash(pipeline: Pipeline) -> str:
    """A fingerprint of what `export_pipeline` would write for the stored pipeline (its
    metadata and every code file), so that any change to a field, a block, its code or
    an edge changes it. JSON with sorted keys instead of the YAML export itself: the
    same content, and much faster to write for a large pipeline."""
    pipeline = Pipeline.objects.get(pk=pipeline.pk)
    files = {str(path): content for path, content in code_files(pipeline).items()}
    text = json.dumps({"metadata": pipeline_to_dict(pipeline), "files": files}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("ascii")).hexdigest()

"""Import of Mage projects and export back to Mage's format (pipelines/mage_format.py)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.core.management import call_command
from django.core.management.base import CommandError

from pipelines import services
from pipelines.mage_format import MageFormatError, export_pipeline, import_project
from pipelines.models import Block, BlockEdge, Pipeline
from pipelines.selectors import pipeline_graph
from tests.helpers import ROOT, database_url, write_files

LOAD = """if 'data_loader' not in globals():
    from mage_ai.data_preparation.decorators import data_loader


@data_loader
def load(*args, **kwargs):
    return [1, 2, 3]
"""
CLEAN = """if 'transformer' not in globals():
    from mage_ai.data_preparation.decorators import transformer


@transformer
def clean(data, *args, **kwargs):
    return [x for x in data if x > 1]
"""
REPORT = """if 'data_exporter' not in globals():
    from mage_ai.data_preparation.decorators import data_exporter


@data_exporter
def report(other, cleaned, *args, **kwargs):
    print(other, cleaned)
"""
SHARED = "@custom\ndef shared(*args, **kwargs):\n    return 'shared'\n"
# CRLF line ends and no final newline: import and export must keep the bytes as they are.
NOTES = "# Notes\r\n\r\nCaf\u00e9 numbers only.\r\nNo final newline"
QUERY = "SELECT *\nFROM {{ df_1 }}\nWHERE x > 1\n"
CALLBACK = "@callback('success')\ndef notify(*args, **kwargs):\n    pass\n"

# A pipeline file as Mage writes it, with keys Millrace does not interpret.
ETL_METADATA = """\
blocks:
- all_upstream_blocks_executed: true
  color: null
  configuration: {}
  downstream_blocks: [clean]
  executor_config: null
  executor_type: local_python
  has_callback: false
  language: python
  name: load
  retry_config: null
  status: executed
  timeout: null
  type: data_loader
  upstream_blocks: []
  uuid: load
- color: teal
  configuration: {reduce_output: true}
  downstream_blocks: [report]
  language: python
  name: Clean the data
  retry_config: {retries: 3, delay: 10}
  status: updated
  timeout: 120
  type: transformer
  upstream_blocks: [load]
  uuid: clean
- configuration: {data_provider: postgres, data_provider_profile: default}
  language: sql
  name: q
  type: transformer
  upstream_blocks: [clean]
  uuid: q
- language: python
  type: data_loader
  upstream_blocks: []
  uuid: other_source
- language: python
  type: data_exporter
  upstream_blocks: [other_source, clean]
  uuid: report
- language: markdown
  type: markdown
  uuid: notes
cache_block_output_in_memory: true
callbacks:
- {language: python, type: callback, uuid: notify, upstream_blocks: [report]}
concurrency_config: {block_run_limit: 2, pipeline_run_limit: 1}
created_at: 2023-07-19 20:07:34.946254+00:00
data_integration: null
description: An ETL pipeline
executor_config: {}
executor_count: 1
executor_type: null
extensions: {}
name: ETL demo
notification_config: {alert_on: [trigger_failure]}
retry_config: {retries: 2, delay: 5, exponential_backoff: true}
run_pipeline_in_one_process: false
spark_config: {}
tags: [demo, nightly]
type: python
updated_at: '2024-01-02 03:04:05'
uuid: etl
variables:
  env: dev
  start_date: 2024-01-01
  limits: {rows: 100, ratio: 0.5}
  regions: [eu, us]
variables_dir: /home/src/mage_data
widgets: []
"""


def other_metadata(project_name: str) -> str:
    """Blocks whose file Mage's newer versions name in their configuration."""
    return f"""\
name: other
blocks:
- uuid: shared
  type: custom
  language: python
  configuration:
    file_source: {{path: {project_name}/custom/shared_code.py}}
- uuid: renamed
  type: data_loader
  configuration: {{file_path: data_loaders/loader_file.py}}
  upstream_blocks: [shared]
"""




@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "demo_project"
    write_files(root, {
        "metadata.yaml": "project_uuid: abc123\nvariables_dir: ~/.mage_data\n",
        "pipelines/etl/__init__.py": "",
        "pipelines/etl/metadata.yaml": ETL_METADATA,
        "pipelines/other/metadata.yaml": other_metadata(root.name),
        "pipelines/__pycache__/x.pyc": b"\0",  # not a pipeline: no metadata.yaml
        "data_loaders/load.py": LOAD,
        "data_loaders/other_source.py": LOAD,
        "data_loaders/loader_file.py": LOAD,
        "transformers/clean.py": CLEAN,
        "transformers/q.sql": QUERY,
        "data_exporters/report.py": REPORT,
        "markdowns/notes.md": NOTES,
        "custom/shared_code.py": SHARED,
        "callbacks/notify.py": CALLBACK,
    })
    return root


def counts() -> tuple[int, int, int]:
    return Pipeline.objects.count(), Block.objects.count(), BlockEdge.objects.count()


def snapshot() -> dict[str, Any]:
    """Everything import sets, by pipeline uuid (ids and timestamps aside)."""
    result = {}
    for p in Pipeline.objects.order_by("uuid"):
        graph = pipeline_graph(p.pk)
        result[p.uuid] = {
            "fields": {
                f: getattr(p, f) for f in (
                    "name", "description", "tags", "type", "variables", "concurrency_config", "retry_config",
                    "cache_block_output_in_memory", "run_pipeline_in_one_process", "notification_config", "extra",
                )
            },
            "blocks": [
                {
                    "uuid": b.uuid, "name": b.name, "type": b.type, "language": b.language, "content": b.content,
                    "content_hash": b.content_hash, "configuration": b.configuration, "retry_config": b.retry_config,
                    "timeout": b.timeout, "position": b.position, "extra": b.extra, "upstreams": graph[b.uuid],
                }
                for b in p.blocks.order_by("position")
            ],
        }
    return result


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- import ------------------------------------------------------------------------------

@pytest.mark.sqlite
@pytest.mark.django_db
def test_import_creates_the_pipelines_blocks_and_ordered_edges(project):
    pipelines = import_project(project)

    assert [p.uuid for p in pipelines] == ["etl", "other"]
    etl = Pipeline.objects.get(uuid="etl")
    assert etl.name == "ETL demo" and etl.description == "An ETL pipeline"
    assert etl.tags == ["demo", "nightly"]
    assert etl.variables == {
        "env": "dev", "start_date": "2024-01-01", "limits": {"rows": 100, "ratio": 0.5}, "regions": ["eu", "us"],
    }
    assert etl.concurrency_config == {"block_run_limit": 2, "pipeline_run_limit": 1}
    assert etl.retry_config == {"retries": 2, "delay": 5, "exponential_backoff": True}
    assert etl.notification_config == {"alert_on": ["trigger_failure"]}
    assert etl.cache_block_output_in_memory is True and etl.run_pipeline_in_one_process is False
    blocks = list(etl.blocks.order_by("position"))
    assert [(b.uuid, b.type, b.language, b.position) for b in blocks] == [
        ("load", "data_loader", "python", 0), ("clean", "transformer", "python", 1), ("q", "transformer", "sql", 2),
        ("other_source", "data_loader", "python", 3), ("report", "data_exporter", "python", 4),
        ("notes", "markdown", "markdown", 5),
    ]
    assert pipeline_graph(etl.pk) == {
        "load": [], "clean": ["load"], "q": ["clean"], "other_source": [], "report": ["other_source", "clean"], "notes": [],
    }
    clean = etl.blocks.get(uuid="clean")
    assert clean.name == "Clean the data" and clean.content == CLEAN
    assert clean.configuration == {"reduce_output": True}
    assert clean.retry_config == {"retries": 3, "delay": 10} and clean.timeout == 120
    assert etl.blocks.get(uuid="q").content == QUERY
    assert etl.blocks.get(uuid="notes").content == NOTES
    assert etl.blocks.get(uuid="other_source").name == "other_source"  # no name: the uuid, as in Mage


@pytest.mark.sqlite
@pytest.mark.django_db
def test_import_keeps_the_keys_millrace_does_not_interpret(project):
    import_project(project)

    etl = Pipeline.objects.get(uuid="etl")
    # Timestamps stay the text they were, quoted or not.
    assert etl.extra["created_at"] == "2023-07-19 20:07:34.946254+00:00"
    assert etl.extra["updated_at"] == "2024-01-02 03:04:05"
    assert etl.extra["variables_dir"] == "/home/src/mage_data"
    assert etl.extra["executor_count"] == 1 and etl.extra["data_integration"] is None
    assert etl.extra["callbacks"] == [{"language": "python", "type": "callback", "uuid": "notify", "upstream_blocks": ["report"]}]
    assert etl.extra["_millrace_files"] == {"callbacks/notify.py": CALLBACK}
    assert not set(etl.extra) & {"uuid", "name", "blocks", "variables", "tags", "type"}
    load = etl.blocks.get(uuid="load")
    assert load.extra == {
        "all_upstream_blocks_executed": True, "color": None, "executor_config": None,
        "executor_type": "local_python", "has_callback": False, "status": "executed",
    }
    assert etl.blocks.get(uuid="clean").extra == {"color": "teal", "status": "updated"}


@pytest.mark.sqlite
@pytest.mark.django_db
def test_import_reads_the_block_file_named_by_file_source_or_file_path(project):
    import_project(project)

    other = Pipeline.objects.get(uuid="other")
    assert other.blocks.get(uuid="shared").content == SHARED
    assert other.blocks.get(uuid="renamed").content == LOAD
    assert pipeline_graph(other.pk) == {"shared": [], "renamed": ["shared"]}


@pytest.mark.sqlite
@pytest.mark.django_db
def test_import_accepts_a_minimal_project_without_its_metadata_yaml(tmp_path):
    write_files(tmp_path, {
        "pipelines/tiny/metadata.yaml": "blocks:\n- {uuid: load, type: data_loader}\n",
        "data_loaders/load.py": LOAD,
    })

    [pipeline] = import_project(tmp_path)

    assert pipeline.uuid == "tiny" and pipeline.name == "tiny"
    assert pipeline.type == "python" and pipeline.variables == {} and pipeline.extra == {}
    assert list(pipeline.blocks.values_list("uuid", "content")) == [("load", LOAD)]


@pytest.mark.sqlite
@pytest.mark.django_db
def test_the_folder_name_is_the_pipeline_uuid_as_in_mage(tmp_path):
    # A copied pipeline folder whose file still says the old uuid.
    write_files(tmp_path, {"pipelines/copy_of_etl/metadata.yaml": "uuid: etl\nname: ETL\nblocks: []\n"})

    [pipeline] = import_project(tmp_path)

    assert pipeline.uuid == "copy_of_etl" and pipeline.name == "ETL"


@pytest.mark.sqlite
@pytest.mark.django_db
def test_import_command_reports_the_pipelines(project):
    out = _call("import_mage_project", str(project))

    assert "etl" in out and "6 blocks" in out and "Imported 2 pipelines" in out
    assert Pipeline.objects.count() == 2


# --- re-import -----------------------------------------------------------------------------

@pytest.mark.sqlite
@pytest.mark.django_db
def test_reimport_updates_pipelines_in_place(project):
    import_project(project)
    etl = Pipeline.objects.get(uuid="etl")
    kept_ids = dict(etl.blocks.values_list("uuid", "id"))
    untouched = services.pipeline_create(uuid="not_in_the_project")

    # The file now drops `q`, adds `extra_step`, turns load -> clean around (clean
    # becomes a loader feeding load) and changes code and variables.
    metadata = yaml.safe_load(ETL_METADATA)
    metadata["variables"] = {"env": "prod"}
    blocks = {b["uuid"]: b for b in metadata["blocks"]}
    blocks["load"].update(type="transformer", upstream_blocks=["clean"])
    blocks["clean"].update(type="data_loader", upstream_blocks=[])
    blocks["report"]["upstream_blocks"] = ["clean", "other_source", "extra_step"]
    del blocks["q"]
    blocks["extra_step"] = {"uuid": "extra_step", "type": "custom", "upstream_blocks": ["load"]}
    metadata["blocks"] = list(blocks.values())
    write_files(project, {
        "pipelines/etl/metadata.yaml": yaml.safe_dump(metadata),
        "transformers/load.py": CLEAN.replace("x > 1", "x > 2"),
        "data_loaders/clean.py": LOAD,
        "custom/extra_step.py": SHARED,
    })

    import_project(project)

    etl.refresh_from_db()
    assert Pipeline.objects.filter(uuid="etl").count() == 1 and etl.variables == {"env": "prod"}
    assert Pipeline.objects.filter(pk=untouched.pk).exists()
    blocks_now = dict(etl.blocks.values_list("uuid", "id"))
    assert "q" not in blocks_now and "extra_step" in blocks_now
    for uuid in ("load", "clean", "other_source", "report", "notes"):
        assert blocks_now[uuid] == kept_ids[uuid], f"{uuid} was recreated instead of updated"
    assert pipeline_graph(etl.pk) == {
        "load": ["clean"], "clean": [], "other_source": [], "report": ["clean", "other_source", "extra_step"],
        "notes": [], "extra_step": ["load"],
    }
    assert etl.blocks.get(uuid="load").content == CLEAN.replace("x > 1", "x > 2")
    assert list(etl.blocks.order_by("position").values_list("uuid", flat=True)) == [
        "load", "clean", "other_source", "report", "notes", "extra_step",
    ]


# --- broken projects -----------------------------------------------------------------------

def _break(project: Path, case: str) -> None:
    etl = project / "pipelines/etl/metadata.yaml"
    if case == "invalid_yaml":
        etl.write_text("name: etl\ndescription: a: b\nblocks: []\n")
    elif case == "missing_file":
        (project / "transformers/clean.py").unlink()
    elif case == "syntax_error":
        (project / "transformers/clean.py").write_text(CLEAN.replace("def clean(data, *args, **kwargs):", "def clean(data *args):"))
    elif case == "cycle":
        etl.write_text(ETL_METADATA.replace("  upstream_blocks: []\n  uuid: load", "  upstream_blocks: [report]\n  uuid: load"))
    elif case == "unknown_type":
        etl.write_text(ETL_METADATA.replace("  type: transformer\n  upstream_blocks: [clean]\n  uuid: q", "  type: dbt\n  upstream_blocks: [clean]\n  uuid: q"))
    elif case == "unknown_upstream":
        etl.write_text(ETL_METADATA.replace("upstream_blocks: [load]", "upstream_blocks: [lod]"))
    elif case == "variables_not_an_object":
        etl.write_text(ETL_METADATA.replace("variables:\n  env: dev", "variables:\n- 1\n- 2\nvars_were:\n  env: dev"))
    elif case == "block_listed_twice":
        etl.write_text(ETL_METADATA.replace("  uuid: notes", "  uuid: load"))
    elif case == "bad_pipeline_type":
        # Refused by the services inside the transaction, after `etl` was already written.
        write_files(project, {"pipelines/zzz/metadata.yaml": "type: integration\nblocks: []\n"})
    elif case == "bad_timeout":
        (project / "pipelines/other/metadata.yaml").write_text(other_metadata(project.name) + "  timeout: -5\n")
    elif case == "path_outside_project":
        (project / "pipelines/other/metadata.yaml").write_text(other_metadata(project.name).replace("data_loaders/loader_file.py", "../../etc/passwd"))
    elif case == "block_uuid_with_folder":
        etl.write_text(ETL_METADATA.replace("uuid: other_source", "uuid: sources/other_source").replace("[other_source, clean]", "[sources/other_source, clean]"))
    elif case == "project_file_not_a_mapping":
        (project / "metadata.yaml").write_text("- just\n- a list\n")
    elif case == "not_utf8":
        (project / "transformers/clean.py").write_bytes(CLEAN.encode() + b"# \xff\n")
    else:
        raise AssertionError(case)


BROKEN = [
    ("invalid_yaml", "pipelines/etl/metadata.yaml: invalid YAML (line 2, column 15): mapping values are not allowed here"),
    ("missing_file", "transformers/clean.py: file not found"),
    ("syntax_error", "transformers/clean.py: Syntax error on line 6: invalid syntax: def clean(data *args):"),
    ("cycle", "pipelines/etl/metadata.yaml: The blocks form a cycle"),
    ("unknown_type", "pipelines/etl/metadata.yaml: block 'q' has unknown type 'dbt'"),
    ("unknown_upstream", "pipelines/etl/metadata.yaml: block 'clean' lists unknown upstream block 'lod'"),
    ("variables_not_an_object", "pipelines/etl/metadata.yaml: variables must be a mapping, not a list"),
    ("block_listed_twice", "pipelines/etl/metadata.yaml: block 'load' is listed twice"),
    ("bad_pipeline_type", "pipelines/zzz/metadata.yaml: type: Value 'integration' is not a valid choice"),
    ("bad_timeout", "pipelines/other/metadata.yaml: timeout: data_loader/renamed: timeout must be a positive number"),
    ("path_outside_project", "pipelines/other/metadata.yaml: block 'renamed': block file path '../../etc/passwd' must be relative"),
    ("block_uuid_with_folder", "pipelines/etl/metadata.yaml: block uuid 'sources/other_source' is not supported"),
    ("project_file_not_a_mapping", "metadata.yaml: expected a mapping of settings, not a list"),
    ("not_utf8", "transformers/clean.py: not UTF-8 text"),
]


@pytest.mark.sqlite
@pytest.mark.django_db
@pytest.mark.parametrize(("case", "message"), BROKEN, ids=[c for c, _ in BROKEN])
def test_a_broken_project_changes_nothing_and_the_error_names_the_file(project, case, message):
    import_project(project)
    before, rows = snapshot(), counts()
    # A change to a valid file that would show if anything were written.
    (project / "data_loaders/load.py").write_text(LOAD.replace("[1, 2, 3]", "[4]"))
    _break(project, case)

    with pytest.raises(CommandError) as caught:
        _call("import_mage_project", str(project))

    assert message in str(caught.value)
    assert counts() == rows
    assert snapshot() == before


@pytest.mark.sqlite
@pytest.mark.django_db
def test_a_broken_project_creates_nothing_in_an_empty_database(project):
    _break(project, "bad_pipeline_type")  # etl and other would be created before zzz fails

    with pytest.raises(MageFormatError):
        import_project(project)

    assert counts() == (0, 0, 0)


@pytest.mark.sqlite
@pytest.mark.django_db
def test_import_refuses_a_folder_that_is_not_a_mage_project(tmp_path):
    with pytest.raises(MageFormatError, match="not a Mage project: it has no pipelines/ folder"):
        import_project(tmp_path)
    with pytest.raises(MageFormatError, match="not a directory"):
        import_project(tmp_path / "missing")


@pytest.mark.sqlite
@pytest.mark.django_db(transaction=True)  # no open test transaction for the child process to wait on
def test_import_command_exits_non_zero_with_the_message(project):
    _break(project, "unknown_upstream")

    proc = subprocess.run(
        [sys.executable, "manage.py", "import_mage_project", str(project)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "DATABASE_URL": database_url()},
    )

    assert proc.returncode != 0
    assert "pipelines/etl/metadata.yaml: block 'clean' lists unknown upstream block 'lod'" in proc.stderr


# --- export and round trip -----------------------------------------------------------------

@pytest.mark.sqlite
@pytest.mark.django_db
def test_round_trip_is_lossless(project, tmp_path):
    import_project(project)
    before = snapshot()
    exported = tmp_path / "exported"
    for pipeline in Pipeline.objects.all():
        export_pipeline(pipeline, exported)
    Pipeline.objects.all().delete()
    assert counts() == (0, 0, 0)

    import_project(exported)

    assert snapshot() == before
    # The block files come back byte for byte, at the places Mage looks.
    files = tree(exported)
    assert files["transformers/clean.py"] == CLEAN.encode()
    assert files["markdowns/notes.md"] == NOTES.encode()
    assert files["transformers/q.sql"] == QUERY.encode()
    assert files["custom/shared_code.py"] == SHARED.encode()
    assert files["data_loaders/loader_file.py"] == LOAD.encode()
    assert files["callbacks/notify.py"] == CALLBACK.encode()


@pytest.mark.sqlite
@pytest.mark.django_db
def test_a_pipeline_made_in_millrace_survives_export_and_import(tmp_path):
    pipeline = services.pipeline_create(uuid="made_here", variables={"k": 1})
    services.block_create(pipeline=pipeline, uuid="a", type="data_loader", content=LOAD)
    services.block_create(pipeline=pipeline, uuid="b", type="data_loader", content=LOAD)
    services.block_create(pipeline=pipeline, uuid="c", type="transformer", content=CLEAN, upstream_blocks=["b", "a"])
    before = snapshot()
    export_pipeline(pipeline, tmp_path)
    pipeline.delete()

    import_project(tmp_path)

    assert snapshot() == before


@pytest.mark.sqlite
@pytest.mark.django_db
def test_export_writes_mage_metadata_with_downstream_blocks(project, tmp_path):
    import_project(project)
    out = tmp_path / "out"

    _call("export_pipeline", "etl", str(out))

    metadata = yaml.safe_load((out / "pipelines/etl/metadata.yaml").read_text())
    by_uuid = {b["uuid"]: b for b in metadata["blocks"]}
    assert [b["uuid"] for b in metadata["blocks"]] == ["load", "clean", "q", "other_source", "report", "notes"]
    assert by_uuid["clean"]["downstream_blocks"] == ["q", "report"]
    assert by_uuid["other_source"]["downstream_blocks"] == ["report"]
    assert by_uuid["report"]["upstream_blocks"] == ["other_source", "clean"]
    assert by_uuid["clean"]["retry_config"] == {"retries": 3, "delay": 10} and by_uuid["clean"]["color"] == "teal"
    assert metadata["uuid"] == "etl" and metadata["variables_dir"] == "/home/src/mage_data"
    assert "_millrace_files" not in metadata
    assert (out / "metadata.yaml").is_file() and (out / "pipelines/etl/__init__.py").is_file()
    assert (out / "data_loaders/__init__.py").is_file()


@pytest.mark.sqlite
@pytest.mark.django_db
def test_exporting_twice_gives_identical_files(project, tmp_path):
    import_project(project)
    first, second = tmp_path / "first", tmp_path / "second"
    for pipeline in Pipeline.objects.all():
        export_pipeline(pipeline, first)
        export_pipeline(pipeline, second)
    once = tree(first)
    for pipeline in Pipeline.objects.all():
        export_pipeline(pipeline, first)

    assert tree(first) == once == tree(second)


@pytest.mark.sqlite
@pytest.mark.django_db
def test_export_keeps_an_existing_project_file(project, tmp_path):
    import_project(project)
    (tmp_path / "metadata.yaml").write_text("project_uuid: mine\n")

    export_pipeline(Pipeline.objects.get(uuid="etl"), tmp_path)

    assert (tmp_path / "metadata.yaml").read_text() == "project_uuid: mine\n"


@pytest.mark.sqlite
@pytest.mark.django_db
def test_export_command_refuses_an_unknown_pipeline(tmp_path):
    with pytest.raises(CommandError, match="No pipeline 'nope'"):
        call_command("export_pipeline", "nope", str(tmp_path))


def _call(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()

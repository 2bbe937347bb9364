"""Hostile and edited Mage projects: the YAML limits of config/common/safe_yaml.py, the
size and JSON checks of pipelines/mage_format.py, `import_mage_project --keep-edited`,
and readable titles of blocks and edges."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.core.management import call_command
from django.core.management.base import CommandError

from config.common import jsonsafe, safe_yaml
from pipelines import mage_format, services
from pipelines.mage_format import MageFormatError, definition_hash, export_pipeline, import_project
from pipelines.models import Block, BlockEdge, Pipeline
from pipelines.selectors import pipeline_graph
from tests.helpers import write_files

pytestmark = pytest.mark.sqlite

LOAD = "@data_loader\ndef load(*args, **kwargs):\n    return [1, 2, 3]\n"
CLEAN = "@transformer\ndef clean(data, *args, **kwargs):\n    return data\n"
ETL = """\
name: ETL
variables:
  env: dev
blocks:
- {uuid: load, type: data_loader}
- {uuid: clean, type: transformer, upstream_blocks: [load]}
"""
OTHER = "name: Other\nblocks:\n- {uuid: load, type: data_loader}\n"




@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    write_files(root, {
        "metadata.yaml": "project_uuid: abc\n",
        "pipelines/etl/metadata.yaml": ETL,
        "pipelines/other/metadata.yaml": OTHER,
        "data_loaders/load.py": LOAD,
        "transformers/clean.py": CLEAN,
    })
    return root


def call(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def rows() -> dict[str, Any]:
    """Every row import writes, by natural key, with the values a change would show."""
    return {
        "pipelines": sorted(Pipeline.objects.values_list("uuid", "name", "variables", "imported_hash")),
        "blocks": sorted(Block.objects.values_list("pipeline__uuid", "uuid", "content")),
        "edges": sorted(BlockEdge.objects.values_list("upstream__uuid", "downstream__uuid")),
    }


def state(uuid: str) -> dict[str, Any]:
    """One pipeline's fields, blocks and edges, as an edit or an import would change them."""
    pipeline = Pipeline.objects.get(uuid=uuid)
    return {
        "fields": Pipeline.objects.filter(uuid=uuid).values("name", "description", "variables", "imported_hash").get(),
        "blocks": list(pipeline.blocks.values_list("uuid", "content")),
        "graph": pipeline_graph(pipeline.pk),
    }


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


def laughs(levels: int) -> str:
    """A "billion laughs" value: each level a list of ten aliases of the one before."""
    lines = ['  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]")
    return "variables:\n" + "\n".join(lines) + "\nblocks: []\n"


# --- safe_yaml on its own ------------------------------------------------------------------

def test_safe_yaml_keeps_timestamps_as_text_and_reads_anchors_and_merge_keys():
    text = "created_at: 2023-07-19 20:07:34\nbase: &base {retries: 2}\nblock: {<<: *base, delay: 5}\nsame: *base\n"

    assert safe_yaml.load(text, "f.yaml") == {
        "created_at": "2023-07-19 20:07:34", "base": {"retries": 2}, "block": {"retries": 2, "delay": 5}, "same": {"retries": 2},
    }


def test_safe_yaml_accepts_64_levels_and_refuses_65_with_the_line():
    assert safe_yaml.load(nested(64), "f.yaml") == eval(nested(64))  # noqa: S307 - our own literal

    with pytest.raises(safe_yaml.YAMLSafetyError) as caught:
        safe_yaml.load("a: 1\nb: " + nested(65), "f.yaml")

    assert str(caught.value).startswith("f.yaml: nested too deeply (line 2, column 67): ")
    assert "more than 64 levels" in str(caught.value) and "safe_yaml.MAX_DEPTH" in str(caught.value)


def test_safe_yaml_counts_the_depth_an_alias_brings():
    deep = "a: &a " + nested(40) + "\n"

    assert safe_yaml.load(deep + "b: " + "[" * 23 + "*a" + "]" * 23, "f.yaml")["b"]  # 1 + 23 + 40 = 64

    with pytest.raises(safe_yaml.YAMLSafetyError, match=r"f.yaml: nested too deeply \(line 2, column 28\): .*once \*a is expanded"):
        safe_yaml.load(deep + "b: " + "[" * 24 + "*a" + "]" * 24, "f.yaml")


def test_safe_yaml_counts_each_alias_as_a_copy_of_what_it_repeats(monkeypatch):
    monkeypatch.setattr(safe_yaml, "MAX_NODES", 9)
    # The outer list, the inner one and its 3 numbers: 5 values; each alias repeats 4.
    assert safe_yaml.load("[&x [1, 2, 3], *x]", "f.yaml") == [[1, 2, 3], [1, 2, 3]]

    with pytest.raises(safe_yaml.YAMLSafetyError) as caught:
        safe_yaml.load("[&x [1, 2, 3], *x, *x]", "f.yaml")

    message = str(caught.value)
    assert message.startswith("f.yaml: too many values (line 1, column 20): more than 9 values")
    assert "the alias *x, which repeats 4" in message and "safe_yaml.MAX_NODES" in message


def test_safe_yaml_counts_the_text_an_alias_repeats(monkeypatch):
    monkeypatch.setattr(safe_yaml, "MAX_TEXT", 10)
    assert safe_yaml.load("[&x hello, *x]", "f.yaml") == ["hello", "hello"]  # 5 + 5 characters

    with pytest.raises(safe_yaml.YAMLSafetyError) as caught:
        safe_yaml.load("[&x hello, *x, *x]", "f.yaml")

    assert str(caught.value) == (
        "f.yaml: too much text (line 1, column 16): more than 10 characters of text, each alias counted as a copy"
        " of what it repeats (passed at the alias *x, which repeats 5); the limit is safe_yaml.MAX_TEXT"
    )


def test_safe_yaml_refuses_an_alias_inside_its_own_anchor():
    with pytest.raises(safe_yaml.YAMLSafetyError, match=r"f.yaml: alias inside its own anchor \(line 2, column 5\): \*a"):
        safe_yaml.load("a: &a\n  - *a\n", "f.yaml")


def test_safe_yaml_gives_the_line_and_column_of_an_unreadable_character():
    with pytest.raises(safe_yaml.YAMLSafetyError) as crlf:
        safe_yaml.load("a: 1\r\nbb: x\x00y\r\n", "f.yaml")
    with pytest.raises(safe_yaml.YAMLSafetyError) as escape:
        safe_yaml.load("a: 1\n\n  c: \x1b\n", "f.yaml")

    assert str(crlf.value) == "f.yaml: unreadable character (line 2, column 6): U+0000 (NUL) is not allowed in YAML"
    assert str(escape.value) == "f.yaml: unreadable character (line 3, column 6): U+001B is not allowed in YAML"


def test_safe_yaml_refuses_a_large_text_before_parsing_it():
    text = "a: [" + "1, " * (safe_yaml.MAX_BYTES // 3) + "]"  # parsing it would take minutes

    with pytest.raises(safe_yaml.YAMLSafetyError, match=r"^f.yaml: file too large: 1,048,58\d bytes; at most 1,048,576 are allowed \(safe_yaml.MAX_BYTES\)$"):
        safe_yaml.load(text, "f.yaml")


def test_safe_yaml_loads_a_2000_block_mage_pipeline_file():
    block = (
        "- all_upstream_blocks_executed: true\n  color: null\n  configuration: {{}}\n"
        "  downstream_blocks: [b{next}]\n  executor_config: null\n  executor_type: local_python\n"
        "  has_callback: false\n  language: python\n  name: block {i}\n  retry_config: null\n"
        "  status: executed\n  timeout: null\n  type: transformer\n  upstream_blocks: [b{prev}]\n  uuid: b{i}\n"
    )
    text = "blocks:\n" + "".join(block.format(i=i, next=i + 1, prev=i - 1) for i in range(2000))

    value = safe_yaml.load(text, "f.yaml")

    assert len(value["blocks"]) == 2000 and value["blocks"][-1]["uuid"] == "b1999"


# --- import: refusals name the file, and change nothing ------------------------------------

def _deep_variables(levels: int) -> str:
    """A pipeline file whose document is `levels` deep: root, variables, then lists."""
    return f"name: deep\nvariables:\n  deep: {nested(levels - 2)}\nblocks: []\n"


BROKEN: list[tuple[str, dict[str, str | bytes], list[str]]] = [
    ("billion_laughs", {"pipelines/zz/metadata.yaml": laughs(9)},
     ["pipelines/zz/metadata.yaml: too many values (line ", "more than 250,000 values", "safe_yaml.MAX_NODES"]),
    ("long_string_repeated", {"pipelines/zz/metadata.yaml": "variables:\n  a: &a " + "x" * 100_000 + "\n  b: [" + ", ".join(["*a"] * 1000) + "]\n"},
     ["pipelines/zz/metadata.yaml: too much text (line 3, column ", "more than 4,194,304 characters", "safe_yaml.MAX_TEXT"]),
    ("100000_levels", {"pipelines/zz/metadata.yaml": "name: zz\nvariables: " + nested(100_000) + "\n"},
     ["pipelines/zz/metadata.yaml: nested too deeply (line 2, column 75): ", "more than 64 levels", "safe_yaml.MAX_DEPTH"]),
    ("65_levels", {"pipelines/zz/metadata.yaml": _deep_variables(65)},
     ["pipelines/zz/metadata.yaml: nested too deeply (line 3, column 71): "]),
    ("nul_byte", {"pipelines/zz/metadata.yaml": "name: zz\nvariables:\n  a: x\x00\n"},
     ["pipelines/zz/metadata.yaml: unreadable character (line 3, column 7): U+0000 (NUL) is not allowed in YAML"]),
    ("large_pipeline_file", {"pipelines/zz/metadata.yaml": "# padding\n" * 110_000 + "blocks: []\n"},
     ["pipelines/zz/metadata.yaml: file too large: more than 1,048,576 bytes (safe_yaml.MAX_BYTES)"]),
    ("large_project_file", {"metadata.yaml": "project_uuid: abc\n" + "#" * (1024 * 1024) + "\n"},
     ["metadata.yaml: file too large: more than 1,048,576 bytes (safe_yaml.MAX_BYTES)"]),
    ("large_block_file", {"data_loaders/load.py": LOAD + "#" * (1024 * 1024) + "\n"},
     ["data_loaders/load.py: file too large: more than 1,048,576 bytes (mage_format.MAX_CODE_BYTES)"]),
    ("nan", {"pipelines/zz/metadata.yaml": "variables:\n  ratio: .nan\n"},
     ["pipelines/zz/metadata.yaml: variables.ratio is ", "which is not a JSON number"]),
    ("inf_in_a_block", {"pipelines/zz/metadata.yaml": "blocks:\n- {uuid: load, type: data_loader, configuration: {limit: -.inf}}\n"},
     ["pipelines/zz/metadata.yaml: blocks[0].configuration.limit is -", "which is not a JSON number"]),
    ("nul_escape", {"pipelines/zz/metadata.yaml": 'variables:\n  names: [a, "b\\0c"]\n'},
     ["pipelines/zz/metadata.yaml: variables.names[1] contains a NUL character"]),
    ("lone_surrogate", {"pipelines/zz/metadata.yaml": 'variables:\n  s: "\\ud800"\n'},
     ["pipelines/zz/metadata.yaml: variables.s contains a lone surrogate ('\\ud800'), which is not text"]),
    ("huge_integer", {"pipelines/zz/metadata.yaml": "variables:\n  n: 123456789012345678901234567890\n"},
     ["pipelines/zz/metadata.yaml: variables.n is an integer larger than 64 bits"]),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("case", "files", "messages"), BROKEN, ids=[c for c, _, _ in BROKEN])
def test_a_hostile_file_is_refused_naming_it_and_nothing_changes(project, case, files, messages):
    import_project(project)
    before = rows()
    # A change that would show if anything were written.
    write_files(project, {"transformers/clean.py": CLEAN.replace("return data", "return data[:1]")})
    write_files(project, files)
    started = time.monotonic()

    with pytest.raises(CommandError) as caught:
        call("import_mage_project", str(project))

    assert time.monotonic() - started < 30  # refused, not hung (about a second here)
    for message in messages:
        assert message in str(caught.value)
    assert rows() == before


@pytest.mark.django_db
def test_a_billion_laughs_file_imports_nothing_into_an_empty_database(project):
    write_files(project, {"pipelines/zz/metadata.yaml": laughs(9)})

    with pytest.raises(MageFormatError, match=r"^pipelines/zz/metadata.yaml: too many values \(line \d+, column \d+\)"):
        import_project(project)

    assert (Pipeline.objects.count(), Block.objects.count(), BlockEdge.objects.count()) == (0, 0, 0)


@pytest.mark.django_db
def test_a_60_level_document_imports_and_exports_unchanged(project, tmp_path):
    write_files(project, {"pipelines/zz/metadata.yaml": _deep_variables(60)})

    import_project(project)

    stored = Pipeline.objects.get(uuid="zz").variables["deep"]
    assert stored == safe_yaml.load(nested(58), "x") and jsonsafe.problem_in(stored) is None
    export_pipeline(Pipeline.objects.get(uuid="zz"), tmp_path / "out")
    assert yaml.safe_load((tmp_path / "out/pipelines/zz/metadata.yaml").read_text())["variables"]["deep"] == stored


# --- --keep-edited ---------------------------------------------------------------------------

@pytest.mark.django_db
def test_keep_edited_imports_a_project_into_an_empty_database(project):
    out = call("import_mage_project", "--keep-edited", str(project))

    assert "Imported 2 pipelines" in out and "left" not in out
    etl = Pipeline.objects.get(uuid="etl")
    assert pipeline_graph(etl.pk) == {"load": [], "clean": ["load"]}
    assert etl.imported_hash == definition_hash(etl) != ""


@pytest.mark.django_db
def test_keep_edited_reimports_an_unchanged_pipeline_with_the_new_files(project):
    call("import_mage_project", str(project))
    write_files(project, {
        "transformers/clean.py": CLEAN.replace("return data", "return data[:2]"),
        "pipelines/etl/metadata.yaml": ETL.replace("env: dev", "env: prod"),
    })

    out = call("import_mage_project", "--keep-edited", str(project))

    etl = Pipeline.objects.get(uuid="etl")
    assert etl.variables == {"env": "prod"}
    assert etl.blocks.get(uuid="clean").content.endswith("return data[:2]\n")
    assert etl.imported_hash == definition_hash(etl)
    assert "Imported 2 pipelines" in out and "left" not in out


def _edit_code(etl: Pipeline) -> None:
    services.block_update(etl.blocks.get(uuid="clean"), content=CLEAN.replace("return data", "return []"))


def _edit_field(etl: Pipeline) -> None:
    services.pipeline_update(etl, description="edited in Millrace")


def _edit_edge(etl: Pipeline) -> None:
    services.block_set_upstreams(etl.blocks.get(uuid="clean"), [])


def _delete_block(etl: Pipeline) -> None:
    services.block_delete(etl.blocks.get(uuid="clean"))


EDITS = {"block_code": _edit_code, "pipeline_field": _edit_field, "edge": _edit_edge, "deleted_block": _delete_block}


@pytest.mark.django_db
@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
def test_keep_edited_leaves_an_edited_pipeline_as_it_is(project, edit):
    call("import_mage_project", str(project))
    edit(Pipeline.objects.get(uuid="etl"))
    edited = state("etl")
    write_files(project, {
        "transformers/clean.py": CLEAN.replace("return data", "return data[:2]"),
        "data_loaders/load.py": LOAD.replace("[1, 2, 3]", "[4]"),  # used by both pipelines
    })

    out = call("import_mage_project", "--keep-edited", str(project))

    assert "etl: changed since it was imported; left as it is (import without --keep-edited to overwrite)" in out
    assert "Imported 1 pipeline from" in out and out.rstrip().endswith("; left 1 as it is")
    assert state("etl") == edited
    # The unchanged pipeline took the new file.
    assert Block.objects.get(pipeline__uuid="other", uuid="load").content.endswith("return [4]\n")


@pytest.mark.django_db
def test_without_keep_edited_an_edited_pipeline_is_overwritten_and_recorded(project):
    call("import_mage_project", str(project))
    etl = Pipeline.objects.get(uuid="etl")
    _edit_code(etl)
    _edit_field(etl)

    call("import_mage_project", str(project))

    etl.refresh_from_db()
    assert etl.blocks.get(uuid="clean").content == CLEAN and etl.description == ""
    assert etl.imported_hash == definition_hash(etl)
    # Recorded, so that the next --keep-edited run takes the files again.
    write_files(project, {"transformers/clean.py": CLEAN.replace("return data", "return data[:2]")})
    assert "left" not in call("import_mage_project", "--keep-edited", str(project))
    assert etl.blocks.get(uuid="clean").content.endswith("return data[:2]\n")


@pytest.mark.django_db
def test_keep_edited_leaves_a_pipeline_made_in_millrace_with_the_same_uuid(project):
    made = services.pipeline_create(uuid="etl", name="Mine")

    out = call("import_mage_project", "--keep-edited", str(project))

    assert "etl: not made by an import (or imported before Millrace recorded imports); left as it is" in out
    made.refresh_from_db()
    assert made.name == "Mine" and made.blocks.count() == 0 and made.imported_hash == ""
    assert Pipeline.objects.get(uuid="other").imported_hash != ""


@pytest.mark.django_db
def test_keep_edited_is_all_or_nothing_too(project):
    call("import_mage_project", str(project))
    before = rows()
    write_files(project, {
        "transformers/clean.py": CLEAN.replace("return data", "return data[:2]"),
        "pipelines/zz/metadata.yaml": "variables: {x: .nan}\n",
    })

    with pytest.raises(CommandError, match="pipelines/zz/metadata.yaml: variables.x is .*not a JSON number"):
        call("import_mage_project", "--keep-edited", str(project))

    assert rows() == before


@pytest.mark.django_db
def test_the_fingerprint_is_not_exported(project, tmp_path):
    import_project(project)

    export_pipeline(Pipeline.objects.get(uuid="etl"), tmp_path / "out")

    text = (tmp_path / "out/pipelines/etl/metadata.yaml").read_text()
    assert "imported_hash" not in text and Pipeline.objects.get(uuid="etl").imported_hash not in text


@pytest.mark.django_db
def test_the_fingerprint_changes_with_the_code_of_an_attached_callback(project):
    write_files(project, {
        "pipelines/etl/metadata.yaml": ETL + "callbacks:\n- {uuid: notify, type: callback}\n",
        "callbacks/notify.py": "@callback('success')\ndef notify(*a, **k):\n    pass\n",
    })
    import_project(project)
    etl = Pipeline.objects.get(uuid="etl")
    files = dict(etl.extra[mage_format.FILES_KEY], **{"callbacks/notify.py": "# changed\n"})

    services.pipeline_update(etl, extra=dict(etl.extra, **{mage_format.FILES_KEY: files}))

    assert definition_hash(etl) != etl.imported_hash


# --- titles ----------------------------------------------------------------------------------

@pytest.mark.django_db
def test_blocks_and_edges_are_titled_by_pipeline_and_block_uuids(project):
    import_project(project)
    clean = Block.objects.get(pipeline__uuid="etl", uuid="clean")
    edge = BlockEdge.objects.get(downstream=clean)

    assert str(clean) == "etl/clean"
    assert str(edge) == "etl: load -> clean"
    # Unsaved or half-filled rows (an admin add form) still have a title.
    assert str(Block(uuid="new")) == "(no pipeline)/new"
    assert str(BlockEdge()) == "(no pipeline): ? -> ?"
    assert str(BlockEdge(upstream=clean)) == "etl: clean -> ?"

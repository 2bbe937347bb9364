"""The example Mage project in examples/: it imports, and each pipeline runs to completed
(through the orchestrator, in real child processes) with the right outputs."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import pytest
from django.core.management import call_command

from pipelines import variables
from pipelines.mage_format import import_project
from pipelines.models import Pipeline
from pipelines.selectors import pipeline_graph
from runs import orchestrator
from runs.models import LogEntry, PipelineRun
from runs.services import run_execute_sync
from tests.helpers import ROOT

EXAMPLES = ROOT / "examples"


def run(uuid: str, **runtime_vars) -> PipelineRun:
    pipeline = Pipeline.objects.get(uuid=uuid)
    return run_execute_sync(orchestrator.run_create(pipeline, variables=runtime_vars, start=False))


def output(run_: PipelineRun, block_uuid: str):
    [meta] = run_.block_runs.get(block_uuid=block_uuid).outputs
    return variables.read_value(meta)


def statuses(run_: PipelineRun) -> dict[str, str]:
    return dict(run_.block_runs.values_list("block_uuid", "status"))


@pytest.fixture
def examples():
    return {p.uuid: p for p in import_project(EXAMPLES)}


@pytest.fixture
def export_dir(data_dir, monkeypatch) -> Path:
    # The ETL's exporter finds the data directory in the environment (a block knows
    # nothing of Django's settings); the forked block process inherits it.
    monkeypatch.setenv("MILLRACE_DATA_DIR", str(data_dir))
    return data_dir / "exports" / "example_etl"


@pytest.mark.sqlite
@pytest.mark.django_db
def test_the_examples_import_as_three_pipelines(examples):
    assert set(examples) >= {"example_etl", "example_fan_out", "example_runtime_vars"}
    assert pipeline_graph(examples["example_fan_out"].pk)["combine_stats"] == ["sum_values", "sum_squares", "count_evens"]
    assert examples["example_runtime_vars"].variables == {"greeting": "Hello", "name": "world", "repeat": 1, "shout": False}
    etl = examples["example_etl"]
    assert list(etl.blocks.values_list("uuid", flat=True)) == [
        "load_orders", "clean_orders", "aggregate_revenue_by_region", "export_revenue_csv", "example_etl_notes",
    ]
    for block in Pipeline.objects.get(uuid="example_etl").blocks.filter(language="python"):
        assert f"if '{block.type}' not in globals():" in block.content  # written as Mage blocks


def _expected_summary(raw) -> dict[str, dict]:
    """The cleaning and aggregation rules, applied row by row without pandas."""
    seen: set[int] = set()
    totals: dict[str, dict] = defaultdict(lambda: {"orders": 0, "units": 0, "revenue": 0.0})
    for row in raw.to_dict("records"):
        if row["order_id"] in seen:
            continue
        seen.add(row["order_id"])
        price = row["unit_price"]
        if price is None or (isinstance(price, float) and math.isnan(price)) or row["quantity"] <= 0:
            continue
        region = totals[row["region"].strip().title()]
        region["orders"] += 1
        region["units"] += row["quantity"]
        region["revenue"] += round(row["quantity"] * price, 2)
    return totals


@pytest.mark.django_db(transaction=True)
def test_example_etl_cleans_aggregates_and_exports_a_csv(examples, export_dir):
    result = run("example_etl")

    assert result.status == "completed", statuses(result)
    assert set(statuses(result).values()) == {"completed"}
    assert "example_etl_notes" not in statuses(result)  # markdown is not run
    raw = output(result, "load_orders")
    assert len(raw) == 208  # 200 orders and 8 sent twice
    cleaned = output(result, "clean_orders")
    assert cleaned["order_id"].is_unique and (cleaned["quantity"] > 0).all()
    assert cleaned["unit_price"].notna().all()
    assert len(cleaned) < raw["order_id"].nunique()
    expected = _expected_summary(raw)
    summary = output(result, "aggregate_revenue_by_region")
    assert set(summary["region"]) == {"North", "South", "East", "West"} == set(expected)
    assert sum(summary["orders"]) == len(cleaned)
    for row in summary.to_dict("records"):
        want = expected[row["region"]]
        assert (row["orders"], row["units"]) == (want["orders"], want["units"])
        assert row["revenue"] == pytest.approx(want["revenue"])
    assert list(summary["revenue"]) == sorted(summary["revenue"], reverse=True)
    with open(export_dir / "revenue_by_region.csv", newline="") as f:
        exported = list(csv.DictReader(f))
    assert [r["region"] for r in exported] == list(summary["region"])
    assert [float(r["revenue"]) for r in exported] == list(summary["revenue"])


@pytest.mark.django_db(transaction=True)
def test_example_etl_takes_the_number_of_rows_from_a_runtime_variable(examples, export_dir):
    result = run("example_etl", rows=40)

    assert result.status == "completed", statuses(result)
    assert len(output(result, "load_orders")) == 40 + 2


@pytest.mark.django_db(transaction=True)
def test_example_fan_out_combines_the_three_branches_in_edge_order(examples):
    result = run("example_fan_out")

    assert result.status == "completed", statuses(result)
    assert output(result, "sum_values") == 55
    assert output(result, "sum_squares") == 385
    assert output(result, "count_evens") == 5
    assert output(result, "combine_stats") == {
        "n": 10, "sum": 55, "sum_of_squares": 385, "even_count": 5, "mean": 5.5, "variance": 8.25,
    }


@pytest.mark.django_db(transaction=True)
def test_example_fan_out_follows_the_n_variable(examples):
    result = run("example_fan_out", n=4)

    assert result.status == "completed", statuses(result)
    assert output(result, "combine_stats") == {
        "n": 4, "sum": 10, "sum_of_squares": 30, "even_count": 2, "mean": 2.5, "variance": 1.25,
    }


def _printed(run_: PipelineRun, block_uuid: str) -> list[str]:
    return list(LogEntry.objects.filter(pipeline_run=run_, block_uuid=block_uuid).values_list("message", flat=True))


@pytest.mark.sqlite
@pytest.mark.django_db(transaction=True)
def test_example_runtime_vars_uses_the_pipeline_defaults(examples):
    result = run("example_runtime_vars")

    assert result.status == "completed", statuses(result)
    assert output(result, "format_greeting") == {"greeting": "Hello", "name": "world", "message": "Hello, world!", "repeat": 1}
    assert "Hello, world!" in _printed(result, "print_greeting")


@pytest.mark.sqlite
@pytest.mark.django_db(transaction=True)
def test_example_runtime_vars_are_overridden_by_runtime_variables(examples):
    result = run("example_runtime_vars", name="Ada", shout=True, repeat=2)

    assert result.status == "completed", statuses(result)
    assert result.variables == {"greeting": "Hello", "name": "Ada", "repeat": 2, "shout": True}
    assert output(result, "load_greeting_defaults")["message"] == "Hello, Ada!"
    assert output(result, "format_greeting")["message"] == "HELLO, ADA! HELLO, ADA!"
    assert "HELLO, ADA! HELLO, ADA!" in _printed(result, "print_greeting")


@pytest.mark.sqlite
@pytest.mark.django_db(transaction=True)
def test_run_pipeline_command_runs_an_imported_example(examples, capsys):
    call_command("import_mage_project", str(EXAMPLES))  # again: updates in place
    call_command("run_pipeline", "example_runtime_vars", "--sync", "--runtime-vars", '{"name": "CLI"}')

    assert "completed" in capsys.readouterr().out
    last = PipelineRun.objects.filter(pipeline__uuid="example_runtime_vars").first()
    assert last.status == "completed"
    assert output(last, "format_greeting")["message"] == "Hello, CLI!"

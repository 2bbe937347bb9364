"""Regressions for bad input found by testing: every entry point (services, API, admin,
Mage import, commands) refuses it naming the field and stores nothing, the settings
have bounds every database column holds, and rows stored before these rules never break
a page or a list."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.db import connection
from django.urls import reverse
from rest_framework.test import APIClient

from config.common import limits
from config.common.api import SafeJSONRenderer
from pipelines import services as pipeline_services
from pipelines.models import Pipeline
from runs.models import BlockRun, PipelineRun, RunAction
from runs.orchestrator import run_create
from tests.helpers import block_code, make_pipeline, user_in
from triggers import scheduler
from triggers import services as trigger_services
from triggers.models import Backfill, Event, Trigger

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]

LOADER = block_code("data_loader", "return 1")
DAY = datetime(2024, 1, 1, tzinfo=UTC)

# JSON text of values no database may be given, each as it appears in a request body.
BAD_JSON = {
    "nul": '"a\\u0000b"',
    "nan": "NaN",
    "infinity": "Infinity",
    "minus-infinity": "-Infinity",
    "1e999": "1e999",
    "lone-surrogate": '"\\ud800"',
    "deep": "[" * 100 + "]" * 100,
    "huge-int": "1" + "0" * 30,
    # PostgreSQL's jsonb would give it back as the integer 10**20, beyond 64 bits.
    "big-float": "1e20",
}
# The Python values the services are given (what a caller that skipped the parser has).
BAD_VALUES = {
    "nul": "a\x00b",
    "nan": float("nan"),
    "infinity": float("inf"),
    "lone-surrogate": "\ud800",
    "deep": json.loads("[" * 100 + "]" * 100),
    "huge-int": 10**30,
    "big-float": 1e20,
}


@pytest.fixture
def pipeline() -> Pipeline:
    return make_pipeline("etl", [("load", "data_loader", LOADER)], variables={"env": "dev"})


@pytest.fixture
def api_trigger(pipeline: Pipeline) -> Trigger:
    return trigger_services.trigger_create(pipeline=pipeline, name="hook", schedule_type="api", status="active")


def counts() -> tuple[int, int, int, int]:
    return PipelineRun.objects.count(), BlockRun.objects.count(), Event.objects.count(), Trigger.objects.count()


def assert_400_naming(response: Any, *words: str) -> dict:
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == 400 and error["message"]
    text = error["message"] + " " + " ".join(error.get("fields", {}))
    for word in words:
        assert word in text, error
    return error


def sqlite_only() -> None:
    if connection.vendor != "sqlite":
        pytest.skip("PostgreSQL's jsonb cannot hold NaN or a lone surrogate: no such row can exist there")


def store_raw(table: str, column: str, pk: int, text: str) -> None:
    """Write JSON text straight into a row, as an older version or a hand-made UPDATE
    did. Newer SQLite versions refuse NaN in Django's JSON_VALID check; older ones (and
    a table made before the check) took it, so the check is off for this write."""
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA ignore_check_constraints = ON")
        try:
            cursor.execute(f"UPDATE {table} SET {column} = %s WHERE id = %s", [text, pk])  # noqa: S608
        finally:
            cursor.execute("PRAGMA ignore_check_constraints = OFF")


# --- (a) retry_config and the other bounded settings -------------------------------------------

def test_retry_config_retries_many_is_refused_by_pipeline_update(pipeline):
    with pytest.raises(ValidationError) as caught:
        pipeline_services.pipeline_update(pipeline, retry_config={"retries": "many"})

    assert "retry_config.retries" in caught.value.message_dict["retry_config"][0]
    pipeline.refresh_from_db()
    assert pipeline.retry_config == {}


def test_retry_config_retries_many_is_refused_by_block_update(pipeline):
    block = pipeline.blocks.get()

    with pytest.raises(ValidationError) as caught:
        pipeline_services.block_update(block, retry_config={"retries": "many"})

    assert "retry_config.retries" in caught.value.message_dict["retry_config"][0]
    assert "data_loader/load" in caught.value.message_dict["retry_config"][0]
    block.refresh_from_db()
    assert block.retry_config is None


@pytest.mark.parametrize(
    ("retry_config", "words"),
    [
        ({"retries": "many"}, "retry_config.retries"),
        ({"retries": -1}, "retry_config.retries"),
        ({"retries": limits.MAX_RETRIES + 1}, "retry_config.retries"),
        ({"retries": True}, "retry_config.retries"),
        ({"delay": -1}, "retry_config.delay"),
        ({"delay": limits.MAX_SECONDS + 1}, "retry_config.delay"),
        ({"max_delay": "1h"}, "retry_config.max_delay"),
        ({"exponential_backoff": "yes"}, "retry_config.exponential_backoff"),
        ({"retries": 2, "retry_delay": 5}, "'retry_delay'"),
        ({"retries": 40, "delay": 5, "exponential_backoff": True}, "retry_config.max_delay"),
        ({"retries": 1, "delay": float("nan")}, "retry_config.delay"),
    ],
)
def test_a_retry_config_out_of_bounds_is_refused_naming_the_key(pipeline, retry_config, words):
    with pytest.raises(ValidationError) as caught:
        pipeline_services.pipeline_update(pipeline, retry_config=retry_config)
    assert words in " ".join(caught.value.message_dict["retry_config"])


def test_retry_configs_at_the_bounds_are_accepted(pipeline):
    top = {"retries": limits.MAX_RETRIES, "delay": limits.MAX_SECONDS, "exponential_backoff": True,
           "max_delay": limits.MAX_SECONDS}
    pipeline_services.pipeline_update(pipeline, retry_config=top)
    block = pipeline_services.block_update(pipeline.blocks.get(), retry_config={"retries": 0, "delay": 0.5, "max_delay": None})

    pipeline.refresh_from_db()
    block.refresh_from_db()
    assert pipeline.retry_config == top
    assert block.retry_config == {"retries": 0, "delay": 0.5, "max_delay": None}


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"concurrency_config": {"block_run_limit": limits.MAX_CONCURRENCY + 1}}, "concurrency_config", "block_run_limit"),
        ({"concurrency_config": {"pipeline_run_limit": 2.5}}, "concurrency_config", "pipeline_run_limit"),
        ({"variables": {"a": float("nan")}}, "variables", "variables.a"),
        ({"notification_config": {"to": "a\x00"}}, "notification_config", "notification_config.to"),
        ({"tags": ["ok", "\ud800"]}, "tags", "tags[1]"),
        ({"extra": {"k": 10**30}}, "extra", "extra.k"),
        ({"name": "a\x00b"}, "name", "NUL"),
    ],
)
def test_pipeline_fields_are_checked_by_the_shared_validators(pipeline, fields, field, words):
    with pytest.raises(ValidationError) as caught:
        pipeline_services.pipeline_update(pipeline, **fields)
    assert words in " ".join(caught.value.message_dict[field])
    assert Pipeline.objects.get(pk=pipeline.pk).variables == {"env": "dev"}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"timeout": limits.MAX_SECONDS + 1}, "timeout"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": 10**12}, "timeout"),
        ({"configuration": {"x": float("inf")}}, "configuration"),
        ({"extra": {"x": "\x00"}}, "extra"),
    ],
)
def test_block_fields_are_checked_by_the_shared_validators(pipeline, fields, field):
    block = pipeline.blocks.get()
    with pytest.raises(ValidationError) as caught:
        pipeline_services.block_update(block, **fields)
    assert field in caught.value.message_dict
    block.refresh_from_db()
    assert block.timeout is None and block.configuration == {} and block.extra == {}


def test_a_block_timeout_at_the_maximum_is_accepted(pipeline):
    block = pipeline_services.block_update(pipeline.blocks.get(), timeout=limits.MAX_SECONDS)
    block.refresh_from_db()
    assert block.timeout == limits.MAX_SECONDS


def _admin_form_data(response: Any) -> dict[str, Any]:
    """The POST a browser sends for an admin change page as rendered (management forms
    of the inlines included)."""
    data: dict[str, Any] = {}

    def add(form: Any) -> None:
        for name in form.fields:
            value = form[name].value()
            if value is not None and value is not False:
                data[form.add_prefix(name)] = "on" if value is True else value

    add(response.context["adminform"].form)
    for inline in response.context["inline_admin_formsets"]:
        add(inline.formset.management_form)
        for form in inline.formset.forms:
            add(form)
    return data


def test_the_pipeline_admin_shows_retries_many_on_its_field_and_saves_nothing(admin_client, pipeline):
    url = reverse("admin:pipelines_pipeline_change", args=[pipeline.pk])
    data = _admin_form_data(admin_client.get(url))
    # A good change elsewhere on the page proves the form would otherwise save.
    data.update(retry_config='{"retries": "many"}', description="changed")

    response = admin_client.post(url, data)

    assert response.status_code == 200  # the form again, not a redirect
    errors = response.context["adminform"].form.errors
    assert "retry_config.retries" in " ".join(errors["retry_config"])
    pipeline.refresh_from_db()
    assert pipeline.retry_config == {} and pipeline.description == ""

    data["retry_config"] = '{"retries": 2}'
    assert admin_client.post(url, data).status_code == 302
    pipeline.refresh_from_db()
    assert pipeline.retry_config == {"retries": 2} and pipeline.description == "changed"


@pytest.mark.parametrize(
    ("field", "text", "words"),
    [
        ("retry_config", '{"retries": "many"}', "retry_config.retries"),
        ("timeout", str(10**12), ""),
        ("configuration", '{"a": NaN}', "NaN"),
        ("extra", "[" * 200 + "]" * 200, "nested"),
        ("configuration", "[" * 100000 + "]" * 100000, "nested"),
    ],
)
def test_the_block_admin_refuses_bad_settings_on_their_field(admin_client, pipeline, field, text, words):
    block = pipeline.blocks.get()
    url = reverse("admin:pipelines_block_change", args=[block.pk])
    data = _admin_form_data(admin_client.get(url))
    data[field] = text

    response = admin_client.post(url, data)

    assert response.status_code == 200
    assert words in " ".join(response.context["adminform"].form.errors[field])
    block.refresh_from_db()
    assert block.retry_config is None and block.timeout is None and block.configuration == {}


@pytest.mark.parametrize(
    ("field", "text", "words"),
    [
        ("settings", f'{{"timeout": {10**12}}}', "settings.timeout"),
        ("settings", '{"sla": NaN}', "NaN"),
        ("variables", '{"a": "\\u0000"}', "NUL"),
        ("variables", "[" * 100000 + "]" * 100000, "nested"),
    ],
)
def test_the_trigger_admin_refuses_bad_values_on_their_field(admin_client, pipeline, field, text, words):
    data = {
        "pipeline": pipeline.pk, "name": "nightly", "description": "", "schedule_type": "time", "status": "active",
        "schedule_interval": "@hourly", "timezone": "UTC", "start_time_0": "", "start_time_1": "",
        "variables": "{}", "settings": "{}", "event_matcher": "{}", field: text,
    }
    response = admin_client.post(reverse("admin:triggers_trigger_add"), data)

    assert response.status_code == 200
    assert words in " ".join(response.context["adminform"].form.errors[field])
    assert not Trigger.objects.exists()


def test_the_backfill_admin_refuses_bad_variables_on_their_field(admin_client, pipeline):
    data = {
        "pipeline": pipeline.pk, "name": "", "start_datetime_0": "2024-01-01", "start_datetime_1": "00:00:00",
        "end_datetime_0": "2024-01-02", "end_datetime_1": "00:00:00", "interval": "@daily", "timezone": "UTC",
        "variables": '{"a": Infinity}',
    }
    response = admin_client.post(reverse("admin:triggers_backfill_add"), data)

    assert response.status_code == 200
    assert "Infinity" in " ".join(response.context["adminform"].form.errors["variables"])
    assert not Backfill.objects.exists() and not PipelineRun.objects.exists()

    data["variables"] = '{"a": 1}'
    assert admin_client.post(reverse("admin:triggers_backfill_add"), data).status_code == 302
    assert Backfill.objects.get().total_runs == 2


def _mage_project(root: Path, retry_config: str) -> Path:
    (root / "pipelines/etl").mkdir(parents=True)
    (root / "data_loaders").mkdir()
    (root / "data_loaders/load.py").write_text(LOADER)
    (root / "pipelines/etl/metadata.yaml").write_text(
        "blocks:\n- {uuid: load, type: data_loader, language: python, upstream_blocks: []}\n"
        f"name: etl\nretry_config: {retry_config}\nuuid: etl\n"
    )
    return root


def test_the_mage_import_refuses_retries_many_naming_the_file_and_the_field(tmp_path):
    project = _mage_project(tmp_path / "project", "{retries: many}")

    with pytest.raises(CommandError) as caught:
        call_command("import_mage_project", str(project))

    message = str(caught.value)
    assert message.startswith("pipelines/etl/metadata.yaml: ")
    assert "retry_config.retries" in message
    assert not Pipeline.objects.exists()


def test_the_mage_import_refuses_a_nul_in_variables_naming_the_file_and_the_path(tmp_path):
    project = _mage_project(tmp_path / "project", "{}")
    meta = project / "pipelines/etl/metadata.yaml"
    meta.write_text(meta.read_text() + 'variables: {table: "orders\\0"}\n')

    with pytest.raises(CommandError) as caught:
        call_command("import_mage_project", str(project))

    message = str(caught.value)
    assert message.startswith("pipelines/etl/metadata.yaml: ") and "variables.table" in message and "NUL" in message
    assert not Pipeline.objects.exists()


def test_the_mage_import_refuses_a_block_timeout_out_of_range(tmp_path):
    project = _mage_project(tmp_path / "project", "{retries: 1}")
    meta = project / "pipelines/etl/metadata.yaml"
    meta.write_text(meta.read_text().replace("upstream_blocks: []}", f"upstream_blocks: [], timeout: {10**12}}}"))

    with pytest.raises(CommandError) as caught:
        call_command("import_mage_project", str(project))

    assert "pipelines/etl/metadata.yaml" in str(caught.value) and "timeout" in str(caught.value)
    assert not Pipeline.objects.exists()


# --- (b) values JSON and the databases cannot hold, at each entry point ------------------------

def _body(template: str, bad: str) -> bytes:
    return template.replace("BAD", bad).encode()


@pytest.mark.parametrize("kind", BAD_JSON)
def test_the_api_trigger_refuses_a_bad_value_naming_the_field(api_trigger, kind):
    before = counts()
    response = APIClient().generic(
        "POST", f"/api/pipeline_schedules/{api_trigger.pk}/pipeline_runs/{api_trigger.token}",
        _body('{"pipeline_run": {"variables": {"v": BAD}}}', BAD_JSON[kind]), content_type="application/json",
    )
    assert_400_naming(response, "pipeline_run.variables")
    assert counts() == before


@pytest.mark.parametrize("kind", BAD_JSON)
def test_events_refuse_a_bad_payload_naming_the_field(editor, kind):
    before = counts()
    response = editor.generic(
        "POST", "/api/events/", _body('{"event": {"source": "s", "name": "n", "payload": {"v": BAD}}}', BAD_JSON[kind]),
        content_type="application/json",
    )
    assert_400_naming(response, "event.payload")
    assert counts() == before


@pytest.mark.parametrize("kind", BAD_JSON)
def test_creating_a_schedule_refuses_bad_variables_naming_the_field(editor, pipeline, kind):
    before = counts()
    response = editor.generic(
        "POST", f"/api/pipelines/{pipeline.uuid}/pipeline_schedules",
        _body('{"pipeline_schedule": {"name": "n", "schedule_type": "api", "variables": {"v": BAD}}}', BAD_JSON[kind]),
        content_type="application/json",
    )
    assert_400_naming(response, "pipeline_schedule.variables")
    assert counts() == before


@pytest.mark.parametrize("kind", BAD_JSON)
def test_updating_a_schedule_refuses_bad_variables_naming_the_field(editor, api_trigger, kind):
    before = Trigger.objects.values().get(pk=api_trigger.pk)
    response = editor.generic(
        "PUT", f"/api/pipeline_schedules/{api_trigger.pk}",
        _body('{"pipeline_schedule": {"name": "renamed", "variables": {"v": BAD}}}', BAD_JSON[kind]),
        content_type="application/json",
    )
    assert_400_naming(response, "pipeline_schedule.variables")
    assert Trigger.objects.values().get(pk=api_trigger.pk) == before


@pytest.mark.parametrize("kind", BAD_JSON)
def test_run_now_refuses_bad_variables_naming_the_field(editor, api_trigger, kind):
    before = counts()
    response = editor.generic(
        "POST", f"/api/pipeline_schedules/{api_trigger.pk}/run",
        _body('{"pipeline_run": {"variables": {"v": BAD}}}', BAD_JSON[kind]), content_type="application/json",
    )
    assert_400_naming(response, "pipeline_run.variables")
    assert counts() == before


@pytest.mark.parametrize("kind", BAD_JSON)
def test_run_pipeline_refuses_bad_runtime_vars_naming_the_option(pipeline, kind):
    with pytest.raises(CommandError) as caught:
        call_command("run_pipeline", pipeline.uuid, "--runtime-vars", f'{{"v": {BAD_JSON[kind]}}}')
    assert str(caught.value).startswith("--runtime-vars.v")
    assert not PipelineRun.objects.exists()


@pytest.mark.parametrize("text", ["{", "[1, 2]", "[" * 100000 + "]" * 100000, '{"a": 1' + "0" * 5000 + "}"])
def test_run_pipeline_refuses_runtime_vars_that_are_not_an_object_of_json(pipeline, text):
    with pytest.raises(CommandError) as caught:
        call_command("run_pipeline", pipeline.uuid, "--runtime-vars", text)
    assert str(caught.value).startswith("--runtime-vars")
    assert not PipelineRun.objects.exists()


def test_backfill_refuses_bad_variables_naming_the_option(pipeline):
    with pytest.raises(CommandError) as caught:
        call_command("backfill", pipeline.uuid, "--start", "2024-01-01", "--end", "2024-01-02",
                     "--interval", "@daily", "--variables", '{"v": NaN}')
    assert str(caught.value).startswith("--variables.v: is NaN")
    assert not Backfill.objects.exists() and not PipelineRun.objects.exists()


@pytest.mark.parametrize("kind", BAD_VALUES)
def test_the_trigger_services_refuse_bad_values_naming_the_field(pipeline, api_trigger, kind):
    bad = {"v": BAD_VALUES[kind]}
    calls = {
        "variables": lambda: trigger_services.trigger_create(pipeline=pipeline, name="t", schedule_type="api", variables=bad),
        "event_matcher": lambda: trigger_services.trigger_create(
            pipeline=pipeline, name="t", schedule_type="event", event_matcher={"source": "s", "name": "n", "filters": bad}),
        "settings": lambda: trigger_services.trigger_update(api_trigger, settings={"timeout": BAD_VALUES[kind]}),
        "payload": lambda: trigger_services.event_record(source="s", name="n", payload=bad),
        "variables ": lambda: trigger_services.trigger_run_now(api_trigger, variables=bad),
        " variables": lambda: trigger_services.trigger_fire_api(trigger_id=api_trigger.pk, token=api_trigger.token, variables=bad),
        "  variables": lambda: trigger_services.backfill_create(
            pipeline=pipeline, start=DAY, end=DAY, interval="@daily", variables=bad),
    }
    before = counts()
    for field, call in calls.items():
        with pytest.raises(ValidationError) as caught:
            call()
        assert field.strip() in caught.value.message_dict, (field, caught.value)
    assert counts() == before and not Backfill.objects.exists()


# --- (b) on SQLite, rows stored before these rules never break a page --------------------------

STORED_BAD = ['{"a": NaN, "b": [Infinity, -Infinity]}', '{"a": "\\ud800", "\\udfff": 1}']


@pytest.fixture
def bad_run(pipeline: Pipeline, request) -> PipelineRun:
    sqlite_only()
    run = run_create(pipeline, start=False)
    store_raw("runs_pipelinerun", "variables", run.pk, request.param)
    store_raw("runs_pipelinerun", "event", run.pk, request.param)
    run.stored_text = request.param  # type: ignore[attr-defined]
    return run


@pytest.mark.parametrize("bad_run", STORED_BAD, indirect=True)
def test_a_stored_bad_run_does_not_break_the_runs_api(viewer, bad_run):
    listed = viewer.get("/api/pipeline_runs")
    detail = viewer.get(f"/api/pipeline_runs/{bad_run.pk}")

    assert listed.status_code == detail.status_code == 200
    assert listed.json()["pipeline_runs"][0]["id"] == bad_run.pk
    variables = detail.json()["pipeline_run"]["variables"]
    assert variables["a"] in ("NaN", "\\ud800")  # escaped as text
    assert "\\udfff" in variables or variables["b"] == ["Infinity", "-Infinity"]


@pytest.mark.parametrize("bad_run", STORED_BAD, indirect=True)
def test_a_stored_bad_run_does_not_break_the_runs_admin(admin_client, bad_run):
    action = RunAction.objects.create(pipeline_run=bad_run, action=RunAction.Kind.RETRY)
    store_raw("runs_runaction", "detail", action.pk, bad_run.stored_text)

    listed = admin_client.get(reverse("admin:runs_pipelinerun_changelist"))
    page = admin_client.get(reverse("admin:runs_pipelinerun_change", args=[bad_run.pk]))

    assert listed.status_code == page.status_code == 200
    text = page.content.decode()
    assert "NaN" in text or "\\ud800" in text


@pytest.mark.parametrize("stored", STORED_BAD)
def test_stored_bad_json_does_not_break_the_pipeline_trigger_backfill_and_event_admin(admin_client, pipeline, api_trigger, stored):
    sqlite_only()
    backfill = trigger_services.backfill_create(pipeline=pipeline, start=DAY, end=DAY, interval="@daily")
    event = trigger_services.event_record(source="s", name="n")
    block = pipeline.blocks.get()
    for table, column, pk in [
        ("pipelines_pipeline", "variables", pipeline.pk), ("pipelines_block", "configuration", block.pk),
        ("triggers_trigger", "variables", api_trigger.pk), ("triggers_backfill", "variables", backfill.pk),
        ("triggers_event", "payload", event.pk),
    ]:
        store_raw(table, column, pk, stored)

    pages = [
        reverse("admin:pipelines_pipeline_change", args=[pipeline.pk]),
        reverse("admin:pipelines_block_change", args=[block.pk]),
        reverse("admin:triggers_trigger_change", args=[api_trigger.pk]),
        reverse("admin:triggers_backfill_change", args=[backfill.pk]),
        reverse("admin:triggers_event_change", args=[event.pk]),
        reverse("admin:pipelines_pipeline_changelist"), reverse("admin:triggers_trigger_changelist"),
        reverse("admin:triggers_backfill_changelist"), reverse("admin:triggers_event_changelist"),
    ]
    for url in pages:
        response = admin_client.get(url)
        assert response.status_code == 200, url
    assert b"NaN" in admin_client.get(pages[0]).content or b"\\ud800" in admin_client.get(pages[0]).content


def test_a_viewer_on_staff_sees_stored_bad_json_read_only(client, pipeline):
    sqlite_only()
    from django.contrib.auth.models import Permission

    staff = user_in("sam", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_pipeline"))
    client.force_login(staff)
    store_raw("pipelines_pipeline", "variables", pipeline.pk, '{"a": "\\ud800"}')

    response = client.get(reverse("admin:pipelines_pipeline_change", args=[pipeline.pk]))

    assert response.status_code == 200
    assert "\\ud800" in response.content.decode()


def test_the_renderer_escapes_only_when_it_must():
    renderer = SafeJSONRenderer()
    good = {"a": [1, 2.5, "é"], "b": None}
    assert renderer.render(good) == json.dumps(good, ensure_ascii=False, separators=(",", ":")).encode()

    escaped = json.loads(renderer.render({"a": float("nan"), "b": ["\ud800", float("-inf")], "\udfff": 1}))
    assert escaped == {"a": "NaN", "b": ["\\ud800", "-Infinity"], "\\udfff": 1}


# --- (c) timeouts every column holds --------------------------------------------------------------

def test_a_trigger_timeout_beyond_the_maximum_is_refused_naming_settings_timeout(editor, pipeline):
    response = editor.post(
        f"/api/pipelines/{pipeline.uuid}/pipeline_schedules",
        {"pipeline_schedule": {"name": "n", "schedule_type": "time", "schedule_interval": "@hourly",
                               "status": "active", "settings": {"timeout": 10**12}}},
        format="json",
    )
    assert_400_naming(response, "settings.timeout", f"{limits.MAX_SECONDS:,}")
    assert not Trigger.objects.exists()


@pytest.mark.parametrize("given", [{"sla": limits.MAX_SECONDS + 1}, {"timeout": -1}, {"timeout": 1.5}])
def test_a_trigger_sla_or_timeout_out_of_bounds_is_refused(editor, pipeline, given):
    response = editor.post(
        f"/api/pipelines/{pipeline.uuid}/pipeline_schedules",
        {"pipeline_schedule": {"name": "n", "schedule_type": "api", "settings": given}}, format="json",
    )
    assert_400_naming(response, f"settings.{next(iter(given))}")
    assert not Trigger.objects.exists()


def test_a_time_trigger_with_the_maximum_timeout_and_sla_fires(editor, pipeline):
    response = editor.post(
        f"/api/pipelines/{pipeline.uuid}/pipeline_schedules",
        {"pipeline_schedule": {"name": "n", "schedule_type": "time", "schedule_interval": "@hourly", "status": "active",
                               "settings": {"timeout": limits.MAX_SECONDS, "sla": limits.MAX_SECONDS}}},
        format="json",
    )
    assert response.status_code == 201, response.content
    trigger = Trigger.objects.get()

    counted = scheduler.tick(trigger.next_run_at + timedelta(seconds=1))

    assert counted["created"] == 1 and counted["errors"] == 0
    run = PipelineRun.objects.get(trigger=trigger)
    assert (run.timeout, run.sla) == (limits.MAX_SECONDS, limits.MAX_SECONDS)
    trigger.refresh_from_db()
    assert trigger.status == "active" and trigger.error == "" and trigger.next_run_at is not None


# --- (d) the API trigger takes JSON only ----------------------------------------------------------

def _fire(trigger: Trigger, body: bytes, content_type: str) -> Any:
    return APIClient().generic(
        "POST", f"/api/pipeline_schedules/{trigger.pk}/pipeline_runs/{trigger.token}", body, content_type=content_type,
    )


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"pipeline_run": {"variables": {"a": 1}}}', "text/plain"),
        (b'{"pipeline_run": {"variables": {"a": 1}}}', ""),
        (b"a=1", "application/x-www-form-urlencoded"),
        (b"", "text/plain"),
    ],
)
def test_the_api_trigger_refuses_a_body_that_is_not_json_with_415(api_trigger, body, content_type):
    response = _fire(api_trigger, body, content_type)

    assert response.status_code == 415
    error = response.json()["error"]
    assert error["code"] == 415 and "application/json" in error["message"]
    assert not PipelineRun.objects.exists()


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"pipeline_run": {"variables": {"a": 1}}}', "application/json; charset=utf-8"),
        (b'{"pipeline_run": {"variables": {"a": 1}}}', "application/vnd.millrace+json"),
        (b"", ""),  # no body, no type: a call with no data
    ],
)
def test_the_api_trigger_takes_json_types_and_an_empty_untyped_body(api_trigger, body, content_type):
    response = _fire(api_trigger, body, content_type)

    assert response.status_code == 200, response.content
    assert PipelineRun.objects.get().variables.get("a") == (1 if body else None)


# --- (e) POST to the list of schedules says where to create one -----------------------------------

def test_posting_to_the_schedules_list_is_a_405_that_names_the_create_url(editor, pipeline):
    response = editor.post("/api/pipeline_schedules", {"pipeline_schedule": {"name": "n"}}, format="json")

    assert response.status_code == 405
    error = response.json()["error"]
    assert error["code"] == 405 and error["type"] == "method_not_allowed"
    assert "POST /api/pipelines/<pipeline uuid>/pipeline_schedules" in error["message"]
    assert editor.delete("/api/pipeline_schedules").status_code == 405
    assert not Trigger.objects.exists()

"""`pipeline_schedules` (Mage's name for triggers) through the API: who may read and
write, the envelopes, pagination, validation naming the field, and "run once now"."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import time_machine
from rest_framework.test import APIClient

from pipelines.models import Pipeline
from runs.models import PipelineRun, RunType
from tests.helpers import block_code, make_pipeline
from triggers import services
from triggers.models import Trigger, TriggerStatus

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]

FIELDS = {
    "id", "name", "description", "pipeline_uuid", "schedule_type", "schedule_interval", "start_time",
    "status", "variables", "settings", "timezone", "event_matcher", "next_run_at", "last_run_at", "error",
    "created_at", "updated_at",
}


@pytest.fixture
def pipeline() -> Pipeline:
    return make_pipeline(
        "sales", [("load", "data_loader", block_code("data_loader", "return 1"))], variables={"region": "eu"}
    )


@pytest.fixture
def trigger(pipeline: Pipeline) -> Trigger:
    return services.trigger_create(
        pipeline=pipeline, name="nightly", schedule_type="time", schedule_interval="0 2 * * *",
        variables={"limit": 5},
    )


# --- reading -----------------------------------------------------------------------------------

def test_a_viewer_lists_a_pipelines_schedules_without_their_tokens(pipeline, trigger, viewer) -> None:
    other = make_pipeline("other", [("load", "data_loader", block_code("data_loader", "return 1"))])
    services.trigger_create(pipeline=other, name="elsewhere", schedule_type="api")

    response = viewer.get("/api/pipelines/sales/pipeline_schedules")

    assert response.status_code == 200
    body = response.json()
    assert body["metadata"]["count"] == 1
    [item] = body["pipeline_schedules"]
    assert set(item) == FIELDS
    assert item["id"] == trigger.pk
    assert item["pipeline_uuid"] == "sales"
    assert item["schedule_interval"] == "0 2 * * *"
    assert "token" not in item


def test_a_viewer_never_sees_a_token_anywhere(trigger, viewer) -> None:
    detail = viewer.get(f"/api/pipeline_schedules/{trigger.pk}").json()["pipeline_schedule"]
    listed = viewer.get("/api/pipeline_schedules").json()["pipeline_schedules"]

    assert "token" not in detail
    assert all("token" not in item for item in listed)
    assert trigger.token not in str(detail) + str(listed)


def test_editors_and_staff_see_the_token(trigger, editor, staff) -> None:
    for client in (editor, staff):
        body = client.get(f"/api/pipeline_schedules/{trigger.pk}").json()["pipeline_schedule"]
        assert body["token"] == trigger.token


def test_the_list_is_paginated_with_mages_parameters(pipeline, viewer) -> None:
    for i in range(5):
        services.trigger_create(pipeline=pipeline, name=f"t{i}", schedule_type="api")

    page = viewer.get("/api/pipelines/sales/pipeline_schedules", {"_limit": 2, "_offset": 1}).json()
    capped = viewer.get("/api/pipelines/sales/pipeline_schedules", {"_limit": 5000}).json()
    bad = viewer.get("/api/pipelines/sales/pipeline_schedules", {"_limit": "lots"})

    assert [s["name"] for s in page["pipeline_schedules"]] == ["t1", "t2"]
    assert page["metadata"] == {"count": 5, "limit": 2, "offset": 1, "next": True}
    assert capped["metadata"]["limit"] == 1000
    assert len(capped["pipeline_schedules"]) == 5
    assert bad.status_code == 400
    assert "_limit" in bad.json()["error"]["fields"]


def test_an_unknown_pipeline_or_schedule_is_a_json_404(viewer) -> None:
    for url in ("/api/pipelines/nope/pipeline_schedules", "/api/pipeline_schedules/999999"):
        response = viewer.get(url)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == 404


# --- creating ----------------------------------------------------------------------------------

def test_an_editor_creates_a_schedule(pipeline, editor) -> None:
    response = editor.post(
        "/api/pipelines/sales/pipeline_schedules",
        {"pipeline_schedule": {
            "name": "hourly", "schedule_type": "time", "schedule_interval": "@hourly",
            "variables": {"limit": 3}, "settings": {"timeout": 600}, "timezone": "Europe/Paris",
        }},
        format="json",
    )

    assert response.status_code == 201, response.content
    body = response.json()["pipeline_schedule"]
    trigger = Trigger.objects.get(pk=body["id"])
    assert trigger.pipeline_id == pipeline.pk
    assert (trigger.name, trigger.schedule_interval, trigger.timezone) == ("hourly", "@hourly", "Europe/Paris")
    assert trigger.variables == {"limit": 3} and trigger.settings == {"timeout": 600}
    assert trigger.status == TriggerStatus.INACTIVE
    assert trigger.created_by.username == "erin"
    assert body["token"] == trigger.token


def test_fields_may_also_be_sent_unwrapped(pipeline, editor) -> None:
    response = editor.post(
        "/api/pipelines/sales/pipeline_schedules/", {"name": "hook", "schedule_type": "api"}, format="json"
    )

    assert response.status_code == 201, response.content
    assert Trigger.objects.get().schedule_type == "api"


def test_a_bad_cron_is_refused_naming_schedule_interval(pipeline, editor) -> None:
    response = editor.post(
        "/api/pipelines/sales/pipeline_schedules",
        {"pipeline_schedule": {"name": "broken", "schedule_interval": "61 * * * *"}},
        format="json",
    )

    assert response.status_code == 400
    error = response.json()["error"]
    assert list(error["fields"]) == ["schedule_interval"]
    assert "schedule_interval" in error["message"]
    assert not Trigger.objects.exists()


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"schedule_type": "api"}, "name"),
        ({"name": "x", "schedule_type": "sometimes"}, "schedule_type"),
        ({"name": "x", "schedule_type": "api", "variables": [1]}, "variables"),
        ({"name": "x", "schedule_type": "api", "start_time": "yesterday"}, "start_time"),
        ({"name": "x", "schedule_type": "api", "timezone": "Mars/Olympus"}, "timezone"),
        ({"name": "x", "schedule_type": "api", "schedule_intervall": "@daily"}, "schedule_intervall"),
        ({"name": "x", "schedule_type": "event", "event_matcher": {"source": "s"}}, "event_matcher"),
    ],
)
def test_bad_input_is_refused_naming_the_field(pipeline, editor, payload, field) -> None:
    response = editor.post("/api/pipelines/sales/pipeline_schedules", {"pipeline_schedule": payload}, format="json")

    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]
    assert not Trigger.objects.exists()


def test_a_viewer_cannot_create(pipeline, viewer) -> None:
    response = viewer.post(
        "/api/pipelines/sales/pipeline_schedules", {"pipeline_schedule": {"name": "x", "schedule_type": "api"}},
        format="json",
    )

    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_denied"
    assert not Trigger.objects.exists()


def test_anonymous_cannot_read_or_write(pipeline, trigger) -> None:
    client = APIClient()

    for response in (
        client.get("/api/pipelines/sales/pipeline_schedules"),
        client.get(f"/api/pipeline_schedules/{trigger.pk}"),
        client.put(f"/api/pipeline_schedules/{trigger.pk}", {"name": "x"}, format="json"),
        client.delete(f"/api/pipeline_schedules/{trigger.pk}"),
    ):
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "not_authenticated"
    trigger.refresh_from_db()
    assert trigger.name == "nightly"


# --- changing ----------------------------------------------------------------------------------

def test_an_editor_updates_fields_and_ignores_read_only_ones(trigger, editor) -> None:
    current = editor.get(f"/api/pipeline_schedules/{trigger.pk}").json()["pipeline_schedule"]
    current.update({"name": "nightly-2", "schedule_interval": "30 3 * * *", "token": "mine-now"})

    response = editor.put(f"/api/pipeline_schedules/{trigger.pk}", {"pipeline_schedule": current}, format="json")

    assert response.status_code == 200, response.content
    old_token = trigger.token
    trigger.refresh_from_db()
    assert (trigger.name, trigger.schedule_interval) == ("nightly-2", "30 3 * * *")
    assert trigger.token == old_token
    assert response.json()["pipeline_schedule"]["name"] == "nightly-2"


def test_status_activates_and_pauses(trigger, editor) -> None:
    url = f"/api/pipeline_schedules/{trigger.pk}"
    with time_machine.travel(datetime(2024, 5, 1, 12, 0, tzinfo=UTC), tick=False):
        active = editor.put(url, {"pipeline_schedule": {"status": "active"}}, format="json")

    assert active.status_code == 200, active.content
    trigger.refresh_from_db()
    assert trigger.status == TriggerStatus.ACTIVE
    assert trigger.next_run_at == datetime(2024, 5, 2, 2, 0, tzinfo=UTC)
    assert active.json()["pipeline_schedule"]["next_run_at"] == "2024-05-02T02:00:00Z"

    paused = editor.put(url, {"pipeline_schedule": {"status": "inactive"}}, format="json")

    assert paused.status_code == 200
    trigger.refresh_from_db()
    assert trigger.status == TriggerStatus.INACTIVE
    assert trigger.next_run_at is None


def test_a_bad_update_changes_nothing(trigger, editor) -> None:
    response = editor.put(
        f"/api/pipeline_schedules/{trigger.pk}",
        {"pipeline_schedule": {"name": "renamed", "status": "active", "schedule_interval": "every day"}},
        format="json",
    )

    assert response.status_code == 400
    assert "schedule_interval" in response.json()["error"]["fields"]
    trigger.refresh_from_db()
    assert (trigger.name, trigger.status, trigger.schedule_interval) == ("nightly", "inactive", "0 2 * * *")


def test_a_viewer_cannot_update_or_delete(trigger, viewer) -> None:
    url = f"/api/pipeline_schedules/{trigger.pk}"

    assert viewer.put(url, {"pipeline_schedule": {"status": "active"}}, format="json").status_code == 403
    assert viewer.delete(url).status_code == 403
    trigger.refresh_from_db()
    assert trigger.status == TriggerStatus.INACTIVE


def test_an_editor_deletes_a_schedule_and_its_runs_stay(pipeline, trigger, editor) -> None:
    run = services.trigger_run_now(trigger)

    response = editor.delete(f"/api/pipeline_schedules/{trigger.pk}")

    assert response.status_code == 200
    assert response.json()["pipeline_schedule"]["id"] == trigger.pk
    assert not Trigger.objects.filter(pk=trigger.pk).exists()
    run.refresh_from_db()
    assert run.trigger_id is None
    assert editor.get(f"/api/pipeline_schedules/{trigger.pk}").status_code == 404


# --- run once now ------------------------------------------------------------------------------

def test_run_now_starts_a_manual_run_with_the_variables(trigger, editor) -> None:
    response = editor.post(
        f"/api/pipeline_schedules/{trigger.pk}/run", {"pipeline_run": {"variables": {"day": "2024-05-01"}}},
        format="json",
    )

    assert response.status_code == 201, response.content
    run = PipelineRun.objects.get()
    assert response.json()["pipeline_run"]["id"] == run.pk
    assert run.trigger_id == trigger.pk
    assert run.run_type == RunType.MANUAL
    assert run.variables == {"region": "eu", "limit": 5, "day": "2024-05-01"}
    assert run.created_by.username == "erin"


def test_run_now_without_a_body_uses_the_triggers_variables(trigger, editor) -> None:
    response = editor.post(f"/api/pipeline_schedules/{trigger.pk}/run")

    assert response.status_code == 201, response.content
    assert PipelineRun.objects.get().variables == {"region": "eu", "limit": 5}


def test_run_now_refuses_variables_that_are_not_an_object(trigger, editor) -> None:
    response = editor.post(
        f"/api/pipeline_schedules/{trigger.pk}/run", {"pipeline_run": {"variables": ["a"]}}, format="json"
    )

    assert response.status_code == 400
    assert "variables" in response.json()["error"]["fields"]
    assert not PipelineRun.objects.exists()


def test_a_viewer_cannot_run_now(trigger, viewer) -> None:
    response = viewer.post(f"/api/pipeline_schedules/{trigger.pk}/run")

    assert response.status_code == 403
    assert not PipelineRun.objects.exists()


def test_the_list_of_all_schedules_filters(pipeline, trigger, viewer) -> None:
    api = services.trigger_create(pipeline=pipeline, name="hook", schedule_type="api", status="active")

    active = viewer.get("/api/pipeline_schedules", {"status": "active"}).json()["pipeline_schedules"]
    timed = viewer.get("/api/pipeline_schedules", {"schedule_type": "time"}).json()["pipeline_schedules"]
    bad = viewer.get("/api/pipeline_schedules", {"status": "sleeping"})

    assert [s["id"] for s in active] == [api.pk]
    assert [s["id"] for s in timed] == [trigger.pk]
    assert bad.status_code == 400 and "status" in bad.json()["error"]["fields"]

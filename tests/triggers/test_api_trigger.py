"""The API trigger `POST /api/pipeline_schedules/<id>/pipeline_runs/<token>` and token
rotation. The `pipeline_runs` API that shows the runs it starts is tested in
tests/runs/test_api.py."""

from __future__ import annotations

import json

import pytest
from rest_framework.test import APIClient

from pipelines.models import Pipeline
from runs.models import BlockRun, PipelineRun, RunType
from tests.helpers import orders_pipeline, webhook_trigger
from triggers import services
from triggers.api import API_TRIGGER_MAX_BODY
from triggers.models import ApiRequest, Trigger

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]


@pytest.fixture
def pipeline() -> Pipeline:
    return orders_pipeline()


@pytest.fixture
def trigger(pipeline: Pipeline) -> Trigger:
    return webhook_trigger(pipeline)


def fire(trigger: Trigger, body: object = None, *, token: str | None = None, raw: bytes | None = None, **headers) -> object:
    client = APIClient()
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    url = f"/api/pipeline_schedules/{trigger.pk}/pipeline_runs/{trigger.token if token is None else token}"
    return client.generic("POST", url, data, content_type="application/json", **headers)


def assert_nothing_created() -> None:
    assert PipelineRun.objects.count() == 0
    assert BlockRun.objects.count() == 0
    assert ApiRequest.objects.count() == 0


def test_the_right_token_starts_a_run_with_the_merged_variables(trigger: Trigger) -> None:
    response = fire(trigger, {"pipeline_run": {"variables": {"limit": 30, "day": "2024-05-01"}}})

    assert response.status_code == 200, response.content
    body = response.json()["pipeline_run"]
    run = PipelineRun.objects.get()
    assert body["id"] == run.pk
    assert body["pipeline_uuid"] == "orders"
    assert body["pipeline_schedule_id"] == trigger.pk
    assert body["status"] == run.status
    assert body["variables"] == {"region": "eu", "limit": 30, "day": "2024-05-01"}
    assert body["execution_date"] and body["created_at"]
    assert run.trigger_id == trigger.pk
    assert run.run_type == RunType.API
    # Pipeline's, then the trigger's, then the caller's.
    assert run.variables == {"region": "eu", "limit": 30, "day": "2024-05-01"}
    assert sorted(run.block_runs.values_list("block_uuid", flat=True)) == ["clean", "load"]


def test_an_empty_body_runs_with_the_triggers_variables(trigger: Trigger) -> None:
    response = fire(trigger)

    assert response.status_code == 200, response.content
    assert PipelineRun.objects.get().variables == {"region": "eu", "limit": 20}


def test_a_wrong_token_is_refused_and_creates_nothing(trigger: Trigger) -> None:
    response = fire(trigger, {"pipeline_run": {"variables": {}}}, token="not-the-token")

    assert response.status_code == 403
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == 403
    assert_nothing_created()


def test_a_token_of_another_trigger_is_refused(pipeline: Pipeline, trigger: Trigger) -> None:
    other = services.trigger_create(pipeline=pipeline, name="other", schedule_type="api", status="active")

    response = fire(trigger, token=other.token)

    assert response.status_code == 403
    assert_nothing_created()


@pytest.mark.parametrize("suffix", ["", "/"])
def test_the_route_without_a_token_is_refused_in_json(trigger: Trigger, suffix: str) -> None:
    response = APIClient().post(
        f"/api/pipeline_schedules/{trigger.pk}/pipeline_runs{suffix}", {}, format="json"
    )

    assert response.status_code == 403
    assert "token" in response.json()["error"]["message"].lower()
    assert_nothing_created()


def test_an_unknown_trigger_is_404(trigger: Trigger) -> None:
    response = APIClient().post(f"/api/pipeline_schedules/{trigger.pk + 1000}/pipeline_runs/{trigger.token}")

    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"
    assert_nothing_created()


def test_a_time_trigger_cannot_be_fired_through_the_api(pipeline: Pipeline) -> None:
    timed = services.trigger_create(
        pipeline=pipeline, name="nightly", schedule_type="time", schedule_interval="@daily", status="active"
    )

    response = fire(timed)

    assert response.status_code == 404
    assert_nothing_created()


def test_a_paused_trigger_answers_409(trigger: Trigger) -> None:
    services.trigger_pause(trigger)

    response = fire(trigger, {"pipeline_run": {"variables": {"a": 1}}})

    assert response.status_code == 409
    assert response.json()["error"]["code"] == 409
    assert_nothing_created()


@pytest.mark.parametrize("raw", [b'{"pipeline_run": {"variables": ', b"\xff\xfe{}", b"not json"])
def test_a_malformed_body_is_400(trigger: Trigger, raw: bytes) -> None:
    response = fire(trigger, raw=raw)

    assert response.status_code == 400
    assert response.json()["error"]["code"] == 400
    assert_nothing_created()


@pytest.mark.parametrize("body", [[1, 2], "text", {"pipeline_run": [1]}])
def test_a_body_that_is_not_an_object_is_400(trigger: Trigger, body: object) -> None:
    response = fire(trigger, body)

    assert response.status_code == 400
    assert_nothing_created()


@pytest.mark.parametrize("variables", [[1, 2], "a=1", 3])
def test_variables_that_are_not_an_object_are_400_naming_the_field(trigger: Trigger, variables: object) -> None:
    response = fire(trigger, {"pipeline_run": {"variables": variables}})

    assert response.status_code == 400
    error = response.json()["error"]
    assert "variables" in error["fields"]
    assert_nothing_created()


def test_a_body_over_one_megabyte_is_413(trigger: Trigger) -> None:
    padding = "x" * API_TRIGGER_MAX_BODY
    response = fire(trigger, {"pipeline_run": {"variables": {"blob": padding}}})

    assert response.status_code == 413
    assert response.json()["error"]["code"] == 413
    assert_nothing_created()


def test_a_declared_length_over_the_limit_is_413_before_reading(trigger: Trigger) -> None:
    # The header alone decides: a client announcing 5 MB is stopped before it sends it.
    response = fire(trigger, raw=b"{}", CONTENT_LENGTH=str(5 * API_TRIGGER_MAX_BODY))

    assert response.status_code == 413
    assert_nothing_created()


def test_a_body_of_exactly_the_limit_is_accepted(trigger: Trigger) -> None:
    body = json.dumps({"pipeline_run": {"variables": {"a": 1}}}).encode()
    raw = body + b" " * (API_TRIGGER_MAX_BODY - len(body))

    response = fire(trigger, raw=raw)

    assert response.status_code == 200, response.content
    assert PipelineRun.objects.get().variables["a"] == 1


def test_a_retry_with_the_same_idempotency_key_returns_the_same_run(trigger: Trigger) -> None:
    body = {"pipeline_run": {"variables": {"day": "2024-05-01"}}}
    first = fire(trigger, body, HTTP_IDEMPOTENCY_KEY="order-1234")
    again = fire(trigger, body, HTTP_IDEMPOTENCY_KEY="order-1234")

    assert first.status_code == again.status_code == 200
    assert again.json()["pipeline_run"]["id"] == first.json()["pipeline_run"]["id"]
    assert again["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first
    assert PipelineRun.objects.count() == 1
    assert ApiRequest.objects.get().run_id == first.json()["pipeline_run"]["id"]

    other = fire(trigger, body, HTTP_IDEMPOTENCY_KEY="order-1235")
    assert other.json()["pipeline_run"]["id"] != first.json()["pipeline_run"]["id"]
    assert PipelineRun.objects.count() == 2


def test_an_overlong_idempotency_key_is_400(trigger: Trigger) -> None:
    response = fire(trigger, HTTP_IDEMPOTENCY_KEY="k" * 256)

    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()["error"]["fields"]
    assert_nothing_created()


def test_a_logged_in_browser_session_needs_no_csrf_token(trigger: Trigger, editor_user) -> None:
    # The token is the credential: a session cookie must neither be needed nor trip CSRF.
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(editor_user)

    response = client.post(f"/api/pipeline_schedules/{trigger.pk}/pipeline_runs/{trigger.token}", {}, format="json")

    assert response.status_code == 200, response.content
    assert PipelineRun.objects.get().created_by is None


def test_other_methods_are_405_in_json(trigger: Trigger) -> None:
    response = APIClient().get(f"/api/pipeline_schedules/{trigger.pk}/pipeline_runs/{trigger.token}")

    assert response.status_code == 405
    assert response.json()["error"]["code"] == 405
    assert_nothing_created()


def test_after_rotation_the_old_token_is_refused_and_the_new_one_works(trigger: Trigger, editor_user) -> None:
    old = trigger.token
    client = APIClient()
    client.force_authenticate(editor_user)

    response = client.post(f"/api/pipeline_schedules/{trigger.pk}/rotate_token")

    assert response.status_code == 200, response.content
    new = response.json()["pipeline_schedule"]["token"]
    assert new != old
    trigger.refresh_from_db()
    assert trigger.token == new
    assert fire(trigger, token=old).status_code == 403
    assert PipelineRun.objects.count() == 0
    assert fire(trigger, token=new).status_code == 200
    assert PipelineRun.objects.count() == 1


def test_a_viewer_cannot_rotate_the_token(trigger: Trigger, viewer_user) -> None:
    old = trigger.token
    client = APIClient()
    client.force_authenticate(viewer_user)

    response = client.post(f"/api/pipeline_schedules/{trigger.pk}/rotate_token")

    assert response.status_code == 403
    trigger.refresh_from_db()
    assert trigger.token == old

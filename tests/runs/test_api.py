"""The read-only runs API: `GET /api/pipeline_runs` (filters, newest first, paginated, in
a fixed number of queries) and `GET /api/pipeline_runs/<id>` with its block runs, shown
for runs an API trigger started."""

from __future__ import annotations

import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from pipelines.models import Pipeline
from runs.models import BlockRun
from tests.helpers import block_code, make_pipeline, orders_pipeline, webhook_trigger
from triggers import services
from triggers.models import Trigger

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]


@pytest.fixture
def pipeline() -> Pipeline:
    return orders_pipeline()


@pytest.fixture
def trigger(pipeline: Pipeline) -> Trigger:
    return webhook_trigger(pipeline)


def fire(trigger: Trigger, body: object = None) -> object:
    """Start a run the way an API client does: `POST` to the trigger's URL with its token."""
    data = b"" if body is None else json.dumps(body).encode()
    url = f"/api/pipeline_schedules/{trigger.pk}/pipeline_runs/{trigger.token}"
    return APIClient().generic("POST", url, data, content_type="application/json")


def test_the_run_shows_in_pipeline_runs_with_its_block_runs(trigger: Trigger, viewer_user) -> None:
    run_id = fire(trigger).json()["pipeline_run"]["id"]
    client = APIClient()
    client.force_authenticate(viewer_user)

    response = client.get(f"/api/pipeline_runs/{run_id}")

    assert response.status_code == 200
    body = response.json()["pipeline_run"]
    assert body["pipeline_schedule_id"] == trigger.pk
    assert body["run_type"] == "api"
    block_runs = body["block_runs"]
    assert [b["block_uuid"] for b in block_runs] == ["load", "clean"]
    assert set(block_runs[0]) == {"id", "block_uuid", "status", "attempt", "started_at", "completed_at", "error"}
    assert {b["id"] for b in block_runs} == set(BlockRun.objects.filter(pipeline_run_id=run_id).values_list("id", flat=True))


def test_pipeline_runs_are_filtered_newest_first_in_a_fixed_number_of_queries(
    pipeline: Pipeline, trigger: Trigger, viewer_user
) -> None:
    other = make_pipeline("other", [("load", "data_loader", block_code("data_loader", "return 1"))])
    other_trigger = services.trigger_create(pipeline=other, name="hook", schedule_type="api", status="active")
    ids = [fire(trigger).json()["pipeline_run"]["id"] for _ in range(3)]
    fire(other_trigger)
    client = APIClient()
    client.force_authenticate(viewer_user)

    response = client.get("/api/pipeline_runs", {"pipeline_schedule_id": trigger.pk})

    body = response.json()
    assert [r["id"] for r in body["pipeline_runs"]] == list(reversed(ids))
    assert body["metadata"]["count"] == 3
    by_uuid = client.get("/api/pipeline_runs", {"pipeline_uuid": "other"}).json()
    assert [r["pipeline_uuid"] for r in by_uuid["pipeline_runs"]] == ["other"]
    page = client.get("/api/pipeline_runs", {"_limit": 2, "_offset": 1}).json()
    assert page["metadata"]["count"] == 4 and len(page["pipeline_runs"]) == 2

    with CaptureQueriesContext(connection) as few:
        client.get("/api/pipeline_runs", {"_limit": 1})
    with CaptureQueriesContext(connection) as many:
        client.get("/api/pipeline_runs", {"_limit": 4})
    assert len(few) == len(many) <= 3


def test_pipeline_runs_filters_are_validated(viewer_user) -> None:
    client = APIClient()
    client.force_authenticate(viewer_user)

    bad_status = client.get("/api/pipeline_runs", {"status": "exploded"})
    bad_id = client.get("/api/pipeline_runs", {"pipeline_schedule_id": "1.5"})

    assert bad_status.status_code == 400 and "status" in bad_status.json()["error"]["fields"]
    assert bad_id.status_code == 400 and "pipeline_schedule_id" in bad_id.json()["error"]["fields"]


def test_pipeline_runs_need_a_login() -> None:
    response = APIClient().get("/api/pipeline_runs")

    assert response.status_code == 401
    assert response.json()["error"]["type"] == "not_authenticated"

"""`POST /api/events/` starts the matching event triggers' runs; `GET` lists events with
the runs they caused."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from pipelines.models import Pipeline
from runs.models import PipelineRun, RunType
from tests.helpers import block_code, make_pipeline
from triggers import services
from triggers.models import Event, Trigger

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]


@pytest.fixture
def pipeline() -> Pipeline:
    return make_pipeline("ingest", [("load", "data_loader", block_code("data_loader", "return 1"))])


@pytest.fixture
def on_upload(pipeline: Pipeline) -> Trigger:
    return services.trigger_create(
        pipeline=pipeline, name="on-upload", schedule_type="event", status="active",
        event_matcher={"source": "s3", "name": "object_created", "filters": {"bucket": "raw"}},
        variables={"mode": "event"},
    )


def post_event(client: APIClient, source: str, name: str, payload: object, *, wrap: bool = True):
    event = {"source": source, "name": name, "payload": payload}
    return client.post("/api/events/", {"event": event} if wrap else event, format="json")


def test_an_event_starts_the_matching_triggers_run_with_its_payload(on_upload, editor) -> None:
    payload = {"bucket": "raw", "key": "2024/05/01/orders.csv", "size": 1024}

    response = post_event(editor, "s3", "object_created", payload)

    assert response.status_code == 201, response.content
    body = response.json()["event"]
    run = PipelineRun.objects.get()
    assert body["pipeline_run_ids"] == [run.pk]
    assert (body["source"], body["name"], body["payload"]) == ("s3", "object_created", payload)
    assert run.trigger_id == on_upload.pk
    assert run.run_type == RunType.EVENT
    assert run.event == payload
    assert run.variables == {"mode": "event"}
    event = Event.objects.get()
    assert body["id"] == event.pk
    assert list(event.runs.values_list("id", flat=True)) == [run.pk]
    assert event.created_by.username == "erin"


def test_an_event_that_matches_nothing_is_kept_without_runs(on_upload, pipeline, editor) -> None:
    services.trigger_create(
        pipeline=pipeline, name="paused", schedule_type="event", status="inactive",
        event_matcher={"source": "s3", "name": "object_created"},
    )

    other_bucket = post_event(editor, "s3", "object_created", {"bucket": "archive"})
    other_name = post_event(editor, "s3", "object_deleted", {"bucket": "raw"})

    assert other_bucket.status_code == other_name.status_code == 201
    assert other_bucket.json()["event"]["pipeline_run_ids"] == []
    assert Event.objects.count() == 2
    assert not PipelineRun.objects.exists()


def test_the_three_keys_may_come_at_the_top_level(on_upload, editor) -> None:
    response = post_event(editor, "s3", "object_created", {"bucket": "raw"}, wrap=False)

    assert response.status_code == 201, response.content
    assert PipelineRun.objects.get().event == {"bucket": "raw"}


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ({"name": "object_created", "payload": {}}, "source"),
        ({"source": "s3", "name": "", "payload": {}}, "name"),
        ({"source": "s3", "name": "object_created", "payload": [1, 2]}, "payload"),
        ({"source": "s" * 300, "name": "object_created"}, "source"),
    ],
)
def test_bad_events_are_refused_naming_the_field(on_upload, editor, event, field) -> None:
    response = editor.post("/api/events/", {"event": event}, format="json")

    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]
    assert not Event.objects.exists()
    assert not PipelineRun.objects.exists()


def test_malformed_json_is_a_json_400(editor) -> None:
    response = editor.generic("POST", "/api/events/", b'{"event": {', content_type="application/json")

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "parse_error"
    assert not Event.objects.exists()


def test_a_viewer_cannot_post_events(on_upload, viewer) -> None:
    response = post_event(viewer, "s3", "object_created", {"bucket": "raw"})

    assert response.status_code == 403
    assert not Event.objects.exists()
    assert not PipelineRun.objects.exists()


def test_anonymous_cannot_post_events(on_upload) -> None:
    response = post_event(APIClient(), "s3", "object_created", {"bucket": "raw"})

    assert response.status_code == 401
    assert not Event.objects.exists()


def test_a_viewer_lists_events_with_their_runs_in_a_fixed_number_of_queries(on_upload, editor, viewer) -> None:
    first = post_event(editor, "s3", "object_created", {"bucket": "raw"}).json()["event"]
    post_event(editor, "s3", "object_created", {"bucket": "archive"})
    last = post_event(editor, "s3", "object_created", {"bucket": "raw", "n": 2}).json()["event"]

    response = viewer.get("/api/events/")

    assert response.status_code == 200
    body = response.json()
    assert body["metadata"]["count"] == 3
    assert [e["id"] for e in body["events"]][::2] == [last["id"], first["id"]]
    assert body["events"][0]["pipeline_run_ids"] == last["pipeline_run_ids"] != []
    assert body["events"][1]["pipeline_run_ids"] == []
    filtered = viewer.get("/api/events", {"name": "object_deleted"}).json()
    assert filtered["events"] == [] and filtered["metadata"]["count"] == 0

    with CaptureQueriesContext(connection) as one:
        viewer.get("/api/events/", {"_limit": 1})
    with CaptureQueriesContext(connection) as three:
        viewer.get("/api/events/", {"_limit": 3})
    assert len(one) == len(three)

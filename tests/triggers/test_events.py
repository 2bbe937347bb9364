"""Events: stored, matched against active event triggers (source, name, filters), one run
per matching trigger, and listed with the runs they caused."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from django.test.utils import CaptureQueriesContext

from pipelines.models import Pipeline
from runs.models import PipelineRun, RunType
from tests.triggers._support import pipeline
from triggers import selectors, services
from triggers.models import Event, Trigger

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]


def event_trigger(name: str, matcher: dict, *, target: Pipeline | None = None, status: str = "active", **fields) -> Trigger:
    return services.trigger_create(
        pipeline=target or pipeline("p-" + name.replace(" ", "-"), blocks=1), name=name, schedule_type="event",
        event_matcher=matcher, status=status, **fields,
    )


def test_an_event_starts_a_run_for_every_matching_active_trigger():
    any_upload = event_trigger("any", {"source": "s3", "name": "object_created"}, variables={"v": 1})
    csv_only = event_trigger("csv", {"source": "s3", "name": "object_created", "filters": {"suffix": ".csv", "bucket": "raw"}})
    parquet = event_trigger("parquet", {"source": "s3", "name": "object_created", "filters": {"suffix": ".parquet"}})
    event_trigger("other name", {"source": "s3", "name": "object_deleted"})
    event_trigger("other source", {"source": "gcs", "name": "object_created"})
    event_trigger("paused", {"source": "s3", "name": "object_created"}, status="inactive")

    payload = {"bucket": "raw", "key": "a/b.csv", "suffix": ".csv"}
    event = services.event_record(source="s3", name="object_created", payload=payload)
    runs = {run.trigger.name: run for run in event.runs.select_related("trigger")}
    assert set(runs) == {"any", "csv"}
    assert {r.run_type for r in runs.values()} == {RunType.EVENT}
    assert all(r.event == payload for r in runs.values())
    assert runs["any"].variables == {"v": 1}
    assert Event.objects.get(pk=event.pk).payload == payload
    assert not PipelineRun.objects.filter(trigger=parquet).exists()
    assert runs["csv"].trigger == csv_only and runs["any"].trigger == any_upload


def test_a_filter_key_missing_from_the_payload_does_not_match():
    event_trigger("needs key", {"source": "app", "name": "signup", "filters": {"plan": None}})
    assert services.event_record(source="app", name="signup", payload={}).runs.count() == 0
    assert services.event_record(source="app", name="signup", payload={"plan": None}).runs.count() == 1


def test_filters_compare_values_exactly():
    event_trigger("typed", {"source": "app", "name": "order", "filters": {"count": 3, "tags": ["a"]}})
    assert services.event_record(source="app", name="order", payload={"count": "3", "tags": ["a"]}).runs.count() == 0
    assert services.event_record(source="app", name="order", payload={"count": 3, "tags": ["a"], "x": 1}).runs.count() == 1


def test_an_event_nobody_listens_to_is_still_stored():
    event = services.event_record(source="cron", name="tick")
    assert event.pk and event.payload == {} and event.runs.count() == 0


@pytest.mark.parametrize(
    ("fields", "named"),
    [({"source": ""}, "source"), ({"name": None}, "name"), ({"payload": [1, 2]}, "payload"), ({"payload": "x"}, "payload")],
)
def test_bad_events_are_refused_and_nothing_is_stored(fields, named):
    event_trigger("t", {"source": "s", "name": "n"})
    with pytest.raises(ValidationError) as info:
        services.event_record(**{"source": "s", "name": "n", "payload": {}, **fields})
    assert named in info.value.message_dict
    assert Event.objects.count() == 0 and PipelineRun.objects.count() == 0


def test_one_trigger_whose_run_cannot_be_made_does_not_stop_the_others():
    broken_pipeline = pipeline("broken", blocks=0)
    Pipeline.objects.filter(pk=broken_pipeline.pk).update(variables=["not", "an", "object"])
    event_trigger("broken", {"source": "s", "name": "n"}, target=broken_pipeline)
    event_trigger("fine", {"source": "s", "name": "n"})
    event = services.event_record(source="s", name="n")
    assert [r.trigger.name for r in event.runs.select_related("trigger")] == ["fine"]


def test_event_list_shows_each_event_with_its_runs_in_a_fixed_number_of_queries():
    event_trigger("a", {"source": "s", "name": "n"})
    event_trigger("b", {"source": "s", "name": "n"})
    for i in range(5):
        services.event_record(source="s", name="n", payload={"i": i})
    services.event_record(source="other", name="n")
    with CaptureQueriesContext(connection) as ctx:
        events = list(selectors.event_list(source="s"))
        listed = [(e.payload["i"], sorted(r.pipeline.uuid for r in e.runs.all())) for e in events]
    assert len(ctx.captured_queries) == 2
    assert listed == [(i, ["p-a", "p-b"]) for i in reversed(range(5))]
    assert [e.source for e in selectors.event_list(name="n", limit=2)] == ["other", "s"]

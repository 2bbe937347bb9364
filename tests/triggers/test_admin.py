"""The triggers admin: saves and actions go through the services, errors land on the
field, the token is shown only to those who may change the trigger."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse

from pipelines.models import Pipeline
from runs.models import PipelineRun, RunType
from tests.triggers._support import pipeline
from triggers import services
from triggers.models import Backfill, Trigger

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]


@pytest.fixture
def etl() -> Pipeline:
    return pipeline("etl", blocks=1)


def trigger_form(etl: Pipeline, **overrides: Any) -> dict[str, Any]:
    data = {
        "pipeline": etl.pk, "name": "nightly", "description": "", "schedule_type": "time", "status": "active",
        "schedule_interval": "0 3 * * *", "timezone": "UTC", "start_time_0": "", "start_time_1": "",
        "variables": "{}", "settings": "{}", "event_matcher": "{}",
    }
    data.update(overrides)
    return data


def errors_of(response) -> dict[str, list[str]]:
    form = response.context["adminform"].form
    return {name: list(errs) for name, errs in form.errors.items()}


def test_adding_a_trigger_goes_through_the_service(admin_client, admin_user, etl):
    response = admin_client.post(reverse("admin:triggers_trigger_add"), trigger_form(etl, variables='{"a": 1}'))
    assert response.status_code == 302, errors_of(response)
    trigger = Trigger.objects.get(name="nightly")
    assert trigger.status == "active" and trigger.next_run_at is not None  # computed by the service
    assert trigger.next_run_at.hour == 3 and trigger.variables == {"a": 1} and trigger.created_by == admin_user


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"schedule_interval": "0 25 * * *"}, "schedule_interval", "hour"),
        ({"settings": '{"timeout": -1}'}, "settings", "settings.timeout"),
        ({"variables": "[1, 2]"}, "variables", "JSON object"),
        ({"timezone": "Moon/Base"}, "timezone", "time zone"),
        ({"schedule_type": "event", "schedule_interval": ""}, "event_matcher", "event_matcher.source"),
    ],
)
def test_a_bad_value_is_shown_on_its_field_and_nothing_is_saved(admin_client, etl, overrides, field, words):
    response = admin_client.post(reverse("admin:triggers_trigger_add"), trigger_form(etl, **overrides))
    assert response.status_code == 200
    errors = errors_of(response)
    assert field in errors and words in " ".join(errors[field])
    assert Trigger.objects.count() == 0


def test_changing_the_schedule_recomputes_the_next_run(admin_client, etl):
    trigger = services.trigger_create(pipeline=etl, name="nightly", schedule_interval="0 3 * * *", status="active")
    url = reverse("admin:triggers_trigger_change", args=[trigger.pk])
    data = trigger_form(etl, schedule_interval="15 4 * * *")
    data.pop("pipeline")
    response = admin_client.post(url, data)
    assert response.status_code == 302, errors_of(response)
    trigger.refresh_from_db()
    assert trigger.schedule_interval == "15 4 * * *"
    assert (trigger.next_run_at.hour, trigger.next_run_at.minute) == (4, 15)
    assert PipelineRun.objects.count() == 0  # an edit never runs at once
    bad = admin_client.post(url, {**data, "settings": '{"timeout_status": "done"}'})
    assert "settings.timeout_status" in " ".join(errors_of(bad)["settings"])
    assert Trigger.objects.get(pk=trigger.pk).settings == {}


def test_the_change_form_edits_and_activates_in_one_save(admin_client, etl):
    trigger = services.trigger_create(pipeline=etl, name="nightly", schedule_interval="0 3 * * *")
    url = reverse("admin:triggers_trigger_change", args=[trigger.pk])
    data = trigger_form(etl, schedule_interval="15 4 * * *", status="active", settings='{"create_initial_pipeline_run": true}')
    data.pop("pipeline")
    response = admin_client.post(url, data)
    assert response.status_code == 302, errors_of(response)
    trigger.refresh_from_db()
    assert trigger.status == "active" and (trigger.next_run_at.hour, trigger.next_run_at.minute) == (4, 15)
    assert PipelineRun.objects.filter(trigger=trigger).count() == 1  # the activation's initial run
    paused = admin_client.post(url, {**data, "name": "renamed", "status": "inactive"})
    assert paused.status_code == 302, errors_of(paused)
    trigger.refresh_from_db()
    assert (trigger.name, trigger.status, trigger.next_run_at) == ("renamed", "inactive", None)


def test_the_list_shows_the_scheduler_error_and_filters_on_it(admin_client, etl):
    services.trigger_create(pipeline=etl, name="healthy", schedule_interval="@daily", status="active")
    broken = services.trigger_create(pipeline=etl, name="broken", schedule_interval="@daily", status="active")
    Trigger.objects.filter(pk=broken.pk).update(error="schedule_interval: bad", next_run_at=None)
    page = admin_client.get(reverse("admin:triggers_trigger_changelist"))
    assert page.status_code == 200 and b"schedule_interval: bad" in page.content
    flagged = admin_client.get(reverse("admin:triggers_trigger_changelist") + "?has_error=yes")
    assert [t.name for t in flagged.context["cl"].result_list] == ["broken"]


def run_action(client, action: str, triggers) -> Any:
    return client.post(
        reverse("admin:triggers_trigger_changelist"),
        {"action": action, "_selected_action": [t.pk for t in triggers]}, follow=True,
    )


def test_actions_call_the_services(admin_client, etl):
    a = services.trigger_create(pipeline=etl, name="a", schedule_interval="@hourly")
    b = services.trigger_create(pipeline=etl, name="b", schedule_type="api")
    run_action(admin_client, "activate", [a, b])
    a.refresh_from_db()
    assert a.status == "active" and a.next_run_at is not None
    run_action(admin_client, "run_now", [a])
    assert PipelineRun.objects.get(trigger=a).run_type == RunType.MANUAL
    old = Trigger.objects.get(pk=b.pk).token
    run_action(admin_client, "rotate_token", [b])
    assert Trigger.objects.get(pk=b.pk).token != old
    run_action(admin_client, "pause", [a, b])
    assert set(Trigger.objects.values_list("status", flat=True)) == {"inactive"}
    assert Trigger.objects.get(pk=a.pk).next_run_at is None


def test_activating_a_broken_trigger_reports_why(admin_client, etl):
    broken = services.trigger_create(pipeline=etl, name="broken", schedule_interval="@hourly")
    Trigger.objects.filter(pk=broken.pk).update(schedule_interval="whenever")
    response = run_action(admin_client, "activate", [broken])
    text = " ".join(str(m) for m in response.context["messages"])
    assert "Not activated: broken: schedule_interval" in text
    assert Trigger.objects.get(pk=broken.pk).status == "inactive"


def test_the_token_is_shown_only_to_those_who_may_change_triggers(client, admin_client, django_user_model, etl):
    trigger = services.trigger_create(pipeline=etl, name="hook", schedule_type="api", status="active")
    url = reverse("admin:triggers_trigger_change", args=[trigger.pk])
    assert trigger.token.encode() in admin_client.get(url).content
    viewer = django_user_model.objects.create_user("vera", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_trigger"))
    client.force_login(viewer)
    page = client.get(url)
    assert page.status_code == 200 and trigger.token.encode() not in page.content


def test_a_backfill_is_created_and_cancelled_from_the_admin(admin_client, etl):
    response = admin_client.post(reverse("admin:triggers_backfill_add"), {
        "pipeline": etl.pk, "name": "jan", "start_datetime_0": "2024-01-01", "start_datetime_1": "00:00:00",
        "end_datetime_0": "2024-01-03", "end_datetime_1": "00:00:00", "interval": "@daily", "timezone": "UTC",
        "variables": '{"x": 1}',
    })
    assert response.status_code == 302
    backfill = Backfill.objects.get(name="jan")
    assert backfill.runs.count() == 3 and backfill.status == "running"
    listing = admin_client.get(reverse("admin:triggers_backfill_changelist"))
    assert b"0 / 3" in listing.content
    admin_client.post(reverse("admin:triggers_backfill_changelist"), {"action": "cancel", "_selected_action": [backfill.pk]})
    backfill.refresh_from_db()
    assert backfill.status == "cancelled" and set(backfill.runs.values_list("status", flat=True)) == {"cancelled"}
    page = admin_client.get(reverse("admin:triggers_backfill_change", args=[backfill.pk]))
    assert page.status_code == 200 and b"runs of this backfill" in page.content
    runs_page = admin_client.get(reverse("admin:runs_pipelinerun_changelist") + f"?backfill__id__exact={backfill.pk}")
    assert runs_page.status_code == 200 and len(runs_page.context["cl"].result_list) == 3


def test_a_backfill_with_a_bad_range_is_refused_on_the_field(admin_client, etl):
    response = admin_client.post(reverse("admin:triggers_backfill_add"), {
        "pipeline": etl.pk, "start_datetime_0": "2024-01-05", "start_datetime_1": "00:00:00",
        "end_datetime_0": "2024-01-01", "end_datetime_1": "00:00:00", "interval": "@daily", "timezone": "UTC",
        "variables": "{}",
    })
    assert response.status_code == 200 and "end_datetime" in errors_of(response)
    assert Backfill.objects.count() == 0


def test_an_event_page_shows_its_payload_and_runs(admin_client, etl):
    services.trigger_create(pipeline=etl, name="on upload", schedule_type="event", status="active",
                            event_matcher={"source": "s3", "name": "put"})
    event = services.event_record(source="s3", name="put", payload={"key": "a.csv"})
    run = event.runs.get()
    page = admin_client.get(reverse("admin:triggers_event_change", args=[event.pk]))
    assert page.status_code == 200
    assert b"a.csv" in page.content and reverse("admin:runs_pipelinerun_change", args=[run.pk]).encode() in page.content
    listing = admin_client.get(reverse("admin:triggers_event_changelist"))
    assert listing.status_code == 200 and listing.context["cl"].result_list[0].n_runs == 1

"""Trigger services: validation, next_run_at bookkeeping, activation, run now, tokens,
and the API fire with its idempotency key (50 concurrent requests, each on its own
connection)."""

from __future__ import annotations

import itertools
import threading
from datetime import datetime, timedelta

import pytest
from django.core.exceptions import ValidationError

from runs.models import PipelineRun, RunType
from tests.triggers._support import pipeline, utc
from triggers import services
from triggers.models import ApiRequest, Trigger

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]

NOW = utc(2024, 3, 1, 10, 20)
_numbers = itertools.count()


def create(**fields) -> Trigger:
    if "pipeline" not in fields:
        fields["pipeline"] = pipeline(f"p{next(_numbers)}", blocks=0)
    fields.setdefault("name", "t")
    fields.setdefault("schedule_interval", "@hourly")
    fields.setdefault("now", NOW)
    return services.trigger_create(**fields)


def refused(field: str, **fields) -> str:
    """Creating with `fields` is refused naming `field`, and nothing is stored."""
    before = Trigger.objects.count()
    with pytest.raises(ValidationError) as info:
        create(**fields)
    assert field in info.value.message_dict, info.value.message_dict
    assert Trigger.objects.count() == before
    return " ".join(info.value.message_dict[field])


# --- validation --------------------------------------------------------------------------------

def test_a_bad_cron_is_refused_with_the_reason():
    message = refused("schedule_interval", schedule_interval="61 * * * *")
    assert "minute" in message
    assert "5" in refused("schedule_interval", schedule_interval="* * *")


def test_a_time_trigger_needs_an_interval():
    assert "schedule interval" in refused("schedule_interval", schedule_interval="")


def test_a_negative_timeout_is_refused_naming_settings_timeout():
    assert "settings.timeout" in refused("settings", settings={"timeout": -5})


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"sla": "soon"}, "settings.sla"),
        ({"timeout": True}, "settings.timeout"),
        ({"timeout_status": "completed"}, "settings.timeout_status"),
        ({"skip_if_previous_running": "yes"}, "settings.skip_if_previous_running"),
        ({"catch_up": 1}, "settings.catch_up"),
        ({"retries": 3}, "settings.retries"),
    ],
)
def test_each_setting_is_checked(given, named):
    assert named in refused("settings", settings=given)


@pytest.mark.parametrize("variables", [[1, 2], "x=1", 3])
def test_variables_must_be_an_object(variables):
    assert "JSON object" in refused("variables", variables=variables)


def test_other_fields_are_checked():
    refused("schedule_type", schedule_type="cron")
    refused("status", status="running")
    refused("name", name="  ")
    assert "Europe/Paris" in refused("timezone", timezone="europe/paris")  # suggests the spelling
    refused("settings", settings=["timeout"])


def test_an_event_trigger_needs_a_source_and_a_name():
    assert "event_matcher.source" in refused("event_matcher", schedule_type="event", schedule_interval="", event_matcher={"name": "x"})
    assert "event_matcher.name" in refused("event_matcher", schedule_type="event", schedule_interval="", event_matcher={"source": "s", "name": ""})
    refused("event_matcher", schedule_type="event", schedule_interval="", event_matcher={"source": "s", "name": "n", "filters": [1]})
    trigger = create(schedule_type="event", schedule_interval="", event_matcher={"source": " s3 ", "name": "put"})
    assert trigger.event_matcher == {"source": "s3", "name": "put", "filters": {}}


def test_a_refused_update_changes_nothing():
    trigger = create(status="active")
    with pytest.raises(ValidationError) as info:
        services.trigger_update(trigger, name="new name", settings={"timeout": -1}, now=NOW)
    assert "settings" in info.value.message_dict
    trigger.refresh_from_db()
    assert trigger.name == "t" and trigger.settings == {}
    with pytest.raises(ValidationError) as info:
        services.trigger_update(trigger, token="mine")
    assert "token" in info.value.message_dict


# --- next_run_at -------------------------------------------------------------------------------

def test_an_inactive_trigger_has_no_next_run():
    assert create().next_run_at is None


def test_a_cron_is_first_due_at_its_next_fire_time_not_before_its_start_time():
    assert create(status="active").next_run_at == utc(2024, 3, 1, 11)
    later = create(status="active", start_time=utc(2024, 3, 5, 7, 30))
    assert later.next_run_at == utc(2024, 3, 5, 8)


def test_a_naive_start_time_is_read_in_the_triggers_time_zone():
    trigger = create(status="active", schedule_interval="@once", start_time=datetime(2024, 7, 1, 9), timezone="Europe/Paris")
    assert trigger.start_time == utc(2024, 7, 1, 7) and trigger.next_run_at == utc(2024, 7, 1, 7)


def test_once_is_due_at_its_start_time_or_now_and_always_on_now():
    assert create(status="active", schedule_interval="@once").next_run_at == NOW
    assert create(status="active", schedule_interval="@once", start_time=utc(2024, 4, 1)).next_run_at == utc(2024, 4, 1)
    assert create(status="active", schedule_interval="@always_on").next_run_at == NOW


def test_pause_and_activate():
    trigger = create(status="active")
    services.trigger_pause(trigger)
    trigger.refresh_from_db()
    assert trigger.status == "inactive" and trigger.next_run_at is None
    services.trigger_activate(trigger, now=utc(2024, 3, 2, 8, 59))
    trigger.refresh_from_db()
    assert trigger.status == "active" and trigger.next_run_at == utc(2024, 3, 2, 9)
    assert PipelineRun.objects.count() == 0  # activation alone runs nothing


def test_a_broken_stored_trigger_can_be_paused_but_not_activated():
    trigger = create()
    Trigger.objects.filter(pk=trigger.pk).update(schedule_interval="every day")
    trigger.refresh_from_db()
    with pytest.raises(ValidationError) as info:
        services.trigger_activate(trigger, now=NOW)
    assert "schedule_interval" in info.value.message_dict
    assert Trigger.objects.get(pk=trigger.pk).status == "inactive"
    services.trigger_pause(trigger)


def test_create_initial_pipeline_run_starts_one_run_on_activation():
    trigger = create(settings={"create_initial_pipeline_run": True})
    assert PipelineRun.objects.count() == 0
    services.trigger_activate(trigger, now=NOW)
    run = PipelineRun.objects.get(trigger=trigger)
    assert run.run_type == RunType.SCHEDULED and run.execution_date == NOW
    services.trigger_activate(trigger, now=NOW + timedelta(minutes=1))  # already active: nothing
    assert PipelineRun.objects.count() == 1
    trigger.refresh_from_db()
    assert trigger.next_run_at == utc(2024, 3, 1, 11)


def test_an_update_with_a_status_validates_once_and_activates_on_the_new_schedule():
    trigger = create(settings={"create_initial_pipeline_run": True})
    services.trigger_update(trigger, schedule_interval="0 5 * * *", status="active", now=NOW)
    trigger.refresh_from_db()
    assert trigger.status == "active" and trigger.next_run_at == utc(2024, 3, 2, 5)
    assert PipelineRun.objects.filter(trigger=trigger).count() == 1  # the activation's initial run


def test_a_refused_update_with_a_status_changes_neither():
    trigger = create()
    with pytest.raises(ValidationError) as info:
        services.trigger_update(trigger, name="new name", settings={"timeout": -1}, status="active", now=NOW)
    assert "settings" in info.value.message_dict
    trigger.refresh_from_db()
    assert (trigger.status, trigger.name, trigger.next_run_at) == ("inactive", "t", None)


def test_an_update_of_the_status_alone_pauses_even_a_broken_trigger():
    trigger = create(status="active")
    Trigger.objects.filter(pk=trigger.pk).update(schedule_interval="every day")
    trigger.refresh_from_db()
    services.trigger_update(trigger, status="inactive", now=NOW)
    trigger.refresh_from_db()
    assert trigger.status == "inactive" and trigger.next_run_at is None


def test_an_update_to_inactive_with_fields_saves_both():
    trigger = create(status="active")
    services.trigger_update(trigger, name="renamed", status="inactive", now=NOW)
    trigger.refresh_from_db()
    assert (trigger.name, trigger.status, trigger.next_run_at) == ("renamed", "inactive", None)


def test_create_initial_pipeline_run_on_an_active_creation():
    trigger = create(status="active", settings={"create_initial_pipeline_run": True})
    assert PipelineRun.objects.filter(trigger=trigger).count() == 1


# --- run now and tokens ------------------------------------------------------------------------

def test_run_now_merges_pipeline_trigger_and_given_variables(django_user_model):
    user = django_user_model.objects.create_user("ann")
    target = pipeline("vars", blocks=1, variables={"env": "dev", "limit": 1, "keep": True})
    trigger = create(pipeline=target, variables={"limit": 5, "region": "eu"}, settings={"timeout": 30})
    run = services.trigger_run_now(trigger, variables={"region": "us"}, created_by=user)
    assert run.run_type == RunType.MANUAL and run.trigger == trigger and run.created_by == user
    assert run.variables == {"env": "dev", "limit": 5, "keep": True, "region": "us"}
    assert run.timeout == 30 and run.timeout_status == "failed"
    with pytest.raises(ValidationError):
        services.trigger_run_now(trigger, variables=["x"])


def test_rotating_the_token_replaces_it():
    trigger = create(schedule_type="api", schedule_interval="", status="active")
    old = trigger.token
    new = services.trigger_rotate_token(trigger)
    assert new != old and len(new) >= 32
    assert Trigger.objects.get(pk=trigger.pk).token == new
    with pytest.raises(services.TokenRejected):
        services.trigger_fire_api(trigger_id=trigger.pk, token=old)
    run, created = services.trigger_fire_api(trigger_id=trigger.pk, token=new)
    assert created and run.run_type == RunType.API


def test_delete_keeps_the_runs():
    trigger = create(schedule_type="api", schedule_interval="", status="active")
    run = services.trigger_run_now(trigger)
    services.trigger_delete(trigger)
    run.refresh_from_db()
    assert run.trigger is None and not Trigger.objects.filter(pk=trigger.pk).exists()


# --- the API fire ------------------------------------------------------------------------------

@pytest.fixture
def api_trigger() -> Trigger:
    return create(pipeline=pipeline("hook", blocks=1), schedule_type="api", schedule_interval="", status="active", variables={"a": 1})


def test_fire_api_starts_a_run_with_the_variables_on_top(api_trigger):
    run, created = services.trigger_fire_api(trigger_id=api_trigger.pk, token=api_trigger.token, variables={"b": 2})
    assert created and run.variables == {"a": 1, "b": 2} and run.trigger == api_trigger
    run.refresh_from_db()
    assert run.status == "running"


def test_fire_api_refusals_create_nothing(api_trigger):
    with pytest.raises(services.TriggerNotFound):
        services.trigger_fire_api(trigger_id=api_trigger.pk + 1000, token=api_trigger.token)
    with pytest.raises(services.TriggerNotFound):
        services.trigger_fire_api(trigger_id="abc", token=api_trigger.token)
    with pytest.raises(services.TokenRejected):
        services.trigger_fire_api(trigger_id=api_trigger.pk, token=api_trigger.token[:-1] + "x")
    with pytest.raises(services.TokenRejected):
        services.trigger_fire_api(trigger_id=api_trigger.pk, token=None)
    with pytest.raises(ValidationError) as info:
        services.trigger_fire_api(trigger_id=api_trigger.pk, token=api_trigger.token, variables=[1])
    assert "variables" in info.value.message_dict
    services.trigger_pause(api_trigger)
    with pytest.raises(services.TriggerInactive):
        services.trigger_fire_api(trigger_id=api_trigger.pk, token=api_trigger.token)
    assert PipelineRun.objects.count() == 0 and ApiRequest.objects.count() == 0


def test_only_api_triggers_can_be_fired_through_the_api():
    time_trigger = create(status="active")
    with pytest.raises(services.TriggerNotFound):
        services.trigger_fire_api(trigger_id=time_trigger.pk, token=time_trigger.token)


def test_the_same_idempotency_key_returns_the_first_run(api_trigger):
    first, created = services.trigger_fire_api(trigger_id=api_trigger.pk, token=api_trigger.token, idempotency_key="k1")
    again, created_again = services.trigger_fire_api(trigger_id=api_trigger.pk, token=api_trigger.token, idempotency_key="k1", variables={"b": 9})
    other, created_other = services.trigger_fire_api(trigger_id=api_trigger.pk, token=api_trigger.token, idempotency_key="k2")
    assert created and not created_again and created_other
    assert again.pk == first.pk and other.pk != first.pk
    assert PipelineRun.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_fifty_concurrent_requests_with_one_key_make_exactly_one_run():
    trigger = create(pipeline=pipeline("burst", blocks=1), schedule_type="api", schedule_interval="", status="active")
    barrier = threading.Barrier(50)
    results: list[tuple[int, bool]] = []
    errors: list[BaseException] = []

    def call() -> None:
        from django.db import connection as thread_connection  # each thread has its own

        try:
            barrier.wait()
            run, created = services.trigger_fire_api(trigger_id=trigger.pk, token=trigger.token, idempotency_key="same")
            results.append((run.pk, created))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            thread_connection.close()

    threads = [threading.Thread(target=call) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert len(results) == 50
    assert PipelineRun.objects.filter(trigger=trigger).count() == 1
    run_id = PipelineRun.objects.get(trigger=trigger).pk
    assert {pk for pk, _ in results} == {run_id}
    assert sum(created for _, created in results) == 1
    assert ApiRequest.objects.get(trigger=trigger, key="same").run_id == run_id

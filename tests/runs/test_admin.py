from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from pipelines import services
from pipelines.models import Pipeline
from runs.models import BlockRun, BlockRunStatus, LogEntry, PipelineRun, PipelineRunStatus, RunType
from runs.orchestrator import run_create

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]

CODE = "@data_loader\ndef load(*args, **kwargs):\n    return 1\n"


@pytest.fixture
def pipeline() -> Pipeline:
    p = services.pipeline_create(uuid="etl")
    services.block_create(pipeline=p, uuid="load", type="data_loader", content=CODE)
    services.block_create(pipeline=p, uuid="clean", type="transformer", content=CODE, upstream_blocks=["load"])
    services.block_create(pipeline=p, uuid="export", type="data_exporter", content=CODE, upstream_blocks=["clean"])
    return p


@pytest.fixture
def failed_run(pipeline: Pipeline) -> PipelineRun:
    """A run whose first block completed and second failed. The statuses are set
    directly: this is test data for read-only pages, not a transition under test."""
    run = run_create(pipeline, start=False)
    now = timezone.now()
    run.block_runs.filter(block_uuid="load").update(
        status=BlockRunStatus.COMPLETED, attempt=1, started_at=now - timedelta(seconds=3), completed_at=now
    )
    run.block_runs.filter(block_uuid="clean").update(
        status=BlockRunStatus.FAILED, attempt=2, started_at=now, completed_at=now + timedelta(seconds=1),
        error="ZeroDivisionError: division by zero",
        traceback='Traceback (most recent call last):\n  File "clean.py", line 3, in transform\n    1 / 0\nZeroDivisionError: division by zero',
    )
    PipelineRun.objects.filter(pk=run.pk).update(status=PipelineRunStatus.FAILED, started_at=now, completed_at=now)
    br = run.block_runs.get(block_uuid="clean")
    LogEntry.objects.bulk_create(
        LogEntry(pipeline_run=run, block_run=br, timestamp=now, level="INFO" if i % 10 else "ERROR",
                 message=f"line {i:04d}", block_uuid="clean", block_type="transformer")
        for i in range(1, 251)
    )
    run.refresh_from_db()
    return run


def many_runs(pipeline: Pipeline, n: int) -> None:
    for i in range(n):
        run_create(pipeline, start=False, run_type=RunType.SCHEDULED if i % 2 else RunType.MANUAL)


# --- pages answer -------------------------------------------------------------------------

def test_every_runs_admin_page_answers_200_for_a_superuser(admin_client, failed_run):
    br = failed_run.block_runs.get(block_uuid="clean")
    entry = failed_run.logs.first()
    urls = [
        reverse("admin:runs_pipelinerun_changelist"),
        reverse("admin:runs_pipelinerun_changelist") + "?status__exact=failed&run_type__exact=manual",
        reverse("admin:runs_pipelinerun_change", args=[failed_run.pk]),
        reverse("admin:runs_blockrun_changelist"),
        reverse("admin:runs_blockrun_changelist") + f"?status__exact=failed&block_type=transformer&pipeline_run={failed_run.pk}",
        reverse("admin:runs_blockrun_change", args=[br.pk]),
        reverse("admin:runs_logentry_changelist"),
        reverse("admin:runs_logentry_changelist") + f"?pipeline_run={failed_run.pk}&level=ERROR&block_uuid=clean&q=line",
        reverse("admin:runs_logentry_change", args=[entry.pk]),
    ]
    for url in urls:
        assert admin_client.get(url).status_code == 200, url


@pytest.mark.parametrize("name", ["runs_pipelinerun_changelist", "runs_blockrun_changelist", "runs_logentry_changelist"])
def test_an_anonymous_user_is_redirected_to_login(client, failed_run, name):
    response = client.get(reverse(f"admin:{name}"))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_an_anonymous_user_cannot_see_a_run_page(client, failed_run):
    response = client.get(reverse("admin:runs_pipelinerun_change", args=[failed_run.pk]))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


# --- read-only ----------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["pipelinerun", "blockrun", "logentry"])
def test_runs_block_runs_and_logs_cannot_be_added_in_the_admin(admin_client, failed_run, model):
    assert admin_client.get(reverse(f"admin:runs_{model}_add")).status_code == 403


def test_a_run_status_cannot_be_changed_in_the_admin(admin_client, failed_run):
    url = reverse("admin:runs_pipelinerun_change", args=[failed_run.pk])
    response = admin_client.post(url, {"status": "completed", "run_type": "manual"})
    assert response.status_code == 403
    failed_run.refresh_from_db()
    assert failed_run.status == PipelineRunStatus.FAILED
    html = admin_client.get(url).content.decode()
    assert 'name="status"' not in html
    assert 'name="_save"' not in html


def test_a_block_run_status_cannot_be_changed_in_the_admin(admin_client, failed_run):
    br = failed_run.block_runs.get(block_uuid="clean")
    response = admin_client.post(reverse("admin:runs_blockrun_change", args=[br.pk]), {"status": "completed"})
    assert response.status_code == 403
    br.refresh_from_db()
    assert br.status == BlockRunStatus.FAILED


def test_runs_cannot_be_deleted_in_the_admin(admin_client, failed_run):
    response = admin_client.post(reverse("admin:runs_pipelinerun_delete", args=[failed_run.pk]), {"post": "yes"})
    assert response.status_code == 403
    assert PipelineRun.objects.filter(pk=failed_run.pk).exists()
    changelist = admin_client.get(reverse("admin:runs_pipelinerun_changelist"))
    assert "delete_selected" not in changelist.content.decode()


# --- the run page -------------------------------------------------------------------------

def test_the_run_page_shows_only_the_last_200_log_lines(admin_client, failed_run, django_assert_max_num_queries):
    url = reverse("admin:runs_pipelinerun_change", args=[failed_run.pk])
    with django_assert_max_num_queries(15):
        html = admin_client.get(url).content.decode()
    assert "line 0250" in html
    assert "line 0051" in html
    assert "line 0050" not in html
    assert html.index("line 0051") < html.index("line 0250")  # oldest of the tail first
    assert reverse("admin:runs_logentry_changelist") + f"?pipeline_run={failed_run.pk}" in html


def test_the_run_page_lists_its_block_runs_with_status_attempt_and_error(admin_client, failed_run):
    response = admin_client.get(reverse("admin:runs_pipelinerun_change", args=[failed_run.pk]))
    forms = response.context["inline_admin_formsets"][0].formset.forms
    rows = {form.instance.block_uuid: form.instance for form in forms}
    assert set(rows) == {"load", "clean", "export"}
    assert rows["clean"].status == BlockRunStatus.FAILED and rows["clean"].attempt == 2
    html = response.content.decode()
    assert "ZeroDivisionError: division by zero" in html
    assert reverse("admin:runs_blockrun_change", args=[rows["clean"].pk]) in html
    assert "1.0 s" in html  # the failed block's duration


def test_the_block_run_page_shows_the_error_and_traceback_in_monospace(admin_client, failed_run):
    br = failed_run.block_runs.get(block_uuid="clean")
    html = admin_client.get(reverse("admin:runs_blockrun_change", args=[br.pk])).content.decode()
    assert '<pre style="white-space: pre-wrap; margin: 0">Traceback (most recent call last):\n  File &quot;clean.py&quot;, line 3' in html
    assert "<pre" in html and "ZeroDivisionError: division by zero</pre>" in html


# --- lists --------------------------------------------------------------------------------

def test_the_run_changelist_runs_a_bounded_number_of_queries_with_many_runs(
    admin_client, pipeline, failed_run, django_assert_max_num_queries
):
    many_runs(pipeline, 120)
    url = reverse("admin:runs_pipelinerun_changelist")
    for query in ("", "?status__exact=initial", f"?pipeline__id__exact={pipeline.pk}&run_type__exact=scheduled", "?q=etl"):
        with django_assert_max_num_queries(12):
            response = admin_client.get(url + query)
        assert response.status_code == 200
    assert len(response.context["cl"].result_list) == 50  # paginated


def test_the_block_run_and_log_changelists_run_a_bounded_number_of_queries(
    admin_client, pipeline, failed_run, django_assert_max_num_queries
):
    many_runs(pipeline, 60)
    for name in ("runs_blockrun_changelist", "runs_logentry_changelist"):
        with django_assert_max_num_queries(10):
            assert admin_client.get(reverse(f"admin:{name}")).status_code == 200


def test_the_run_changelist_counts_block_runs_per_run(admin_client, failed_run):
    response = admin_client.get(reverse("admin:runs_pipelinerun_changelist"))
    assert "1/3 completed, 1 failed" in response.content.decode()


def test_runs_are_found_by_id_and_by_pipeline_uuid(admin_client, pipeline, failed_run):
    other = services.pipeline_create(uuid="billing")
    other_run = run_create(other, start=False)
    url = reverse("admin:runs_pipelinerun_changelist")

    def found(q: str) -> set[int]:
        return {r.pk for r in admin_client.get(url, {"q": q}).context["cl"].result_list}

    assert found(str(other_run.pk)) == {other_run.pk}
    assert found("bill") == {other_run.pk}
    assert found("etl") == {failed_run.pk}
    assert found("nothing-like-this") == set()


def test_runs_filter_by_status_pipeline_and_run_type(admin_client, pipeline, failed_run):
    many_runs(pipeline, 3)  # initial: manual, scheduled, manual
    url = reverse("admin:runs_pipelinerun_changelist")

    def listed(**params: str) -> list[int]:
        return [r.pk for r in admin_client.get(url, params).context["cl"].result_list]

    assert listed(status__exact="failed") == [failed_run.pk]
    assert len(listed(run_type__exact="scheduled")) == 1
    assert len(listed(pipeline__id__exact=str(pipeline.pk), status__exact="initial")) == 3
    PipelineRun.objects.filter(pk=failed_run.pk).update(created_at=timezone.now() - timedelta(days=30))
    # The same aware bounds Django's date filter puts in its links.
    midnight = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)
    recent = listed(created_at__gte=str(midnight - timedelta(days=7)), created_at__lt=str(midnight + timedelta(days=1)))
    assert len(recent) == 3 and failed_run.pk not in recent


def test_block_runs_filter_by_status_block_type_and_run(admin_client, pipeline, failed_run):
    many_runs(pipeline, 2)
    url = reverse("admin:runs_blockrun_changelist")

    def listed(**params: str) -> list[BlockRun]:
        return list(admin_client.get(url, params).context["cl"].result_list)

    assert [br.block_uuid for br in listed(status__exact="failed")] == ["clean"]
    assert {br.block_type for br in listed(block_type="data_exporter")} == {"data_exporter"}
    assert len(listed(block_type="data_exporter")) == 3
    assert {br.pipeline_run_id for br in listed(pipeline_run=str(failed_run.pk))} == {failed_run.pk}
    assert listed(pipeline_run="not-a-number") == []


def test_log_entries_filter_by_run_level_and_block_and_search_the_message(admin_client, pipeline, failed_run):
    other = run_create(pipeline, start=False)
    LogEntry.objects.create(pipeline_run=other, timestamp=timezone.now(), level="ERROR", message="line 9999 elsewhere", block_uuid="load")
    url = reverse("admin:runs_logentry_changelist")

    def listed(**params: str) -> list[LogEntry]:
        return list(admin_client.get(url, {**params}).context["cl"].result_list)

    assert {e.pipeline_run_id for e in listed(pipeline_run=str(other.pk))} == {other.pk}
    errors = listed(pipeline_run=str(failed_run.pk), level="ERROR")
    assert len(errors) == 25 and {e.level for e in errors} == {"ERROR"}
    assert [e.message for e in listed(block_uuid="load")] == ["line 9999 elsewhere"]
    assert [e.message for e in listed(q="0123")] == ["line 0123"]
    newest_first = listed(pipeline_run=str(failed_run.pk))
    assert newest_first[0].message == "line 0250"


def test_block_runs_are_found_by_run_id_and_block_uuid(admin_client, pipeline, failed_run):
    other = run_create(pipeline, start=False)
    url = reverse("admin:runs_blockrun_changelist")

    def found(q: str) -> set[tuple[int, str]]:
        return {(br.pipeline_run_id, br.block_uuid) for br in admin_client.get(url, {"q": q}).context["cl"].result_list}

    assert found(str(other.pk)) == {(other.pk, "load"), (other.pk, "clean"), (other.pk, "export")}
    assert found("expo") == {(failed_run.pk, "export"), (other.pk, "export")}


def test_the_run_page_shows_a_bounded_number_of_block_runs(admin_client, failed_run, monkeypatch):
    from runs.admin import BlockRunInline

    monkeypatch.setattr(BlockRunInline.formset, "limit", 2)
    response = admin_client.get(reverse("admin:runs_pipelinerun_change", args=[failed_run.pk]))
    assert [f.instance.block_uuid for f in response.context["inline_admin_formsets"][0].formset.forms] == ["load", "clean"]

"""The runs page of a pipeline: the list, its four batch operations and "Run now"."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from runs import orchestrator
from runs.models import BlockRun, BlockRunStatus, PipelineRun, RunAction
from tests.helpers import chain, webhook_trigger

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]

HTMX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def pipeline():
    return chain("orders", 2)


def list_url(pipeline) -> str:
    return f"/pipelines/{pipeline.uuid}/runs"


def action_url(pipeline) -> str:
    return f"/pipelines/{pipeline.uuid}/runs/actions"


def make_run(pipeline, status: str, blocks: dict[str, str] | None = None) -> PipelineRun:
    """A run that no worker touches, set to `status`; `blocks` sets block run statuses
    (as if each had run once)."""
    run = orchestrator.run_create(pipeline, start=False)
    now = timezone.now()
    PipelineRun.objects.filter(pk=run.pk).update(status=status, started_at=now - timedelta(seconds=3), completed_at=now)
    for uuid, block_status in (blocks or {}).items():
        run.block_runs.filter(block_uuid=uuid).update(
            status=block_status, attempt=1, started_at=now - timedelta(seconds=2), completed_at=now,
        )
    run.refresh_from_db()
    return run


def failed_run(pipeline) -> PipelineRun:
    return make_run(pipeline, "failed", {"b000": BlockRunStatus.COMPLETED, "b001": BlockRunStatus.FAILED})


def block(run: PipelineRun, uuid: str) -> BlockRun:
    return run.block_runs.get(block_uuid=uuid)


def texts(response) -> str:
    return response.content.decode()


# --- access -------------------------------------------------------------------------------------

def test_an_anonymous_user_is_sent_to_the_login(client, pipeline):
    response = client.get(list_url(pipeline))
    assert response.status_code == 302
    assert response["Location"] == f"/login/?next=/pipelines/{pipeline.uuid}/runs"


def test_an_unknown_pipeline_is_404(client, viewer_user):
    client.force_login(viewer_user)
    assert client.get("/pipelines/nope/runs").status_code == 404


def test_a_viewer_sees_the_runs_but_no_actions(client, viewer_user, pipeline):
    run = failed_run(pipeline)
    client.force_login(viewer_user)
    response = client.get(list_url(pipeline))
    assert response.status_code == 200
    page = texts(response)
    assert f'href="/pipelines/{pipeline.uuid}/runs/{run.pk}"' in page
    assert '<span class="status failed">failed</span>' in page
    assert 'id="runs-actions"' not in page
    assert 'name="run"' not in page
    assert "Run now" not in page


def test_a_viewer_gets_403_on_every_post(client, viewer_user, pipeline):
    run = failed_run(pipeline)
    client.force_login(viewer_user)
    for action in ("retry", "retry_incomplete", "cancel", "cancel_running", "retry_incomplete_all"):
        response = client.post(action_url(pipeline), {"action": action, "run": [run.pk], "confirm": "yes"})
        assert response.status_code == 403
    assert client.post(f"/pipelines/{pipeline.uuid}/runs/new", {"variables": "{}"}).status_code == 403
    run.refresh_from_db()
    assert run.status == "failed"
    assert PipelineRun.objects.count() == 1
    assert not RunAction.objects.exists()


def test_the_action_urls_refuse_get(client, editor_user, pipeline):
    client.force_login(editor_user)
    assert client.get(action_url(pipeline)).status_code == 405
    assert client.get(f"/pipelines/{pipeline.uuid}/runs/new").status_code == 405


# --- the list -----------------------------------------------------------------------------------

def bulk_runs(pipeline, n: int, trigger=None, status: str = "completed") -> list[PipelineRun]:
    now = timezone.now()
    rows = [
        PipelineRun(pipeline=pipeline, status=status, trigger=trigger, run_type="scheduled" if trigger else "manual",
                    execution_date=now - timedelta(hours=i), started_at=now, completed_at=now + timedelta(seconds=i))
        for i in range(n)
    ]
    return PipelineRun.objects.bulk_create(rows)


def test_the_list_is_newest_first_paginated_and_filtered(client, editor_user, pipeline):
    first = make_run(pipeline, "failed")
    bulk_runs(pipeline, 55)
    newest = make_run(pipeline, "running")
    client.force_login(editor_user)

    page1 = client.get(list_url(pipeline))
    assert list(page1.context["page"].object_list)[0].pk == newest.pk
    assert len(page1.context["page"].object_list) == 50
    page2 = client.get(list_url(pipeline) + "?page=2")
    assert len(page2.context["page"].object_list) == 7
    assert list(page2.context["page"].object_list)[-1].pk == first.pk
    assert client.get(list_url(pipeline) + "?page=garbage").context["page"].number == 1

    failed = client.get(list_url(pipeline) + "?status=failed")
    assert [r.pk for r in failed.context["page"].object_list] == [first.pk]
    # An unknown status filters nothing rather than failing.
    assert client.get(list_url(pipeline) + "?status=bogus").context["page"].paginator.count == 57


def test_the_list_shows_only_this_pipelines_runs_with_trigger_names(client, editor_user, pipeline):
    other = chain("other", 1)
    theirs = make_run(other, "completed")
    trigger = webhook_trigger(pipeline)
    mine = bulk_runs(pipeline, 1, trigger=trigger)[0]
    client.force_login(editor_user)
    page = texts(client.get(list_url(pipeline)))
    assert f"/runs/{mine.pk}\"" in page
    assert f"/runs/{theirs.pk}\"" not in page
    assert "<td>webhook</td>" in page
    assert f'name="run" value="{mine.pk}"' in page


@pytest.mark.parametrize("n", [3, 50])
def test_the_list_costs_a_bounded_number_of_queries(client, editor_user, pipeline, django_assert_max_num_queries, n):
    trigger = webhook_trigger(pipeline)
    bulk_runs(pipeline, n, trigger=trigger)
    client.force_login(editor_user)
    # session, user, groups (can edit), pipeline, count, the page's rows with triggers.
    with django_assert_max_num_queries(7):
        response = client.get(list_url(pipeline))
    assert len(response.context["page"].object_list) == n


# --- the four batch operations ------------------------------------------------------------------

def test_retry_selected_asks_first_then_retries_whole_runs(client, editor_user, pipeline):
    one, two = failed_run(pipeline), failed_run(pipeline)
    client.force_login(editor_user)

    confirm = client.post(action_url(pipeline), {"action": "retry", "run": [one.pk, two.pk]})
    assert confirm.status_code == 200
    assert '<strong class="touched">2</strong> of the 2 selected runs' in texts(confirm)
    assert block(one, "b001").status == "failed"  # nothing done yet

    done = client.post(action_url(pipeline), {"action": "retry", "run": [one.pk, two.pk], "confirm": "yes"}, follow=True)
    assert "Retried 2 runs." in texts(done)
    for run in (one, two):
        run.refresh_from_db()
        assert run.status in ("initial", "running")
        # From scratch: the completed block runs again too, each attempt kept.
        assert block(run, "b000").status != "completed"
        assert len(block(run, "b000").attempts) == 1
        assert len(block(run, "b001").attempts) == 1
        assert RunAction.objects.get(pipeline_run=run).action == "retry"


def test_retry_incomplete_retries_only_the_block_runs_that_did_not_complete(client, editor_user, pipeline):
    run = failed_run(pipeline)
    client.force_login(editor_user)
    confirm = client.post(action_url(pipeline), {"action": "retry_incomplete", "run": [run.pk]}, **HTMX)
    assert confirm.status_code == 200
    assert "<html" not in texts(confirm)  # the panel alone, swapped in by HTMX
    assert '<strong class="touched">1</strong> of the 1 selected run' in texts(confirm)

    done = client.post(action_url(pipeline), {"action": "retry_incomplete", "run": [run.pk], "confirm": "yes"}, follow=True)
    assert "Retried the incomplete block runs of 1 run." in texts(done)
    assert block(run, "b000").status == "completed"
    assert block(run, "b000").attempts == []
    assert block(run, "b001").status in ("initial", "queued")
    assert len(block(run, "b001").attempts) == 1
    assert RunAction.objects.get(pipeline_run=run).action == "retry_incomplete"


def test_a_retry_of_an_unfinished_run_is_refused_and_reported(client, editor_user, pipeline):
    done_run, busy = failed_run(pipeline), make_run(pipeline, "running")
    client.force_login(editor_user)
    confirm = client.post(action_url(pipeline), {"action": "retry", "run": [done_run.pk, busy.pk]})
    assert '<strong class="touched">1</strong> of the 2 selected runs; the other 1 will be refused' in texts(confirm)
    done = client.post(action_url(pipeline), {"action": "retry", "run": [done_run.pk, busy.pk], "confirm": "yes"}, follow=True)
    page = texts(done)
    assert "Retried 1 run." in page
    assert f"Refused run #{busy.pk}: Run {busy.pk} is running: only a finished run can be retried" in page
    busy.refresh_from_db()
    assert busy.status == "running"


def test_cancel_selected_cancels_unfinished_runs_and_reports_finished_ones(client, editor_user, pipeline):
    running, waiting, finished = make_run(pipeline, "running"), make_run(pipeline, "initial"), failed_run(pipeline)
    client.force_login(editor_user)
    ids = [running.pk, waiting.pk, finished.pk]
    confirm = client.post(action_url(pipeline), {"action": "cancel", "run": ids})
    assert '<strong class="touched">2</strong> of the 3 selected runs' in texts(confirm)

    done = client.post(action_url(pipeline), {"action": "cancel", "run": ids, "confirm": "yes"}, follow=True)
    page = texts(done)
    assert "Cancelled 2 runs." in page
    assert f"Refused run #{finished.pk}: Run {finished.pk} is failed: it has already finished" in page
    for run in (running, waiting):
        run.refresh_from_db()
        assert run.status == "cancelled"
        assert set(run.block_runs.values_list("status", flat=True)) == {"cancelled"}
    finished.refresh_from_db()
    assert finished.status == "failed"


def test_cancel_all_running_cancels_every_unfinished_run_of_this_pipeline_only(client, editor_user, pipeline):
    mine = [make_run(pipeline, "running"), make_run(pipeline, "initial")]
    finished = failed_run(pipeline)
    theirs = make_run(chain("other", 1), "running")
    client.force_login(editor_user)

    confirm = client.post(action_url(pipeline), {"action": "cancel_running"}, **HTMX)
    assert '<strong class="touched">2</strong> runs of orders: every one that is initial or running' in texts(confirm)
    done = client.post(action_url(pipeline), {"action": "cancel_running", "confirm": "yes"}, follow=True)
    assert "Cancelled 2 runs." in texts(done)
    assert {r.status for r in PipelineRun.objects.filter(pk__in=[r.pk for r in mine])} == {"cancelled"}
    finished.refresh_from_db()
    theirs.refresh_from_db()
    assert finished.status == "failed"
    assert theirs.status == "running"

    again = client.post(action_url(pipeline), {"action": "cancel_running", "confirm": "yes"}, follow=True)
    assert "No run of orders was initial or running: nothing to do." in texts(again)


def test_retry_all_incomplete_retries_every_failed_or_cancelled_run_of_this_pipeline(client, editor_user, pipeline):
    """Mage's own "Retry all incomplete block runs" button: no selection, the whole pipeline."""
    failed = failed_run(pipeline)
    cancelled = make_run(pipeline, "cancelled", {"b000": BlockRunStatus.COMPLETED, "b001": BlockRunStatus.CANCELLED})
    completed = make_run(pipeline, "completed", {"b000": BlockRunStatus.COMPLETED, "b001": BlockRunStatus.COMPLETED})
    theirs = make_run(chain("other", 1), "failed", {"b000": BlockRunStatus.FAILED})
    client.force_login(editor_user)

    confirm = client.post(action_url(pipeline), {"action": "retry_incomplete_all"}, **HTMX)
    assert '<strong class="touched">2</strong> runs of orders: every one that is failed or cancelled' in texts(confirm)
    done = client.post(action_url(pipeline), {"action": "retry_incomplete_all", "confirm": "yes"}, follow=True)
    assert "Retried the incomplete block runs of 2 runs." in texts(done)
    for run in (failed, cancelled):
        assert block(run, "b000").status == "completed"
        assert len(block(run, "b001").attempts) == 1
        assert RunAction.objects.get(pipeline_run=run).action == "retry_incomplete"
    for run in (completed, theirs):
        run.refresh_from_db()
        assert run.status in ("completed", "failed")
        assert not RunAction.objects.filter(pipeline_run=run).exists()


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "data, message",
    [
        ({"action": "retry"}, "No runs selected"),
        ({"action": "retry", "run": ["abc"]}, "Not run ids: &#x27;abc&#x27;"),
        ({"action": "cancel", "run": ["9" * 40]}, "Not run ids"),
        ({"action": "cancel", "run": ["-1"]}, "Not run ids"),
        ({"action": "explode", "run": ["1"]}, "Choose an action"),
        ({"action": "retry", "run": ["999999"], "confirm": "yes"}, "Not runs of orders: #999999"),
    ],
)
def test_bad_input_gets_a_message_and_changes_nothing(client, editor_user, pipeline, data, message):
    run = failed_run(pipeline)
    client.force_login(editor_user)
    response = client.post(action_url(pipeline), data, follow=True)
    assert response.status_code == 200
    assert message in texts(response)
    panel = client.post(action_url(pipeline), data, **HTMX)
    assert panel.status_code == 200
    assert message in texts(panel)
    run.refresh_from_db()
    assert run.status == "failed"
    assert not RunAction.objects.exists()


def test_runs_of_another_pipeline_are_refused(client, editor_user, pipeline):
    mine = make_run(pipeline, "running")
    theirs = make_run(chain("other", 1), "running")
    client.force_login(editor_user)
    response = client.post(action_url(pipeline), {"action": "cancel", "run": [mine.pk, theirs.pk], "confirm": "yes"}, follow=True)
    assert f"Not runs of orders: #{theirs.pk}" in texts(response)
    for run in (mine, theirs):
        run.refresh_from_db()
        assert run.status == "running"


# --- run now ------------------------------------------------------------------------------------

def test_run_now_creates_a_manual_run_with_the_variables(client, editor_user, pipeline):
    client.force_login(editor_user)
    response = client.post(f"/pipelines/{pipeline.uuid}/runs/new", {"variables": '{"region": "us", "n": 3}'})
    run = PipelineRun.objects.get()
    assert response.status_code == 302
    assert response["Location"] == f"/pipelines/{pipeline.uuid}/runs/{run.pk}"
    assert run.run_type == "manual"
    assert run.created_by == editor_user
    assert run.variables["region"] == "us"
    assert run.variables["n"] == 3
    assert run.block_runs.count() == 2


def test_run_now_without_variables_uses_the_pipelines(client, editor_user, pipeline):
    client.force_login(editor_user)
    assert client.post(f"/pipelines/{pipeline.uuid}/runs/new", {"variables": ""}).status_code == 302
    assert PipelineRun.objects.get().variables == (pipeline.variables or {})


@pytest.mark.parametrize(
    "text, problem",
    [("{oops", "is not valid JSON"), ("[1, 2]", "must be a JSON object"), ('{"x": NaN}', "variables.x: is NaN")],
)
def test_run_now_refuses_bad_variables(client, editor_user, pipeline, text, problem):
    client.force_login(editor_user)
    response = client.post(f"/pipelines/{pipeline.uuid}/runs/new", {"variables": text})
    assert response.status_code == 400
    assert problem in texts(response)
    assert not PipelineRun.objects.exists()

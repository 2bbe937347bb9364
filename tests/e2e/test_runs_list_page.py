"""The runs page of a pipeline in a real browser: a batch operation through its HTMX
confirmation panel, and "Run now" with variables."""

from __future__ import annotations

import pytest

from runs import orchestrator
from runs.models import PipelineRun
from tests.e2e.conftest import shot
from tests.helpers import chain

pytestmark = pytest.mark.django_db(transaction=True)


def log_in_to(page, username: str, next_url: str) -> None:
    page.goto(f"/login/?next={next_url}")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", "pw")
    page.click("button[type=submit]")
    page.wait_for_url(f"**{next_url}")


def running_run(pipeline) -> PipelineRun:
    run = orchestrator.run_create(pipeline, start=False)
    PipelineRun.objects.filter(pk=run.pk).update(status="running")
    return run


def test_an_editor_cancels_selected_runs_through_the_confirmation_panel(page, editor_user):
    pipeline = chain("orders", 2)
    one, two, other = running_run(pipeline), running_run(pipeline), running_run(pipeline)
    log_in_to(page, "erin", "/pipelines/orders/runs")

    page.check("#runs-select-all")
    page.uncheck(f'input[name="run"][value="{other.pk}"]')
    page.select_option("select[name=action]", "cancel")
    page.click("text=Apply…")
    panel = page.locator("#runs-confirm")
    panel.locator(".touched").wait_for()
    assert page.url.endswith("/pipelines/orders/runs")  # swapped in, no navigation
    assert "This will touch 2 of the 2 selected runs" in panel.inner_text()
    shot(page, "runs-list-confirm")

    panel.locator("button.primary").click()
    page.locator(".messages").wait_for()
    assert "Cancelled 2 runs." in page.locator(".messages").inner_text()
    assert page.locator("span.status.cancelled").count() == 2
    shot(page, "runs-list-cancelled")
    statuses = dict(PipelineRun.objects.values_list("id", "status"))
    assert (statuses[one.pk], statuses[two.pk], statuses[other.pk]) == ("cancelled", "cancelled", "running")


def test_an_editor_starts_a_run_with_variables(page, editor_user):
    chain("orders", 1)
    log_in_to(page, "erin", "/pipelines/orders/runs")
    page.click("summary:has-text('Run now')")
    page.fill("textarea[name=variables]", '{"region": "us"}')
    page.click("text=Start the run")
    run = PipelineRun.objects.get()
    page.wait_for_url(f"**/pipelines/orders/runs/{run.pk}")
    assert run.variables["region"] == "us"
    assert run.run_type == "manual"


def test_a_viewer_sees_the_runs_and_no_actions(page, viewer_user):
    running_run(chain("orders", 1))
    log_in_to(page, "vic", "/pipelines/orders/runs")
    assert page.locator("table.runs tbody tr").count() == 1
    assert page.locator("#runs-actions").count() == 0
    assert page.locator("text=Run now").count() == 0

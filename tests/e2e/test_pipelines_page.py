"""A new user's first minutes, in a real browser: log in, create a pipeline, find it."""

from __future__ import annotations

import pytest

from pipelines.models import Pipeline
from tests.e2e.conftest import log_in, shot
from tests.helpers import block_code, make_pipeline

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_editor_logs_in_creates_a_pipeline_and_filters_by_tag(page, editor_user):
    make_pipeline("billing", [("load", "data_loader", block_code("data_loader", "return 1"))], tags=["finance"])
    page.goto("/")
    assert "/login/" in page.url  # the front door asks who you are
    shot(page, "login")
    log_in(page, "erin")
    assert page.locator("table").inner_text().count("billing") >= 1

    page.click("text=+ New pipeline")
    page.fill("dialog input[name=name]", "Daily Orders")
    page.fill("dialog input[name=tags]", "sales, daily")
    shot(page, "pipelines-new")
    page.click("dialog button[type=submit]")
    page.wait_for_url("**/pipelines/daily_orders/runs")
    assert Pipeline.objects.get(uuid="daily_orders").tags == ["sales", "daily"]

    page.goto("/pipelines/")
    page.select_option("select[name=tag]", "sales")
    page.click("text=Filter")
    rows = page.locator("tbody tr")
    assert rows.count() == 1 and "Daily Orders" in rows.inner_text()
    shot(page, "pipelines")


def test_a_viewer_sees_the_pipelines_but_no_way_to_change_them(page, viewer_user):
    make_pipeline("billing", [("load", "data_loader", block_code("data_loader", "return 1"))])
    log_in(page, "vic")
    assert "billing" in page.locator("table").inner_text()
    assert page.locator("text=+ New pipeline").count() == 0
    assert page.locator("text=Delete").count() == 0

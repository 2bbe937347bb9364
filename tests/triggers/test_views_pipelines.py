"""The pipelines page, login and the front door."""

from __future__ import annotations

import pytest
from django.test import Client

from pipelines.models import Pipeline
from runs import orchestrator
from runs.models import BlockRun, PipelineRun
from tests.helpers import block_code, make_pipeline
from triggers import services as trigger_services

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]


def two_blocks(uuid: str, **fields) -> Pipeline:
    return make_pipeline(uuid, [
        ("load", "data_loader", block_code("data_loader", "return 1")),
        ("clean", "transformer", block_code("transformer", "return 2"), ["load"]),
    ], **fields)


def as_user(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_the_front_door_leads_to_the_pipelines_and_anonymous_users_to_the_login():
    assert Client().get("/").headers["Location"] == "/pipelines/"
    response = Client().get("/pipelines/")
    assert response.status_code == 302 and response.headers["Location"] == "/login/?next=/pipelines/"
    for url in ("/pipelines/x/delete",):
        assert Client().get(url).headers["Location"].startswith("/login/")


def test_a_user_logs_in_and_out(editor_user):
    client = Client()
    page = client.get("/login/")
    assert page.status_code == 200 and b'name="password"' in page.content
    assert client.post("/login/", {"username": "erin", "password": "wrong"}).status_code == 200
    response = client.post("/login/", {"username": "erin", "password": "pw", "next": "/pipelines/"})
    assert response.headers["Location"] == "/pipelines/"
    assert client.get("/pipelines/").status_code == 200
    assert client.post("/logout/").headers["Location"] == "/login/"
    assert client.get("/pipelines/").status_code == 302


def test_the_list_shows_blocks_active_triggers_and_the_last_run(viewer_user):
    orders = two_blocks("orders", name="Orders", tags=["sales", "daily"])
    two_blocks("billing", name="Billing")
    trigger_services.trigger_create(pipeline=orders, name="hook", schedule_type="api", status="active")
    trigger_services.trigger_create(pipeline=orders, name="off", schedule_type="api", status="inactive")
    orchestrator.run_create(orders, start=False)
    last = orchestrator.run_create(orders, start=False)
    PipelineRun.objects.filter(pk=last.pk).update(status="failed")

    page = as_user(viewer_user).get("/pipelines/")
    assert page.status_code == 200
    rows = {p.uuid: p for p in page.context["page"]}
    assert (rows["orders"].block_count, rows["orders"].active_triggers, rows["orders"].last_run_status) == (2, 1, "failed")
    assert rows["orders"].last_run_id == last.pk
    assert (rows["billing"].block_count, rows["billing"].active_triggers, rows["billing"].last_run_id) == (2, 0, None)
    html = page.content.decode()
    assert "sales" in html and f"/pipelines/orders/runs/{last.pk}" in html
    assert "New pipeline" not in html and "/delete" not in html  # a viewer changes nothing


def test_filter_by_tag_and_search_by_name(viewer_user):
    two_blocks("orders", name="Orders", tags=["sales"])
    two_blocks("billing", name="Billing", tags=["finance", "sales-eu"])
    client = as_user(viewer_user)

    def uuids(query: str) -> list[str]:
        return [p.uuid for p in client.get(f"/pipelines/?{query}").context["page"]]

    assert uuids("tag=sales") == ["orders"]  # a whole tag, not a part of another
    assert uuids("tag=finance") == ["billing"]
    assert uuids("q=bill") == ["billing"]
    assert uuids("q=ORD") == ["orders"]
    assert uuids("q=nothing") == []


def test_the_list_takes_the_same_queries_for_one_pipeline_or_many(viewer_user, django_assert_max_num_queries):
    client = as_user(viewer_user)
    for i in range(3):
        pipeline = two_blocks(f"p{i}")
        orchestrator.run_create(pipeline, start=False)
    with django_assert_max_num_queries(8) as few:
        client.get("/pipelines/")
    for i in range(3, 30):
        pipeline = two_blocks(f"p{i}", tags=[f"t{i}"])
        orchestrator.run_create(pipeline, start=False)
    with django_assert_max_num_queries(len(few.captured_queries)):
        assert len(client.get("/pipelines/").context["page"]) == 30


def test_an_editor_creates_a_pipeline(editor_user):
    client = as_user(editor_user)
    response = client.post("/pipelines/", {"name": "Daily Orders", "description": "d", "tags": "sales, daily"})
    assert response.headers["Location"] == "/pipelines/daily_orders/runs"
    created = Pipeline.objects.get(uuid="daily_orders")
    assert (created.name, created.description, created.tags) == ("Daily Orders", "d", ["sales", "daily"])


def test_a_new_pipeline_is_refused_inline_naming_the_field(editor_user):
    client = as_user(editor_user)
    two_blocks("orders")
    response = client.post("/pipelines/", {"name": "Orders"})
    assert response.status_code == 400
    assert "exists already" in response.content.decode()
    response = client.post("/pipelines/", {"name": ""})
    assert response.status_code == 400 and response.context["form"].errors["name"]
    assert Pipeline.objects.count() == 1


def test_a_viewer_cannot_create_or_delete(viewer_user):
    client = as_user(viewer_user)
    two_blocks("orders")
    assert client.post("/pipelines/", {"name": "New"}).status_code == 403
    assert client.get("/pipelines/orders/delete").status_code == 403
    assert client.post("/pipelines/orders/delete").status_code == 403
    assert list(Pipeline.objects.values_list("uuid", flat=True)) == ["orders"]


def test_delete_says_how_many_runs_go_and_takes_them(editor_user):
    client = as_user(editor_user)
    pipeline = two_blocks("orders")
    for _ in range(3):
        run = orchestrator.run_create(pipeline, start=False)
        PipelineRun.objects.filter(pk=run.pk).update(status="completed")
    confirm = client.get("/pipelines/orders/delete")
    assert confirm.status_code == 200 and "3 runs" in confirm.content.decode()
    response = client.post("/pipelines/orders/delete")
    assert response.headers["Location"] == "/pipelines/"
    assert not Pipeline.objects.exists() and not PipelineRun.objects.exists() and not BlockRun.objects.exists()


def test_a_pipeline_with_a_run_not_finished_is_not_deleted(editor_user):
    client = as_user(editor_user)
    pipeline = two_blocks("orders")
    orchestrator.run_create(pipeline, start=False)  # initial: not finished
    assert "not finished" in client.get("/pipelines/orders/delete").content.decode()
    client.post("/pipelines/orders/delete")
    assert Pipeline.objects.filter(uuid="orders").exists() and PipelineRun.objects.count() == 1
    assert client.get("/pipelines/missing/delete").status_code == 404

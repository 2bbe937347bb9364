from __future__ import annotations

from typing import Any

import pytest
from django.urls import reverse

from pipelines import services
from pipelines.models import Block, BlockEdge, Pipeline
from pipelines.selectors import block_upstream_uuids

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]

LOADER = "@data_loader\ndef load(*args, **kwargs):\n    return [1, 2, 3]\n"
TRANSFORMER = "@transformer\ndef transform(data, *args, **kwargs):\n    return data\n"
BROKEN = "x = 1\n\ndef broken(:\n    return x\n"  # the syntax error is on line 3


@pytest.fixture
def pipeline() -> Pipeline:
    """a -> b -> c, plus a lone block d."""
    p = services.pipeline_create(uuid="etl", name="ETL")
    services.block_create(pipeline=p, uuid="a", type="data_loader", content=LOADER)
    services.block_create(pipeline=p, uuid="b", type="transformer", content=TRANSFORMER, upstream_blocks=["a"])
    services.block_create(pipeline=p, uuid="c", type="data_exporter", content=TRANSFORMER, upstream_blocks=["b"])
    services.block_create(pipeline=p, uuid="d", type="data_loader", content=LOADER)
    return p


def edges(pipeline: Pipeline) -> list[tuple[str, str, int]]:
    return list(
        BlockEdge.objects.filter(downstream__pipeline=pipeline)
        .order_by("downstream__uuid", "position")
        .values_list("downstream__uuid", "upstream__uuid", "position")
    )


def page_data(response: Any) -> dict[str, Any]:
    """The POST a browser would send for an admin add/change page as it was rendered."""
    data: dict[str, Any] = {}

    def add_form(form: Any) -> None:
        for name in form.fields:
            value = form[name].value()
            if value is None or value is False:
                continue
            data[form.add_prefix(name)] = "on" if value is True else value

    add_form(response.context["adminform"].form)
    for inline in response.context["inline_admin_formsets"]:
        formset = inline.formset
        for name, field in formset.management_form.fields.items():
            data[formset.management_form.add_prefix(name)] = formset.management_form[name].value()
            del field
        for form in formset.forms:
            add_form(form)
    return data


def block_add_data(pipeline: Pipeline, **overrides: Any) -> dict[str, Any]:
    data = {
        "pipeline": pipeline.pk, "uuid": "e", "name": "", "type": "transformer",
        "language": "python", "content": TRANSFORMER, "configuration": "{}",
        "retry_config": "", "timeout": "", "position": "", "extra": "{}", "upstream_blocks": "",
    }
    data.update(overrides)
    return data


def block_change_data(admin_client: Any, block: Block, **overrides: Any) -> dict[str, Any]:
    data = page_data(admin_client.get(reverse("admin:pipelines_block_change", args=[block.pk])))
    data.update(overrides)
    return data


# --- pages answer -------------------------------------------------------------------------

def test_every_pipelines_admin_page_answers_200_for_a_superuser(admin_client, pipeline):
    block = pipeline.blocks.get(uuid="b")
    edge = BlockEdge.objects.first()
    urls = [
        reverse("admin:pipelines_pipeline_changelist"),
        reverse("admin:pipelines_pipeline_add"),
        reverse("admin:pipelines_pipeline_change", args=[pipeline.pk]),
        reverse("admin:pipelines_block_changelist"),
        reverse("admin:pipelines_block_add") + f"?pipeline={pipeline.pk}",
        reverse("admin:pipelines_block_change", args=[block.pk]),
        reverse("admin:pipelines_blockedge_changelist"),
        reverse("admin:pipelines_blockedge_add"),
        reverse("admin:pipelines_blockedge_change", args=[edge.pk]),
    ]
    for url in urls:
        assert admin_client.get(url).status_code == 200, url


@pytest.mark.parametrize(
    "name", ["pipelines_pipeline_changelist", "pipelines_block_changelist", "pipelines_blockedge_changelist", "pipelines_block_add"]
)
def test_an_anonymous_user_is_redirected_to_login(client, name):
    response = client.get(reverse(f"admin:{name}"))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_the_pipeline_page_lists_its_blocks_with_links_and_upstreams(admin_client, pipeline):
    response = admin_client.get(reverse("admin:pipelines_pipeline_change", args=[pipeline.pk]))
    html = response.content.decode()
    for block in pipeline.blocks.all():
        assert reverse("admin:pipelines_block_change", args=[block.pk]) in html
    rows = response.context["inline_admin_formsets"][0].formset.forms
    assert [form.instance.uuid for form in rows] == ["a", "b", "c", "d"]
    assert reverse("admin:pipelines_block_add") + f"?pipeline={pipeline.pk}" in html


def test_the_add_block_page_from_a_pipeline_preselects_it_and_lists_its_blocks(admin_client, pipeline):
    response = admin_client.get(reverse("admin:pipelines_block_add"), {"pipeline": pipeline.pk})
    form = response.context["adminform"].form
    assert form["pipeline"].value() == str(pipeline.pk)
    assert "Blocks of this pipeline: a, b, c, d." in form.fields["upstream_blocks"].help_text


def test_the_changelists_run_a_bounded_number_of_queries(admin_client, pipeline, django_assert_max_num_queries):
    for i in range(30):
        p = services.pipeline_create(uuid=f"p{i}")
        services.block_create(pipeline=p, uuid="x", type="data_loader", content=LOADER)
        services.block_create(pipeline=p, uuid="y", type="transformer", content=TRANSFORMER, upstream_blocks=["x"])
    for name in ("pipelines_pipeline_changelist", "pipelines_block_changelist", "pipelines_blockedge_changelist"):
        with django_assert_max_num_queries(12):
            assert admin_client.get(reverse(f"admin:{name}")).status_code == 200


# --- pipelines ----------------------------------------------------------------------------

def test_adding_a_pipeline_goes_through_the_service(admin_client):
    data = {
        "uuid": "sales", "name": "", "description": "", "tags": '["daily"]', "type": "python",
        "variables": '{"env": "dev"}', "concurrency_config": '{"block_run_limit": 2}',
        "retry_config": "{}", "notification_config": "{}", "extra": "{}",
    }
    response = admin_client.post(reverse("admin:pipelines_pipeline_add"), data)
    assert response.status_code == 302
    pipeline = Pipeline.objects.get(uuid="sales")
    assert pipeline.name == "sales"  # the service names an unnamed pipeline after its uuid
    assert pipeline.block_run_limit == 2
    assert pipeline.tags == ["daily"]


def test_a_pipeline_with_a_bad_concurrency_limit_is_refused_on_that_field(admin_client, pipeline):
    url = reverse("admin:pipelines_pipeline_change", args=[pipeline.pk])
    data = page_data(admin_client.get(url))
    data["concurrency_config"] = '{"block_run_limit": 0}'
    response = admin_client.post(url, data)
    assert response.status_code == 200
    assert "block_run_limit must be a positive integer" in str(response.context["adminform"].form.errors["concurrency_config"])
    pipeline.refresh_from_db()
    assert pipeline.concurrency_config == {}


def test_changing_a_pipeline_keeps_its_blocks(admin_client, pipeline):
    url = reverse("admin:pipelines_pipeline_change", args=[pipeline.pk])
    data = page_data(admin_client.get(url))
    data["name"] = "Renamed"
    before = edges(pipeline)
    response = admin_client.post(url, data)
    assert response.status_code == 302
    pipeline.refresh_from_db()
    assert pipeline.name == "Renamed"
    assert pipeline.blocks.count() == 4
    assert edges(pipeline) == before


# --- blocks: code -------------------------------------------------------------------------

def test_adding_a_block_with_a_syntax_error_is_refused_with_the_line_number(admin_client, pipeline):
    before = (Block.objects.count(), edges(pipeline))
    data = block_add_data(pipeline, content=BROKEN, upstream_blocks="c")
    response = admin_client.post(reverse("admin:pipelines_block_add"), data)
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "line 3" in str(errors["content"])
    assert "line 3" in response.content.decode()
    assert (Block.objects.count(), edges(pipeline)) == before
    assert not pipeline.blocks.filter(uuid="e").exists()


def test_changing_a_block_to_a_syntax_error_is_refused_and_changes_nothing(admin_client, pipeline):
    block = pipeline.blocks.get(uuid="b")
    old = (block.content, block.content_hash, block.updated_at)
    before = edges(pipeline)
    data = block_change_data(admin_client, block, content=BROKEN, upstream_blocks="d, a")
    response = admin_client.post(reverse("admin:pipelines_block_change", args=[block.pk]), data)
    assert response.status_code == 200
    assert "line 3" in str(response.context["adminform"].form.errors["content"])
    block.refresh_from_db()
    assert (block.content, block.content_hash, block.updated_at) == old
    assert edges(pipeline) == before


def test_sql_content_is_not_checked_as_python(admin_client, pipeline):
    data = block_add_data(pipeline, language="sql", content="SELECT * FROM {{ df_1 }}", upstream_blocks="a")
    response = admin_client.post(reverse("admin:pipelines_block_add"), data)
    assert response.status_code == 302
    assert pipeline.blocks.get(uuid="e").language == "sql"


def test_the_code_is_saved_with_unix_line_endings_and_its_hash(admin_client, pipeline):
    data = block_add_data(pipeline, content=TRANSFORMER.replace("\n", "\r\n"))
    response = admin_client.post(reverse("admin:pipelines_block_add"), data)
    assert response.status_code == 302
    block = pipeline.blocks.get(uuid="e")
    assert block.content == TRANSFORMER
    assert block.content_hash == services.content_hash(TRANSFORMER)


# --- blocks: edges ------------------------------------------------------------------------

def test_an_upstream_edge_that_closes_a_cycle_is_refused_with_the_cycle_named(admin_client, pipeline):
    block = pipeline.blocks.get(uuid="a")
    before = edges(pipeline)
    data = block_change_data(admin_client, block, upstream_blocks="c")
    response = admin_client.post(reverse("admin:pipelines_block_change", args=[block.pk]), data)
    assert response.status_code == 200
    message = str(response.context["adminform"].form.errors["upstream_blocks"])
    assert "cycle" in message
    assert "a -&gt; b -&gt; c -&gt; a" in message or "a -> b -> c -> a" in message
    assert edges(pipeline) == before
    block.refresh_from_db()
    assert block_upstream_uuids(block) == []


def test_a_block_cannot_be_its_own_upstream(admin_client, pipeline):
    block = pipeline.blocks.get(uuid="d")
    data = block_change_data(admin_client, block, upstream_blocks="d")
    response = admin_client.post(reverse("admin:pipelines_block_change", args=[block.pk]), data)
    assert response.status_code == 200
    assert "cycle" in str(response.context["adminform"].form.errors["upstream_blocks"])
    assert block_upstream_uuids(block) == []


def test_an_unknown_upstream_block_is_refused_by_name(admin_client, pipeline):
    before = Block.objects.count()
    data = block_add_data(pipeline, upstream_blocks="a, nope")
    response = admin_client.post(reverse("admin:pipelines_block_add"), data)
    assert response.status_code == 200
    assert "nope" in str(response.context["adminform"].form.errors["upstream_blocks"])
    assert Block.objects.count() == before


def test_a_valid_block_is_created_with_its_edges_in_the_given_order(admin_client, pipeline):
    data = block_add_data(pipeline, upstream_blocks="d, a,b")
    response = admin_client.post(reverse("admin:pipelines_block_add"), data)
    assert response.status_code == 302
    block = pipeline.blocks.get(uuid="e")
    assert block_upstream_uuids(block) == ["d", "a", "b"]
    assert block.position == 4  # appended after the four blocks
    assert block.content_hash == services.content_hash(TRANSFORMER)
    assert response["Location"] == reverse("admin:pipelines_block_changelist")


def test_changing_the_upstreams_reorders_the_edges(admin_client, pipeline):
    block = pipeline.blocks.get(uuid="c")
    data = block_change_data(admin_client, block, upstream_blocks="d, b")
    response = admin_client.post(reverse("admin:pipelines_block_change", args=[block.pk]), data)
    assert response.status_code == 302
    assert block_upstream_uuids(block) == ["d", "b"]


def test_saving_a_block_without_touching_its_upstreams_keeps_the_edge_rows(admin_client, pipeline):
    block = pipeline.blocks.get(uuid="c")
    edge_ids = list(BlockEdge.objects.filter(downstream=block).values_list("id", flat=True))
    data = block_change_data(admin_client, block, name="Export")
    response = admin_client.post(reverse("admin:pipelines_block_change", args=[block.pk]), data)
    assert response.status_code == 302
    block.refresh_from_db()
    assert block.name == "Export"
    assert list(BlockEdge.objects.filter(downstream=block).values_list("id", flat=True)) == edge_ids


def test_a_uuid_already_used_in_the_pipeline_is_refused_as_a_form_error(admin_client, pipeline):
    before = Block.objects.count()
    response = admin_client.post(reverse("admin:pipelines_block_add"), block_add_data(pipeline, uuid="a"))
    assert response.status_code == 200
    assert "already exists" in str(response.context["adminform"].form.errors)
    assert Block.objects.count() == before


def test_deleting_a_block_removes_its_edges(admin_client, pipeline):
    block = pipeline.blocks.get(uuid="b")
    url = reverse("admin:pipelines_block_delete", args=[block.pk])
    assert admin_client.post(url, {"post": "yes"}).status_code == 302
    assert not Block.objects.filter(pk=block.pk).exists()
    assert edges(pipeline) == []


def test_an_edge_cannot_be_changed_in_place(admin_client, pipeline):
    edge = BlockEdge.objects.first()
    before = edges(pipeline)
    response = admin_client.post(
        reverse("admin:pipelines_blockedge_change", args=[edge.pk]),
        {"downstream": edge.upstream_id, "upstream": edge.downstream_id, "position": 0},
    )
    assert response.status_code == 403
    assert edges(pipeline) == before


def test_adding_an_edge_that_closes_a_cycle_is_refused_with_the_cycle_named(admin_client, pipeline):
    a, c = pipeline.blocks.get(uuid="a"), pipeline.blocks.get(uuid="c")
    before = edges(pipeline)
    response = admin_client.post(reverse("admin:pipelines_blockedge_add"), {"downstream": a.pk, "upstream": c.pk})
    assert response.status_code == 200
    message = str(response.context["adminform"].form.errors["upstream"])
    assert "cycle" in message and "c -&gt; a" in message
    assert edges(pipeline) == before


def test_adding_an_edge_inserts_it_at_the_given_position(admin_client, pipeline):
    c, d = pipeline.blocks.get(uuid="c"), pipeline.blocks.get(uuid="d")
    response = admin_client.post(reverse("admin:pipelines_blockedge_add"), {"downstream": c.pk, "upstream": d.pk, "position": 0})
    assert response.status_code == 302
    assert block_upstream_uuids(c) == ["d", "b"]


def test_an_edge_to_a_block_of_another_pipeline_is_refused(admin_client, pipeline):
    other = services.pipeline_create(uuid="other")
    x = services.block_create(pipeline=other, uuid="x", type="data_loader", content=LOADER)
    d = pipeline.blocks.get(uuid="d")
    response = admin_client.post(reverse("admin:pipelines_blockedge_add"), {"downstream": d.pk, "upstream": x.pk})
    assert response.status_code == 200
    assert "unknown upstream block" in str(response.context["adminform"].form.errors["upstream"])
    assert block_upstream_uuids(d) == []


def test_adding_an_existing_edge_again_is_refused(admin_client, pipeline):
    a, b = pipeline.blocks.get(uuid="a"), pipeline.blocks.get(uuid="b")
    before = list(BlockEdge.objects.values_list("id", "downstream", "upstream", "position"))
    response = admin_client.post(reverse("admin:pipelines_blockedge_add"), {"downstream": b.pk, "upstream": a.pk})
    assert response.status_code == 200
    assert "already exists" in str(response.context["adminform"].form.errors)
    assert list(BlockEdge.objects.values_list("id", "downstream", "upstream", "position")) == before


def test_deleting_an_edge_renumbers_the_remaining_upstreams(admin_client, pipeline):
    c = pipeline.blocks.get(uuid="c")
    services.block_set_upstreams(c, ["a", "b", "d"])
    edge = BlockEdge.objects.get(downstream=c, upstream__uuid="a")
    response = admin_client.post(reverse("admin:pipelines_blockedge_delete", args=[edge.pk]), {"post": "yes"})
    assert response.status_code == 302
    assert list(BlockEdge.objects.filter(downstream=c).values_list("upstream__uuid", "position")) == [("b", 0), ("d", 1)]

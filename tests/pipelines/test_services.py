"""Writes to pipelines and blocks through pipelines/services.py, against the real database."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from pipelines import services
from pipelines.models import Block, BlockEdge, content_hash
from pipelines.selectors import block_upstream_uuids, pipeline_graph

pytestmark = [pytest.mark.sqlite, pytest.mark.django_db]

GOOD = "@transformer\ndef run(*args, **kwargs):\n    return 1\n"
# Line 3 lacks the closing parenthesis.
BROKEN = "@transformer\ndef run(*args, **kwargs):\n    return len([1, 2\n"


@pytest.fixture
def pipeline():
    return services.pipeline_create(uuid="etl")


def _chain(pipeline, *uuids: str) -> list[Block]:
    """Blocks uuids[0] -> uuids[1] -> ..."""
    blocks = []
    for i, uuid in enumerate(uuids):
        blocks.append(
            services.block_create(
                pipeline=pipeline, uuid=uuid, type="data_loader" if i == 0 else "transformer",
                content=GOOD, upstream_blocks=[uuids[i - 1]] if i else [],
            )
        )
    return blocks


def _edges(pipeline) -> list[tuple[str, str, int]]:
    return sorted(
        BlockEdge.objects.filter(downstream__pipeline=pipeline)
        .values_list("upstream__uuid", "downstream__uuid", "position")
    )


def _syntax_line(content: str) -> int:
    try:
        compile(content, "x", "exec")
    except SyntaxError as exc:
        return exc.lineno
    raise AssertionError("content compiles")


def test_block_create_refuses_a_syntax_error_naming_the_line_and_writes_nothing(pipeline):
    line = _syntax_line(BROKEN)

    with pytest.raises(ValidationError) as caught:
        services.block_create(pipeline=pipeline, uuid="bad", type="transformer", content=BROKEN)

    errors = caught.value.message_dict
    assert list(errors) == ["content"]
    assert f"line {line}" in errors["content"][0]
    assert "transformer/bad" in errors["content"][0]
    assert not Block.objects.filter(pipeline=pipeline).exists()


def test_block_create_with_a_syntax_error_and_upstreams_writes_no_edge_either(pipeline):
    _chain(pipeline, "load")

    with pytest.raises(ValidationError) as caught:
        services.block_create(pipeline=pipeline, uuid="bad", type="transformer", content=BROKEN, upstream_blocks=["load"])

    assert "content" in caught.value.message_dict
    assert list(Block.objects.filter(pipeline=pipeline).values_list("uuid", flat=True)) == ["load"]
    assert _edges(pipeline) == []


def test_block_update_refuses_a_syntax_error_naming_the_line_and_keeps_the_saved_code(pipeline):
    (block,) = _chain(pipeline, "load")
    saved_hash = block.content_hash
    line = _syntax_line(BROKEN)

    with pytest.raises(ValidationError) as caught:
        services.block_update(block, content=BROKEN)

    assert f"line {line}" in caught.value.message_dict["content"][0]
    block.refresh_from_db()
    assert block.content == GOOD
    assert block.content_hash == saved_hash


def test_block_update_with_bad_code_does_not_change_the_edges_given_with_it(pipeline):
    load, _clean = _chain(pipeline, "load", "clean")
    other = services.block_create(pipeline=pipeline, uuid="other", type="data_loader", content=GOOD)
    before = _edges(pipeline)

    with pytest.raises(ValidationError):
        services.block_update(_clean, content=BROKEN, upstream_blocks=[other.uuid, load.uuid])

    assert _edges(pipeline) == before


def test_sql_blocks_are_not_checked_as_python(pipeline):
    block = services.block_create(pipeline=pipeline, uuid="q", type="data_loader", language="sql", content="SELECT 1 AS x")

    block.refresh_from_db()
    assert block.content == "SELECT 1 AS x"


def test_an_edge_that_closes_a_cycle_is_refused_naming_the_cycle_and_edges_stay(pipeline):
    a, _b, _c = _chain(pipeline, "a", "b", "c")
    before = _edges(pipeline)

    with pytest.raises(ValidationError) as caught:
        services.block_set_upstreams(a, ["c"])

    message = caught.value.message_dict["upstream_blocks"][0]
    # Data flows a -> b -> c, and the new edge would take it from c back to a.
    assert any(
        cycle in message for cycle in ("a -> b -> c -> a", "b -> c -> a -> b", "c -> a -> b -> c")
    ), message
    assert _edges(pipeline) == before
    assert pipeline_graph(pipeline.id) == {"a": [], "b": ["a"], "c": ["b"]}


def test_block_update_refuses_a_cycle_and_keeps_its_other_changes_unsaved(pipeline):
    a, _b = _chain(pipeline, "a", "b")
    new_code = GOOD.replace("return 1", "return 2")

    with pytest.raises(ValidationError) as caught:
        services.block_update(a, content=new_code, upstream_blocks=["b"])

    assert "cycle" in caught.value.message_dict["upstream_blocks"][0]
    a.refresh_from_db()
    assert a.content == GOOD
    assert _edges(pipeline) == [("a", "b", 0)]


def test_a_block_cannot_be_its_own_upstream(pipeline):
    (a,) = _chain(pipeline, "a")

    with pytest.raises(ValidationError) as caught:
        services.block_set_upstreams(a, ["a"])

    assert "a -> a" in caught.value.message_dict["upstream_blocks"][0]
    assert _edges(pipeline) == []


def test_upstream_order_is_kept_as_given(pipeline):
    for uuid in ("first", "second", "third"):
        services.block_create(pipeline=pipeline, uuid=uuid, type="data_loader", content=GOOD)

    join = services.block_create(
        pipeline=pipeline, uuid="join", type="transformer", content=GOOD,
        upstream_blocks=["third", "first", "second"],
    )

    assert block_upstream_uuids(join) == ["third", "first", "second"]
    assert pipeline_graph(pipeline.id)["join"] == ["third", "first", "second"]
    services.block_set_upstreams(join, ["second", "third"])
    assert block_upstream_uuids(join) == ["second", "third"]


def test_an_unknown_upstream_is_refused_and_nothing_is_written(pipeline):
    _chain(pipeline, "load")

    with pytest.raises(ValidationError) as caught:
        services.block_create(
            pipeline=pipeline, uuid="clean", type="transformer", content=GOOD,
            upstream_blocks=["load", "ghost"],
        )

    assert "ghost" in caught.value.message_dict["upstream_blocks"][0]
    assert list(Block.objects.filter(pipeline=pipeline).values_list("uuid", flat=True)) == ["load"]
    assert _edges(pipeline) == []


def test_a_block_of_another_pipeline_is_an_unknown_upstream(pipeline):
    other = services.pipeline_create(uuid="other")
    services.block_create(pipeline=other, uuid="elsewhere", type="data_loader", content=GOOD)
    (load,) = _chain(pipeline, "load")

    with pytest.raises(ValidationError, match="elsewhere"):
        services.block_set_upstreams(load, ["elsewhere"])

    assert _edges(pipeline) == []


def test_an_upstream_listed_twice_is_refused(pipeline):
    a, b = _chain(pipeline, "a", "b")

    with pytest.raises(ValidationError) as caught:
        services.block_set_upstreams(b, ["a", "a"])

    assert "twice" in caught.value.message_dict["upstream_blocks"][0]
    assert _edges(pipeline) == [("a", "b", 0)]


def test_content_hash_follows_the_content(pipeline):
    (block,) = _chain(pipeline, "load")
    block.refresh_from_db()
    first = block.content_hash
    assert first == content_hash(GOOD)

    services.block_update(block, content=GOOD.replace("return 1", "return 2"))
    block.refresh_from_db()
    assert block.content_hash != first
    assert block.content_hash == content_hash(GOOD.replace("return 1", "return 2"))

    services.block_update(block, content=GOOD)
    block.refresh_from_db()
    assert block.content_hash == first


def test_a_duplicate_block_uuid_is_refused_with_a_validation_error(pipeline):
    _chain(pipeline, "load")

    with pytest.raises(ValidationError) as caught:
        services.block_create(pipeline=pipeline, uuid="load", type="data_loader", content=GOOD)

    assert "uuid" in str(caught.value.message_dict) or "__all__" in caught.value.message_dict
    assert Block.objects.filter(pipeline=pipeline, uuid="load").count() == 1

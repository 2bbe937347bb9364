"""The pure graph functions of pipelines/dag.py."""

from __future__ import annotations

import pytest

from pipelines import dag

pytestmark = pytest.mark.sqlite


def _rotations(cycle: list[str]) -> set[str]:
    """Every way of writing the closed cycle `cycle` (first block not repeated) as
    "a -> b -> ... -> a", starting anywhere but always in the same direction."""
    texts = set()
    for i in range(len(cycle)):
        turned = cycle[i:] + cycle[:i]
        texts.add(" -> ".join([*turned, turned[0]]))
    return texts


def _assert_respects_edges(order: list[str], graph: dict[str, list[str]]) -> None:
    where = {uuid: i for i, uuid in enumerate(order)}
    for uuid, ups in graph.items():
        for up in ups:
            assert where[up] < where[uuid], f"{up} must come before {uuid} in {order}"


def test_topological_order_puts_every_block_after_its_upstreams():
    # Declared downstream-first on purpose, so the order cannot come from declaration.
    graph = {
        "export": ["clean", "enrich"],
        "enrich": ["clean", "lookup"],
        "clean": ["load"],
        "lookup": [],
        "load": [],
    }

    order = dag.topological_order(graph)

    assert sorted(order) == sorted(graph)
    _assert_respects_edges(order, graph)
    assert order[-1] == "export"


def test_topological_order_breaks_ties_by_declaration_order_and_is_repeatable():
    graph = {"c": [], "b": [], "a": [], "z": ["a"], "y": ["c"]}

    first = dag.topological_order(graph)

    # Independent blocks keep the order they were declared in, level by level.
    assert first == ["c", "b", "a", "z", "y"]
    assert all(dag.topological_order(graph) == first for _ in range(5))
    # Declaring the same graph in another order changes only the ties.
    reordered = dag.topological_order({"a": [], "b": [], "c": [], "y": ["c"], "z": ["a"]})
    assert reordered == ["a", "b", "c", "y", "z"]


def test_it_refuses_a_cycle_and_names_it_in_data_flow_order():
    # a's upstream is c, b's is a, c's is b: data flows a -> b -> c -> a.
    graph = {"a": ["c"], "b": ["a"], "c": ["b"], "standalone": []}

    with pytest.raises(dag.CycleError) as caught:
        dag.topological_order(graph)

    message = str(caught.value)
    assert message.startswith("The blocks form a cycle: ")
    named = message.removeprefix("The blocks form a cycle: ")
    assert named in _rotations(["a", "b", "c"])
    assert "standalone" not in message
    assert caught.value.cycle[0] == caught.value.cycle[-1]
    assert set(caught.value.cycle) == {"a", "b", "c"}


def test_the_named_cycle_leaves_out_blocks_that_only_lead_into_it():
    graph = {"load": [], "b": ["load", "d"], "c": ["b"], "d": ["c"]}

    with pytest.raises(dag.CycleError) as caught:
        dag.check_acyclic(graph)

    named = str(caught.value).removeprefix("The blocks form a cycle: ")
    assert named in _rotations(["b", "c", "d"])
    assert "load" not in str(caught.value)


def test_a_block_that_is_its_own_upstream_is_a_cycle():
    with pytest.raises(dag.CycleError, match=r"cycle: solo -> solo$"):
        dag.topological_order({"solo": ["solo"]})


def test_a_cycle_error_is_a_value_error():
    # Callers that only know ValueError (forms, YAML import) still catch it.
    with pytest.raises(ValueError):
        dag.check_acyclic({"x": ["y"], "y": ["x"]})


def test_check_acyclic_accepts_a_diamond():
    dag.check_acyclic({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]})


def test_descendants_follows_every_path_downstream_and_excludes_the_start():
    graph = {
        "a": [],
        "b": ["a"],
        "c": ["a"],
        "d": ["b", "c"],
        "e": ["d"],
        "other": [],
        "after_other": ["other"],
    }

    assert dag.descendants(graph, "a") == {"b", "c", "d", "e"}
    assert dag.descendants(graph, "c") == {"d", "e"}
    assert dag.descendants(graph, "e") == set()
    assert dag.descendants(graph, "other") == {"after_other"}


def test_build_graph_keeps_edge_order_and_refuses_an_unknown_upstream():
    graph = dag.build_graph(["a", "b", "c"], {"c": ["b", "a"]})

    assert graph == {"a": [], "b": [], "c": ["b", "a"]}
    with pytest.raises(ValueError, match="unknown upstream block 'ghost'"):
        dag.build_graph(["a", "b"], {"b": ["ghost"]})
    with pytest.raises(ValueError, match="Unknown block 'ghost'"):
        dag.build_graph(["a"], {"ghost": ["a"]})

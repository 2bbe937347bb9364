"""Pure graph functions over block uuids. No ORM here: callers pass the edges."""

from __future__ import annotations

import graphlib
from collections.abc import Iterable, Mapping, Sequence


class CycleError(ValueError):
    """The edges form a cycle; `cycle` lists the blocks along it, first block repeated last."""

    def __init__(self, cycle: Sequence[str]) -> None:
        self.cycle = list(cycle)
        super().__init__("The blocks form a cycle: " + " -> ".join(self.cycle))


def build_graph(blocks: Iterable[str], upstreams: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Return {block: [its upstream blocks, in edge order]} for every block, refusing an
    edge to an unknown block."""
    graph: dict[str, list[str]] = {uuid: [] for uuid in blocks}
    for uuid, ups in upstreams.items():
        if uuid not in graph:
            raise ValueError(f"Unknown block {uuid!r}")
        for up in ups:
            if up not in graph:
                raise ValueError(f"Block {uuid!r} names an unknown upstream block {up!r}")
        graph[uuid] = list(ups)
    return graph


def topological_order(graph: Mapping[str, Sequence[str]]) -> list[str]:
    """Blocks in an order where every block comes after its upstreams. Ties keep the
    order in which blocks appear in `graph`, so the result is stable."""
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for uuid, ups in graph.items():
        sorter.add(uuid, *ups)
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        # graphlib lists the cycle with each block an upstream of the next, ending where
        # it started: the direction data flows.
        raise CycleError(list(exc.args[1])) from None
    rank = {uuid: i for i, uuid in enumerate(graph)}
    order: list[str] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=lambda u: rank.get(u, len(rank)))
        order.extend(ready)
        sorter.done(*ready)
    return order


def check_acyclic(graph: Mapping[str, Sequence[str]]) -> None:
    topological_order(graph)


def downstream_map(graph: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    downs: dict[str, list[str]] = {uuid: [] for uuid in graph}
    for uuid, ups in graph.items():
        for up in ups:
            downs.setdefault(up, []).append(uuid)
    return downs


def descendants(graph: Mapping[str, Sequence[str]], start: str) -> set[str]:
    """Every block reachable downstream from `start`, `start` excluded."""
    downs = downstream_map(graph)
    seen: set[str] = set()
    stack = list(downs.get(start, []))
    while stack:
        uuid = stack.pop()
        if uuid not in seen:
            seen.add(uuid)
            stack.extend(downs.get(uuid, []))
    return seen

"""Reads of pipeline definitions shared by the runs app, pages, API and commands."""

from __future__ import annotations

from pipelines.models import Block, BlockEdge


def pipeline_graph(pipeline_id: int) -> dict[str, list[str]]:
    """{block uuid: [upstream uuids in edge order]} for every block of the pipeline, in
    the blocks' order."""
    uuids = dict(Block.objects.filter(pipeline_id=pipeline_id).values_list("id", "uuid"))
    graph: dict[str, list[str]] = {uuid: [] for uuid in uuids.values()}
    edges = BlockEdge.objects.filter(downstream__pipeline_id=pipeline_id).order_by("downstream_id", "position")
    for down_id, up_id in edges.values_list("downstream_id", "upstream_id"):
        graph[uuids[down_id]].append(uuids[up_id])
    return graph


def block_upstream_uuids(block: Block) -> list[str]:
    return list(block.upstream_edges.order_by("position").values_list("upstream__uuid", flat=True))

"""Reads of pipeline definitions shared by the runs app, pages, API and commands."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines import dag
from pipelines.models import NON_EXECUTABLE_TYPES, Block, BlockEdge


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


@dataclass(frozen=True)
class BlockDefinition:
    uuid: str
    type: str
    language: str
    content: str
    content_hash: str
    configuration: dict
    timeout: int | None
    retry_config: dict | None
    upstreams: tuple[str, ...]

    @property
    def executable(self) -> bool:
        return self.type not in NON_EXECUTABLE_TYPES


@dataclass(frozen=True)
class PipelineDefinition:
    pipeline_id: int
    version: int
    blocks: dict[str, BlockDefinition] = field(default_factory=dict)
    # {uuid: [upstream uuids in edge order]}; callers must not change it.
    graph: dict[str, list[str]] = field(default_factory=dict)
    # The blocks in topological order, computed once per version for `advance`.
    order: tuple[str, ...] = ()
    # {block: the block below it} where that block is the only one below it and has no
    # other upstream: a link of a chain, which `advance` may claim as its block ends.
    chain_next: dict[str, str] = field(default_factory=dict)


# Definitions by pipeline id, valid while the pipeline's version is unchanged. Each
# worker process keeps its own; advancing a run then costs no query for the graph.
_definitions: dict[int, PipelineDefinition] = {}


def forget_definitions() -> None:
    """Drop the cached definitions (tests, whose flushed tables give ids out again)."""
    _definitions.clear()


def _chain_links(graph: dict[str, list[str]]) -> dict[str, str]:
    below: dict[str, list[str]] = {}
    for uuid, ups in graph.items():
        for up in ups:
            below.setdefault(up, []).append(uuid)
    return {up: downs[0] for up, downs in below.items() if len(downs) == 1 and graph[downs[0]] == [up]}


def pipeline_definition(pipeline_id: int, version: int) -> PipelineDefinition:
    """The blocks and edges of a pipeline at `version` (read from the pipeline row by
    the caller), from memory when this process has already read that version."""
    cached = _definitions.get(pipeline_id)
    if cached is not None and cached.version == version:
        return cached
    graph = pipeline_graph(pipeline_id)
    rows = Block.objects.filter(pipeline_id=pipeline_id).values_list(
        "uuid", "type", "language", "content", "content_hash", "configuration", "timeout", "retry_config"
    )
    blocks = {row[0]: BlockDefinition(*row, upstreams=tuple(graph[row[0]])) for row in rows}
    definition = PipelineDefinition(
        pipeline_id=pipeline_id, version=version, blocks=blocks, graph=graph,
        order=tuple(dag.topological_order(graph)), chain_next=_chain_links(graph),
    )
    _definitions[pipeline_id] = definition
    return definition

"""What may start now: the one rule, with no database in it.

Every path that starts block runs decides through these functions: `advance` (a run
moving on, with or without claiming the next block for the worker that just finished
one), `runs_start` (a scheduler tick starting many fresh runs at once) and the chain
claim that `execute.finish` writes into the same query as a block's result (its SQL
is checked against this rule by a property-based test, tests/runs/test_decide_property.py).

1. `plan`: from the block runs' statuses, in topological order, which blocks are
   ready, which are skipped below a skipped block, and which can never run because an
   upstream failed.
2. `admit`: how many of the ready blocks start, under the run's own block limit and the
   global one, and whether some are left waiting for a global slot.
3. `next_in_chain`: the block that the worker that just finished a block runs itself.
4. `run_outcome`: the run's final status, once every block run is finished.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from pipelines.selectors import PipelineDefinition
from runs.models import BLOCK_ACTIVE, BLOCK_TERMINAL, BlockRunStatus, PipelineRunStatus

S = BlockRunStatus

FAILED_UPSTREAM = frozenset({S.FAILED, S.UPSTREAM_FAILED, S.CANCELLED})


class BlockState(NamedTuple):
    """A block run as the decision sees it (not a dynamic child)."""

    id: int
    block_uuid: str
    status: str
    attempt: int
    waits_for_retry: bool  # failed, and its next attempt is not due yet


@dataclass
class Plan:
    """The outcome of step 1. `status` holds every block run's status as it will be
    once the plan is written: blocks that cannot run are already marked."""

    blocks: dict[str, BlockState]
    status: dict[str, str]
    ready: list[str] = field(default_factory=list)  # topological order, retries not due left out
    skipped: list[str] = field(default_factory=list)  # below a condition that failed
    broken: list[tuple[str, str]] = field(default_factory=list)  # (block, the upstream that failed)

    def ids(self, uuids: Iterable[str]) -> list[int]:
        return [self.blocks[u].id for u in uuids]


def plan(definition: PipelineDefinition, blocks: Iterable[BlockState]) -> Plan:
    """Step 1. An `initial` block below a failed, cancelled or upstream-failed block
    becomes `upstream_failed`; below a skipped (condition-failed) block it is skipped
    too; with every upstream completed it is ready, unless it waits for a retry."""
    by_uuid = {b.block_uuid: b for b in blocks}
    result = Plan(blocks=by_uuid, status={u: b.status for u, b in by_uuid.items()})
    status = result.status
    # Block runs of blocks deleted since the run began come last, with no upstreams:
    # they run and fail with "no longer exists" rather than wait forever.
    order = [u for u in definition.order if u in status]
    order += [u for u in status if u not in definition.graph]
    for uuid in order:
        if status[uuid] != S.INITIAL:
            continue
        ups = [u for u in definition.graph.get(uuid, ()) if u in status]
        bad = next((u for u in ups if status[u] in FAILED_UPSTREAM), None)
        if bad is not None:
            status[uuid] = S.UPSTREAM_FAILED
            result.broken.append((uuid, bad))
        elif any(status[u] == S.CONDITION_FAILED for u in ups):
            status[uuid] = S.CONDITION_FAILED
            result.skipped.append(uuid)
        elif all(status[u] == S.COMPLETED for u in ups) and not by_uuid[uuid].waits_for_retry:
            result.ready.append(uuid)
    return result


def block_limit(block_run_limit: int | None, in_one_process: bool) -> int | None:
    """How many block runs of one run may be active at once: a run in one process runs
    its blocks one after another, in one process."""
    return 1 if in_one_process else block_run_limit


def room_in_run(limit: int | None, status: dict[str, str]) -> int:
    """How many more block runs the run's own limit lets start (all of them without one)."""
    if not limit:
        return len(status)
    return limit - sum(1 for s in status.values() if s in BLOCK_ACTIVE)


def admit(ready: list[str], *, room: int, freed: int, grant: Callable[[int], int]) -> tuple[list[str], bool]:
    """Step 2: the ready blocks that start now (the first ones, in topological order),
    and whether some ready blocks are left waiting for a global slot.

    `room` is what the run's own limit leaves (`room_in_run`). `freed` is the number of
    global slots the caller released in the same transaction (a block that finished):
    that many blocks take them over without asking the global limit again. Otherwise
    `grant(n)` asks the global limit for n slots and answers how many it gives; a
    block held back by the run's own limit is not waiting for a global slot."""
    wanted = min(room, len(ready))
    if wanted <= 0:
        return [], False
    granted = wanted if wanted <= freed else grant(wanted)
    return ready[:granted], granted < wanted


def next_in_chain(admitted: list[str]) -> str | None:
    """Step 3: the block that the worker that finished a block runs itself, with no
    broker round trip: the only block admitted. Several (a fan-out) go through the
    broker, to run in parallel on other workers."""
    return admitted[0] if len(admitted) == 1 else None


def chain_candidate(definition: PipelineDefinition, block_run_limit: int | None, finished: str) -> str | None:
    """The block that the query recording `finished`'s result may claim at once (a link
    of a chain: the only block below it, whose only upstream it is). With a pipeline's
    `block_run_limit`, other branches could hold the slot: only `advance` decides then.
    (A run in one process has one block active at a time, so the block that finished
    leaves the room its successor needs: its chains take this path too.)"""
    return None if block_run_limit else definition.chain_next.get(finished)


def run_outcome(status: dict[str, str]) -> str | None:
    """Step 4: the run's final status once every block run has finished, else None.
    Blocks below a cancelled block are upstream-failed too: with no failure in the run,
    it was cancelled."""
    if not all(s in BLOCK_TERMINAL for s in status.values()):
        return None
    values = set(status.values())
    if S.FAILED in values:
        return PipelineRunStatus.FAILED
    if S.CANCELLED in values:
        return PipelineRunStatus.CANCELLED
    if S.UPSTREAM_FAILED in values:
        return PipelineRunStatus.FAILED
    return PipelineRunStatus.COMPLETED

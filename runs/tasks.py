"""django-q2 entry points. Thin: they take ids and call the orchestrator."""

from __future__ import annotations

from django.conf import settings

from runs import orchestrator


def block_run_execute(block_run_id: int) -> None:
    """Run a queued block run. When finishing it makes exactly one block ready, the
    orchestrator runs that one here too instead of a round trip through the broker: a
    chain then moves at the speed of its blocks. Several ready blocks (a fan-out) go
    back through the broker so they spread over the workers."""
    queued = orchestrator.block_run_execute(block_run_id, inline=settings.MILLRACE_INLINE_CHAIN)
    # The slot of the last block is free now: runs that wait for one may go on.
    queued += orchestrator.wake_waiting_runs()
    orchestrator.dispatch(queued)

"""django-q2 entry points. Thin: they take ids and call the orchestrator."""

from __future__ import annotations

from django.conf import settings

from runs import orchestrator


def block_run_execute(block_run_id: int) -> None:
    """Run a queued block run. When finishing it makes exactly one block ready, run that
    one here too instead of a round trip through the broker: a chain then moves at the
    speed of its blocks. Several ready blocks (a fan-out) go back through the broker so
    they spread over the workers."""
    next_ids = [block_run_id]
    while next_ids:
        current = next_ids.pop()
        queued = orchestrator.block_run_execute(current)
        queued += orchestrator.wake_waiting_runs()
        if len(queued) == 1 and settings.MILLRACE_INLINE_CHAIN:
            next_ids = queued
        else:
            orchestrator.dispatch(queued)

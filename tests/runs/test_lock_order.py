"""Row locks on PostgreSQL are taken in one order, a run before its block runs: each
test here sets up a race between a cancel and a block's own work, and each failed with
"deadlock detected" (PostgreSQL aborting one side) while the block's side locked its
block run first. SQLite runs one writer at a time and has nothing to race."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from django.db import connection, connections, transaction

from pipelines.execution import ExecutionResult, LogLine
from runs import orchestrator
from runs.models import BlockRun, LogEntry, PipelineRun, RunAction
from tests.helpers import chain

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks are PostgreSQL's"),
]


def race(background: Callable[[], object], foreground: Callable[[], object], *, after: threading.Event | None = None) -> object:
    """Run `background` in a thread (with its own connection) and `foreground` here,
    once `after` is set if given; neither may fail. Returns what `foreground` returned."""
    errors: list[Exception] = []

    def run() -> None:
        try:
            background()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    result = None
    try:
        assert after is None or after.wait(10)
        result = foreground()
    except Exception as exc:  # noqa: BLE001 - reported below
        errors.append(exc)
    thread.join(15)
    assert errors == []
    return result


def running_block(uuid: str, blocks: int = 1) -> tuple[PipelineRun, int]:
    run = orchestrator.run_create(chain(uuid, blocks), start=False)
    [queued] = orchestrator.advance(run.pk)
    BlockRun.objects.filter(pk=queued).update(status="running", claim="mine")
    return run, queued


def slowed(monkeypatch, owner: object, name: str) -> threading.Event:
    """Make `owner.name` signal, then wait half a second before it does its work."""
    original, inside = getattr(owner, name), threading.Event()

    def slow(*args, **kwargs):
        inside.set()
        time.sleep(0.5)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, slow)
    return inside


@pytest.mark.parametrize("held", ["known run", "bare block run"])
def test_a_finishing_block_and_a_cancel_of_its_run_do_not_deadlock(held):
    run, queued = running_block("race")
    related = ("pipeline_run__pipeline",) if held == "known run" else ()
    br = BlockRun.objects.select_related(*related).get(pk=queued)
    locked = threading.Event()

    def cancel() -> None:
        with transaction.atomic():
            PipelineRun.objects.select_for_update().get(pk=run.pk)
            locked.set()
            time.sleep(0.5)  # the block finishes meanwhile
            orchestrator.run_stop(run.pk)

    finished = race(cancel, lambda: orchestrator.finish(br, "mine", ExecutionResult(status="completed")), after=locked)

    # The cancel came first: the block's result is not recorded over it.
    assert finished == ([], None)
    run.refresh_from_db()
    assert run.status == "cancelled"
    assert BlockRun.objects.get(pk=queued).status == "cancelled"


def test_cancelling_a_block_while_its_upstream_finishes_does_not_deadlock(monkeypatch):
    # The upstream's finish locks the run, then claims the downstream block.
    run, first = running_block("race2", blocks=2)
    br = BlockRun.objects.select_related("pipeline_run__pipeline").get(pk=first)
    second = BlockRun.objects.get(pipeline_run=run, block_uuid="b001").pk
    inside = slowed(monkeypatch, RunAction.objects, "create")  # the cancel holds its block run while it audits

    race(
        lambda: orchestrator.block_run_cancel(second),
        lambda: orchestrator.finish(br, "mine", ExecutionResult(status="completed"), claim_next=True),
        after=inside,
    )

    assert dict(run.block_runs.values_list("block_uuid", "status")) == {"b000": "completed", "b001": "cancelled"}
    run.refresh_from_db()
    assert run.status == "cancelled"


def test_a_heartbeat_with_log_lines_and_a_cancel_of_its_run_do_not_deadlock(monkeypatch):
    # The heartbeat's log rows reference the run, which PostgreSQL checks at commit.
    run, queued = running_block("race3")
    writer = orchestrator.LogWriter(BlockRun.objects.get(pk=queued), "mine")
    writer.lines = [LogLine(time.time(), "INFO", "a line")]
    inside = slowed(monkeypatch, orchestrator.LogWriter, "write")  # the heartbeat holds its block run

    def cancel() -> None:
        assert inside.wait(10)
        orchestrator.run_cancel(run.pk)

    alive = race(cancel, writer.heartbeat)

    # The heartbeat came first: its line is kept, and the cancel then took the block run.
    assert alive is True
    assert LogEntry.objects.filter(block_run_id=queued, message="a line").exists()
    assert BlockRun.objects.get(pk=queued).status == "cancelled"

"""Cancelling on real `manage.py qcluster` workers: the block's whole process tree dies
within seconds, nothing downstream starts, the cancelled attempt writes nothing more, a
second cancel is refused, and a cancelled run can be retried."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from django.db.models import Max

from pipelines import variables
from runs import orchestrator, services
from runs.models import BlockRun, LogEntry, PipelineRun, RunAction
from runs.services import run_wait
from tests.helpers import (
    alive,
    block_code,
    group_members,
    make_pipeline,
    pids_in,
    process_tree,
    wait_for,
    wait_gone,
    worker_pid,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.workers, pytest.mark.sqlite]

INTERVAL = 0.5  # MILLRACE_HEARTBEAT_INTERVAL of the workers: a cancel is seen within it

_PIDS = """
import os, subprocess, sys, time
def note(*pids):
    with open(kwargs["pids"], "a") as f:
        f.write("".join(f"{p}\\n" for p in pids))
note(os.getpid())
"""
BODIES = {
    "sleep": _PIDS + 'print("sleeping", flush=True)\ntime.sleep(3600)',
    # CPU-bound, and never silent: a line every few milliseconds that a worker which
    # missed the cancel would keep writing.
    "cpu": _PIDS + "n = 0\nwhile True:\n    n += 1\n    if n % 100000 == 0:\n        print(n, flush=True)",
    "subprocesses": _PIDS + (
        'children = [subprocess.Popen(["sleep", "3600"]) for _ in range(2)]\n'
        "note(*(c.pid for c in children))\n"
        'print("children", *(c.pid for c in children), flush=True)\n'
        "time.sleep(3600)"
    ),
}
PID_LINES = {"sleep": 1, "cpu": 1, "subprocesses": 3}
# Waits while the marker exists, then returns its attempt.
WAIT_FOR_MARKER = block_code("data_loader", _PIDS + """
print("waiting for the marker to go", flush=True)
while os.path.exists(kwargs["marker"]):
    time.sleep(0.05)
return kwargs["retry"]["attempts"]
""")
PLUS_ONE = block_code("transformer", "return args[0] + 1")


CLUSTER_ENV = {"MILLRACE_HEARTBEAT_INTERVAL": str(INTERVAL)}


def _blocked_run(uuid: str, code: str, tmp_path: Path, **fields) -> PipelineRun:
    pipeline = make_pipeline(uuid, [
        ("stuck", "data_loader", code),
        ("after", "transformer", PLUS_ONE, ["stuck"]),
    ], **fields)
    return orchestrator.run_create(pipeline, variables={"pids": str(tmp_path / "pids"), "marker": str(tmp_path / "marker")})


def _block_processes(run: PipelineRun, pids: Path, lines: int) -> tuple[BlockRun, set[int]]:
    """Wait until the block runs, has written its pids and its first log line is stored;
    returns its block run and every process of its tree."""
    wait_for(lambda: len(pids_in(pids)) >= lines, timeout=30)
    br = wait_for(lambda: run.block_runs.filter(block_uuid="stuck", status="running").first(), timeout=30)
    wait_for(lambda: LogEntry.objects.filter(block_run=br).exists(), timeout=10)
    block_pid = pids_in(pids)[0]
    tree = set(pids_in(pids)) | process_tree(block_pid) | group_members(block_pid)
    assert alive(tree) == tree
    return br, tree


def _last_log_id(run: PipelineRun) -> int:
    return LogEntry.objects.filter(pipeline_run=run).aggregate(top=Max("id"))["top"] or 0


def _state(run: PipelineRun) -> tuple:
    """Everything a cancel could change, to compare before and after."""
    return (
        PipelineRun.objects.filter(pk=run.pk).values_list("status", "completed_at", "updated_at").get(),
        list(run.block_runs.order_by("id").values_list("status", "claim", "completed_at", "updated_at")),
        LogEntry.objects.filter(pipeline_run=run).count(),
        RunAction.objects.filter(pipeline_run=run).count(),
    )


@pytest.mark.parametrize("kind", ["sleep", "cpu", "subprocesses"])
def test_a_cancel_kills_the_block_s_process_tree_within_seconds(cluster, tmp_path, kind):
    c = cluster()
    run = _blocked_run(f"cancel-{kind}", block_code("data_loader", BODIES[kind]), tmp_path)
    br, tree = _block_processes(run, tmp_path / "pids", PID_LINES[kind])
    assert len(tree) >= PID_LINES[kind]
    worker = worker_pid(br.worker)

    asked = time.monotonic()
    orchestrator.run_cancel(run.pk)
    cancelled_at = _last_log_id(run)  # the run's own "Run cancelled" line
    took = wait_gone(tree, timeout=5)
    assert group_members(pids_in(tmp_path / "pids")[0]) == set()
    print(f"\n{kind}: the block's {len(tree)} processes were gone {took:.2f} s after the cancel")
    assert time.monotonic() - asked < 5

    time.sleep(4 * INTERVAL)  # several heartbeats: a stray writer would show by now
    late = LogEntry.objects.filter(pipeline_run=run, id__gt=cancelled_at)
    assert list(late.values_list("message", flat=True)) == []
    run.refresh_from_db()
    assert run.status == "cancelled"
    rows = {b.block_uuid: b for b in run.block_runs.all()}
    assert rows["stuck"].status == "cancelled"
    assert rows["after"].status == "cancelled" and rows["after"].started_at is None and rows["after"].attempt == 0
    # Only the block died: the worker that ran it lives and takes new work.
    assert alive([worker]) == {worker} and c.proc.poll() is None
    after = make_pipeline(f"next-{kind}", [("one", "data_loader", block_code("data_loader", "return 1"))])
    assert run_wait(orchestrator.run_create(after), timeout=30).status == "completed"


def test_a_second_cancel_is_refused_and_changes_nothing(cluster, tmp_path):
    cluster()
    run = _blocked_run("cancel-twice", block_code("data_loader", BODIES["sleep"]), tmp_path)
    _, tree = _block_processes(run, tmp_path / "pids", 1)
    orchestrator.run_cancel(run.pk)
    wait_gone(tree, timeout=5)
    time.sleep(2 * INTERVAL)  # the worker has seen the cancel and finished with the block
    before = _state(run)

    with pytest.raises(orchestrator.ActionRefused, match="already finished"):
        orchestrator.run_cancel(run.pk)
    batch = services.runs_cancel([run.pk])
    assert batch.changed == [] and list(batch.refused) == [run.pk]
    assert _state(run) == before
    assert list(RunAction.objects.filter(pipeline_run=run).values_list("action", flat=True)) == ["cancel"]


def test_a_cancelled_run_retried_completes_once_its_block_is_unblocked(cluster, tmp_path):
    cluster()
    marker = tmp_path / "marker"
    marker.touch()
    run = _blocked_run("cancel-retry", WAIT_FOR_MARKER, tmp_path)
    br, tree = _block_processes(run, tmp_path / "pids", 1)
    orchestrator.run_cancel(run.pk)
    wait_gone(tree, timeout=5)

    marker.unlink()
    assert sorted(orchestrator.run_retry(run.pk, mode="incomplete")) == ["after", "stuck"]
    run = run_wait(run, timeout=60)
    assert run.status == "completed"
    br.refresh_from_db()
    assert br.attempt == 2 and [a["status"] for a in br.attempts] == ["cancelled"]
    assert variables.read_value(br.outputs[0]) == 2
    after = run.block_runs.get(block_uuid="after")
    assert after.status == "completed" and variables.read_value(after.outputs[0]) == 3
    actions = list(RunAction.objects.filter(pipeline_run=run).values_list("action", flat=True))
    assert actions == ["cancel", "retry_incomplete"]


def test_cancelling_one_block_run_kills_only_that_block(cluster, tmp_path):
    cluster()
    pipeline = make_pipeline("cancel-one", [
        ("root", "data_loader", block_code("data_loader", "return 1")),
        ("stuck", "transformer", block_code("transformer", BODIES["sleep"]), ["root"]),
        ("below", "transformer", PLUS_ONE, ["stuck"]),
        ("sibling", "transformer", block_code("transformer", "import time\ntime.sleep(1)\nreturn args[0] + 1"), ["root"]),
    ])
    run = orchestrator.run_create(pipeline, variables={"pids": str(tmp_path / "pids")})
    br, tree = _block_processes(run, tmp_path / "pids", 1)

    orchestrator.block_run_cancel(br.pk)
    cancelled_at = _last_log_id(run)
    wait_gone(tree, timeout=5)
    run = run_wait(run, timeout=30)
    statuses = dict(run.block_runs.values_list("block_uuid", "status"))
    assert statuses == {"root": "completed", "stuck": "cancelled", "below": "upstream_failed", "sibling": "completed"}
    assert run.status == "cancelled"
    assert not LogEntry.objects.filter(block_run=br, id__gt=cancelled_at).exists()

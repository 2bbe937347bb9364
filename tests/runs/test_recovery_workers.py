"""Dead and frozen workers, on real `manage.py qcluster` processes: the reconcile pass
finds them by their heartbeat, fails or retries what they held, frees their slots, and a
worker that wakes up after losing its claim writes nothing. And the concurrency limits
under load."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.db.models import Count
from django.utils import timezone

from pipelines import variables
from runs import orchestrator
from runs.models import BlockRun, LogEntry, PipelineRun
from runs.services import run_wait
from tests.helpers import (
    WorkerCluster,
    alive,
    block_code,
    group_members,
    make_pipeline,
    pids_in,
    process_tree,
    reconcile_until,
    wait_for,
    wait_gone,
    worker_pid,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.workers, pytest.mark.sqlite]

LIMIT = 3  # MILLRACE_HEARTBEAT_LIMIT of the test process, where reconcile runs
INTERVAL = 0.5  # MILLRACE_HEARTBEAT_INTERVAL of the workers

# Sleeps 30 s on its first attempt only (the marker tells), and returns its attempt.
SLEEP_ONCE = block_code("data_loader", """
import os, time
with open(kwargs["pids"], "a") as f:
    f.write(f"{os.getpid()}\\n")
if not os.path.exists(kwargs["marker"]):
    open(kwargs["marker"], "w").close()
    time.sleep(30)
return kwargs["retry"]["attempts"]
""")
PLUS_ONE = block_code("transformer", "return args[0] + 1")


@pytest.fixture
def limit(settings):
    settings.MILLRACE_HEARTBEAT_LIMIT = LIMIT
    return LIMIT


CLUSTER_ENV = {"MILLRACE_HEARTBEAT_INTERVAL": str(INTERVAL)}


def _files(tmp_path: Path) -> dict[str, str]:
    return {"pids": str(tmp_path / "pids"), "marker": str(tmp_path / "marker")}


def _running(run: PipelineRun, block_uuid: str, pids: Path, count: int = 1) -> BlockRun:
    """Wait until the block runs and its code has written its pid (`count` lines)."""
    wait_for(lambda: len(pids_in(pids)) >= count, timeout=30)
    return wait_for(lambda: run.block_runs.filter(block_uuid=block_uuid, status="running").first(), timeout=30)


def _kill_worker(c: WorkerCluster, label: str) -> set[int]:
    """SIGKILL the worker named by a block run's label; returns its process tree (fork
    server, block children) as it was just before."""
    pid = worker_pid(label)
    assert pid in process_tree(c.proc.pid), "the label names a worker of this cluster"
    tree = process_tree(pid)
    os.kill(pid, signal.SIGKILL)
    return tree


def _value(meta: dict):
    return variables.read_value(meta)


def test_a_killed_worker_is_found_by_its_heartbeat_and_its_block_run_fails(cluster, limit, tmp_path):
    c = cluster()
    pipeline = make_pipeline("kill", [
        ("sleepy", "data_loader", SLEEP_ONCE),
        ("after", "transformer", PLUS_ONE, ["sleepy"]),
    ])
    run = orchestrator.run_create(pipeline, variables=_files(tmp_path))
    br = _running(run, "sleepy", tmp_path / "pids")
    # A live block outlives the limit: its heartbeats keep it from the reconcile pass.
    deadline = time.monotonic() + limit + 1
    while time.monotonic() < deadline:
        orchestrator.reconcile()
        time.sleep(0.25)
    br.refresh_from_db()
    assert br.status == "running" and br.heartbeat_at > br.started_at

    (block_pid,) = pids_in(tmp_path / "pids")
    tree = _kill_worker(c, br.worker)
    assert block_pid in tree
    # The fork server sees its client gone and kills the block's process group.
    wait_gone(tree, timeout=5)
    assert group_members(block_pid) == set()

    reconcile_until(lambda: not BlockRun.objects.filter(pk=br.pk, status="running").exists(), timeout=limit + 10)
    br.refresh_from_db()
    run.refresh_from_db()
    assert br.status == "failed"
    # Failed by the first reconcile pass after the limit, not before it.
    silent = (br.completed_at - br.heartbeat_at).total_seconds()
    assert limit <= silent <= limit + 2, silent
    assert "stopped heartbeating" in br.error
    assert run.status == "failed"
    assert run.block_runs.get(block_uuid="after").status == "upstream_failed"
    assert c.proc.poll() is None  # the cluster itself lives on


def test_a_killed_worker_s_block_is_retried_elsewhere_and_the_run_completes(cluster, limit, tmp_path):
    c = cluster()
    pipeline = make_pipeline("killretry", [
        ("sleepy", "data_loader", SLEEP_ONCE),
        ("after", "transformer", PLUS_ONE, ["sleepy"]),
    ], retry_config={"retries": 1, "delay": 0})
    run = orchestrator.run_create(pipeline, variables=_files(tmp_path))
    br = _running(run, "sleepy", tmp_path / "pids")
    killed_label = br.worker
    tree = _kill_worker(c, killed_label)
    wait_gone(tree, timeout=5)

    reconcile_until(lambda: BlockRun.objects.filter(pk=br.pk, attempt=2).exists(), timeout=limit + 10)
    run = run_wait(run, timeout=60)
    assert run.status == "completed"
    br.refresh_from_db()
    assert br.attempt == 2
    assert len(br.attempts) == 1
    first = br.attempts[0]
    assert first["attempt"] == 1 and first["status"] == "failed"
    assert "stopped heartbeating" in first["error"]
    assert first["worker"] == killed_label and br.worker != killed_label
    assert _value(br.outputs[0]) == 2  # written by the second attempt
    after = run.block_runs.get(block_uuid="after")
    assert after.status == "completed" and _value(after.outputs[0]) == 3
    first_pid, second_pid = pids_in(tmp_path / "pids")
    assert alive([first_pid, second_pid]) == set()


def test_a_worker_killed_before_its_first_heartbeat_is_found_by_the_start_time(cluster, limit, tmp_path):
    # A long interval, so the kill surely lands before the first heartbeat.
    c = cluster(MILLRACE_HEARTBEAT_INTERVAL="2")
    pipeline = make_pipeline("killearly", [("sleepy", "data_loader", SLEEP_ONCE)])
    run = orchestrator.run_create(pipeline, variables=_files(tmp_path))
    row = wait_for(
        lambda: run.block_runs.filter(status="running").values("pk", "worker", "started_at").first(),
        timeout=30, interval=0.002,
    )
    tree = _kill_worker(c, row["worker"])
    wait_gone(tree, timeout=5)

    br = BlockRun.objects.get(pk=row["pk"])
    assert br.heartbeat_at == br.started_at  # the claim's own stamp; no heartbeat came
    reconcile_until(lambda: not BlockRun.objects.filter(pk=br.pk, status="running").exists(), timeout=limit + 10)
    br.refresh_from_db()
    run.refresh_from_db()
    assert br.status == "failed" and run.status == "failed"
    assert "stopped heartbeating" in br.error
    assert f"{br.started_at:%Y-%m-%d %H:%M:%S}" in br.error  # the last sign of life: its start


# Works for a while (a line every 50 ms), then returns its attempt. Attempt 1 works for
# `first_for` seconds, later ones for 2.
SLOW_ATTEMPT = block_code("data_loader", """
import os, time
attempt = kwargs["retry"]["attempts"]
with open(kwargs["pids"], "a") as f:
    f.write(f"{os.getpid()}\\n")
print(f"attempt {attempt} starts", flush=True)
end = time.time() + (kwargs["first_for"] if attempt == 1 else 2)
while time.time() < end:
    print(f"attempt {attempt} works", flush=True)
    time.sleep(0.05)
print(f"attempt {attempt} done", flush=True)
return attempt
""")


@pytest.mark.parametrize("first_for", [2, 30], ids=["finished-while-frozen", "still-running-when-woken"])
def test_a_frozen_worker_that_wakes_up_after_losing_its_claim_writes_nothing(cluster, limit, tmp_path, first_for):
    """Attempt 1's worker is frozen past the limit; attempt 2 runs on the other worker and
    completes; then the frozen worker wakes up, holding either its block's whole result
    and last lines (the block finished meanwhile) or a block still writing lines."""
    c = cluster(workers=2)
    pipeline = make_pipeline("frozen", [("slow", "data_loader", SLOW_ATTEMPT)], retry_config={"retries": 1, "delay": 0})
    run = orchestrator.run_create(pipeline, variables={**_files(tmp_path), "first_for": first_for})
    br = _running(run, "slow", tmp_path / "pids")
    # Lines are written with a heartbeat: freezing right after one is stored, the worker
    # is between two transactions and holds no lock that would stall everyone else.
    wait_for(lambda: LogEntry.objects.filter(block_run=br, message="attempt 1 starts").exists(), timeout=10, interval=0.005)
    frozen = worker_pid(br.worker)
    assert frozen in process_tree(c.proc.pid)
    br.refresh_from_db()
    first_claim, first_label = br.claim, br.worker
    os.kill(frozen, signal.SIGSTOP)
    try:
        reconcile_until(lambda: BlockRun.objects.filter(pk=br.pk).exclude(claim=first_claim).exists(), timeout=limit + 10)
        fenced_at = LogEntry.objects.order_by("-id").values_list("id", flat=True).first()
        run = run_wait(run, timeout=30)
        assert run.status == "completed"
    finally:
        os.kill(frozen, signal.SIGCONT)
    # Once the woken worker takes new work (a worker runs one task at a time), it is done
    # with the old attempt.
    fan = make_pipeline("frozenafter", [("root", "data_loader", block_code("data_loader", "return 0"))] + [
        (f"leaf{i}", "transformer", block_code("transformer", "import time\ntime.sleep(1.5)\nreturn 1"), ["root"])
        for i in range(2)
    ])
    fan_run = run_wait(orchestrator.run_create(fan), timeout=30)
    assert fan_run.status == "completed"
    leaf_workers = set(fan_run.block_runs.exclude(block_uuid="root").values_list("worker", flat=True))
    assert first_label in leaf_workers and len(leaf_workers) == 2

    br.refresh_from_db()
    run.refresh_from_db()
    assert run.status == "completed"
    assert br.status == "completed" and br.attempt == 2
    assert br.worker != first_label
    assert [a["status"] for a in br.attempts] == ["failed"]
    assert br.claim != first_claim and br.claim in br.outputs[0]["key"]
    assert _value(br.outputs[0]) == 2
    late = LogEntry.objects.filter(pipeline_run=run, attempt=1, id__gt=fenced_at)
    assert list(late.values_list("message", flat=True)) == []
    messages = set(LogEntry.objects.filter(block_run=br).values_list("message", flat=True))
    assert "attempt 1 done" not in messages and "attempt 2 done" in messages
    first_pid = pids_in(tmp_path / "pids")[0]
    assert group_members(first_pid) == set()
    loser_key = br.outputs[0]["key"].replace(br.claim, first_claim)
    if first_for == 2:
        # The loser did write its own output, under its own claim, which nothing points to.
        assert json.loads((variables.root() / loser_key).read_text()) == 1
    else:
        # The woken worker killed its block, which never got to write anything.
        assert not (variables.root() / loser_key).exists()


SLEEP_FIRST = block_code("data_loader", """
import os, time
with open(kwargs["pids"], "a") as f:
    f.write(f"{os.getpid()}\\n")
if not os.path.exists(kwargs["marker"]):
    open(kwargs["marker"], "w").close()
    time.sleep(30)
return 1
""")


def test_a_killed_worker_s_slot_in_its_run_goes_to_the_next_block(cluster, limit, tmp_path):
    c = cluster()
    # Two independent blocks, one at a time: whichever runs first sleeps (and is killed).
    pipeline = make_pipeline("leakrun", [
        ("one", "data_loader", SLEEP_FIRST), ("two", "data_loader", SLEEP_FIRST),
    ], concurrency_config={"block_run_limit": 1})
    run = orchestrator.run_create(pipeline, variables=_files(tmp_path))
    br = wait_for(lambda: run.block_runs.filter(status="running").first(), timeout=30)
    _running(run, br.block_uuid, tmp_path / "pids")
    assert run.block_runs.exclude(pk=br.pk).get().status == "initial"
    wait_gone(_kill_worker(c, br.worker), timeout=5)

    reconcile_until(lambda: PipelineRun.objects.get(pk=run.pk).is_terminal, timeout=limit + 20)
    statuses = dict(run.block_runs.values_list("block_uuid", "status"))
    other = "two" if br.block_uuid == "one" else "one"
    assert statuses == {br.block_uuid: "failed", other: "completed"}
    assert PipelineRun.objects.get(pk=run.pk).status == "failed"


def test_a_killed_worker_s_global_slot_goes_to_a_waiting_run(cluster, settings, limit, tmp_path):
    settings.MILLRACE_CONCURRENCY = 1
    c = cluster(MILLRACE_CONCURRENCY="1")
    first = make_pipeline("leakglobal", [("sleepy", "data_loader", SLEEP_FIRST)])
    second = make_pipeline("leakwaiting", [("quick", "data_loader", block_code("data_loader", "return 1"))])
    run = orchestrator.run_create(first, variables=_files(tmp_path))
    br = _running(run, "sleepy", tmp_path / "pids")
    waiting = orchestrator.run_create(second)
    waiting.refresh_from_db()
    assert waiting.waiting_for_slot and waiting.block_runs.get().status == "initial"
    wait_gone(_kill_worker(c, br.worker), timeout=5)

    reconcile_until(lambda: PipelineRun.objects.get(pk=waiting.pk).is_terminal, timeout=limit + 20)
    assert PipelineRun.objects.get(pk=run.pk).status == "failed"
    waiting.refresh_from_db()
    assert waiting.status == "completed" and not waiting.waiting_for_slot
    assert not BlockRun.objects.filter(status__in=["queued", "running", "initial"]).exists()


def test_a_global_slot_freed_by_the_reconcile_pass_goes_to_a_waiting_run_at_once(cluster, settings, limit, tmp_path):
    settings.MILLRACE_CONCURRENCY = 1
    c = cluster(MILLRACE_CONCURRENCY="1")
    first = make_pipeline("freedglobal", [("sleepy", "data_loader", SLEEP_FIRST)])
    second = make_pipeline("freedwaiting", [("quick", "data_loader", block_code("data_loader", "return 1"))])
    run = orchestrator.run_create(first, variables=_files(tmp_path))
    br = _running(run, "sleepy", tmp_path / "pids")
    wait_gone(_kill_worker(c, br.worker), timeout=5)
    # Created after the kill, so that when the dead block run is failed the waiting run
    # has not been idle for a whole heartbeat limit: only the freed slot can start it.
    time.sleep(INTERVAL + 0.2)
    waiting = orchestrator.run_create(second)
    assert PipelineRun.objects.get(pk=waiting.pk).waiting_for_slot

    reconcile_until(lambda: BlockRun.objects.filter(pk=br.pk, status="failed").exists(), timeout=limit + 10, every=0.1)
    waiting.refresh_from_db()
    assert waiting.updated_at > timezone.now() - timedelta(seconds=limit)  # not idle: the precondition
    quick = waiting.block_runs.get()
    assert quick.status != "initial", (
        f"after the pass that failed the dead block run, the waiting run is {waiting.status} "
        f"(waiting_for_slot={waiting.waiting_for_slot}) and its block run {quick.status}"
    )
    assert run_wait(waiting, timeout=30).status == "completed"



def test_a_block_dies_with_its_cluster_killed_as_a_group(cluster, tmp_path):
    c = cluster(workers=1)
    pipeline = make_pipeline("killgroup", [("sleepy", "data_loader", SLEEP_ONCE)])
    orchestrator.run_create(pipeline, variables=_files(tmp_path))
    wait_for(lambda: pids_in(tmp_path / "pids"), timeout=30)
    (block_pid,) = pids_in(tmp_path / "pids")
    os.killpg(c.proc.pid, signal.SIGKILL)  # as `kill -9 -PGID`, or a supervisor's killasgroup
    c.proc.wait()
    try:
        wait_gone([block_pid], timeout=5)
    finally:
        if alive([block_pid]):
            os.killpg(block_pid, signal.SIGKILL)  # the orphan this test made

# --- concurrency under load ------------------------------------------------------------------

class LoadSampler:
    """Samples from the database every ~20 ms: block runs queued or running overall, the
    most in one run, and the pipeline's runs running; keeps the peaks."""

    def __init__(self, pipeline_id: int):
        self.pipeline_id = pipeline_id
        self.peaks = {"global": 0, "per_run": 0, "runs": 0}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        active = BlockRun.objects.filter(status__in=["queued", "running"])
        per_run = active.values("pipeline_run_id").annotate(n=Count("id")).order_by("-n").values_list("n", flat=True)
        seen = {
            "global": active.count(),
            "per_run": next(iter(per_run), 0),
            "runs": PipelineRun.objects.filter(pipeline_id=self.pipeline_id, status="running").count(),
        }
        self.peaks = {k: max(v, seen[k]) for k, v in self.peaks.items()}
        self.samples += 1

    def _loop(self) -> None:
        from django.db import connection

        try:
            while not self._stop.is_set():
                self._sample()
                time.sleep(0.02)
        finally:
            connection.close()

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_thirty_fan_out_runs_never_pass_any_limit(cluster, settings):
    settings.MILLRACE_CONCURRENCY = 4
    cluster(workers=2, MILLRACE_CONCURRENCY="4")
    sleep = block_code("transformer", "import time\ntime.sleep(0.05)\nreturn args[0] + 1")
    blocks = [("load", "data_loader", block_code("data_loader", "return 0"))]
    blocks += [(f"t{i}", "transformer", sleep, ["load"]) for i in range(9)]
    pipeline = make_pipeline("load", blocks, concurrency_config={"block_run_limit": 2, "pipeline_run_limit": 3})
    started = time.monotonic()
    with LoadSampler(pipeline.pk) as sampler:
        runs = [orchestrator.run_create(pipeline) for _ in range(30)]
        done = wait_for(
            lambda: PipelineRun.objects.filter(pipeline=pipeline, status__in=["completed", "failed", "cancelled"]).count() == 30,
            timeout=180, interval=0.2,
        )
    elapsed = time.monotonic() - started
    print(f"\n30 runs x 10 blocks: {elapsed:.1f} s, peaks {json.dumps(sampler.peaks)}, {sampler.samples} samples")
    assert done
    assert set(PipelineRun.objects.filter(pk__in=[r.pk for r in runs]).values_list("status", flat=True)) == {"completed"}
    assert BlockRun.objects.filter(pipeline_run__pipeline=pipeline, status="completed").count() == 300
    # Each limit was reached and never passed.
    assert sampler.peaks == {"global": 4, "per_run": 2, "runs": 3}



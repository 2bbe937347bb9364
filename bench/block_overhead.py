"""Orchestration cost per block: chains of 10 and 50 no-op Python blocks and a fan-out
of 50, run (a) by `run_pipeline --sync` as a whole process and (b) through the worker
path (enqueue, `qcluster` workers, completion) on the configured database. The two
chains also run with `--sync` in one process (`run_pipeline_in_one_process`).

    .venv/bin/python bench/block_overhead.py [--repeat 5] [--workers 2]
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/millrace_bench .venv/bin/python bench/block_overhead.py

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

from _setup import ROOT, setup, vacuum

LOADER = "@data_loader\ndef load(*args, **kwargs):\n    return 1\n"
STEP = "@transformer\ndef step(*args, **kwargs):\n    return 1\n"
PEAK_RSS = (
    "import resource, subprocess, sys;"
    "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL);"
    "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def build() -> dict[str, str]:
    from pipelines import services
    from pipelines.models import Pipeline

    shapes = {"bench_chain_10": ("chain", 10), "bench_chain_50": ("chain", 50), "bench_fan_out_50": ("fan", 50)}
    # The same chains run in one process (Mage's run_pipeline_in_one_process).
    one = {"bench_one_chain_10": ("chain", 10), "bench_one_chain_50": ("chain", 50)}
    for uuid, (shape, n) in {**shapes, **one}.items():
        Pipeline.objects.filter(uuid=uuid).delete()
        pipeline = services.pipeline_create(uuid=uuid, run_pipeline_in_one_process=uuid in one)
        services.block_create(pipeline=pipeline, uuid="b000", type="data_loader", content=LOADER)
        for i in range(1, n + (1 if shape == "fan" else 0)):
            up = "b000" if shape == "fan" else f"b{i - 1:03d}"
            services.block_create(pipeline=pipeline, uuid=f"b{i:03d}", type="transformer", content=STEP, upstream_blocks=[up])
    return {uuid: shape for uuid, (shape, _) in shapes.items()}


def sync_run(uuid: str) -> tuple[float, int, float]:
    """(wall time of the whole process, its peak RSS in KiB, the run's own duration from
    its start to its end as recorded, which leaves out the process's start-up)."""
    from runs.models import PipelineRun

    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, sys.executable, "manage.py", "run_pipeline", uuid, "--sync"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    elapsed = time.perf_counter() - started
    if out[0] != "0":
        raise SystemExit(f"run_pipeline {uuid} --sync did not complete")
    run = PipelineRun.objects.filter(pipeline__uuid=uuid).latest("created_at", "id")
    return elapsed, int(out[1]), run.duration


def worker_run(uuid: str) -> float:
    from pipelines.models import Pipeline
    from runs import orchestrator
    from runs.models import PipelineRun

    pipeline = Pipeline.objects.get(uuid=uuid)
    started = time.perf_counter()
    run = orchestrator.run_create(pipeline)
    while True:
        status = PipelineRun.objects.filter(pk=run.pk).values_list("status", flat=True)[0]
        if status in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.002)
    elapsed = time.perf_counter() - started
    if status != "completed":
        raise SystemExit(f"{uuid} through the workers ended {status}")
    return elapsed


def start_cluster(workers: int) -> subprocess.Popen:
    env = dict(os.environ, MILLRACE_WORKERS=str(workers))
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "qcluster"], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    return proc


def stop_cluster(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def fault_cost_us() -> float:
    """What one copy-on-write page fault costs a forked child on this machine, the
    figure a child process per block is most sensitive to (a few tenths of a
    microsecond on bare metal, several microseconds on some virtual machines)."""
    import resource

    buffer = bytearray(b"\1") * (16 * 1024 * 1024)  # written, so its pages exist before the fork
    pages = len(buffer) // 4096

    def child_cpu(touch: int) -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        for _ in range(10):
            pid = os.fork()
            if pid == 0:
                for i in range(0, touch * 4096, 4096):
                    buffer[i] = 1
                os._exit(0)
            os.waitpid(pid, 0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / 10

    return (child_cpu(pages) - child_cpu(0)) / pages * 1e6


def interpreter_speed_ms() -> float:
    """How fast this machine runs Python today: the best of five runs of a fixed loop of
    a million additions. Machines of the same kind have measured up to 1.7 times
    slower on one day than on another; this figure, printed beside the others, tells
    such days apart."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i
        best = min(best, time.perf_counter() - started)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    setup()
    from django.db import connection

    shapes = build()
    print(f"database: {connection.vendor}; {os.cpu_count()} cores; median of {args.repeat} runs")

    print(f"copy-on-write page fault after fork: {fault_cost_us():.1f} us (per-block costs scale with it)")
    print(f"a million Python additions: {interpreter_speed_ms():.0f} ms (start-up and orchestration scale with it)")

    print("\n(a) run_pipeline --sync, whole process (start-up included)")
    vacuum()
    one = ("bench_one_chain_10", "bench_one_chain_50")
    for uuid in (*shapes, *one):
        sync_run(uuid)  # warm the page cache
    # Interleaved, so that a drift in the machine's speed does not land on one shape.
    runs: dict[str, list[tuple[float, int, float]]] = {uuid: [] for uuid in (*shapes, *one)}
    for _ in range(args.repeat):
        for uuid in runs:
            runs[uuid].append(sync_run(uuid))
    sync: dict[str, float] = {}
    inside: dict[str, float] = {}
    for uuid, samples in runs.items():
        sync[uuid] = statistics.median(s[0] for s in samples)
        inside[uuid] = statistics.median(s[2] for s in samples)
        if uuid in shapes:
            peak = max(s[1] for s in samples) / 1024
            print(f"  {uuid:<18} {sync[uuid]:7.3f} s   peak RSS {peak:6.1f} MiB   (the run itself {inside[uuid]:.3f} s)")

    def per_block(times: dict[str, float], ten: str, fifty: str) -> float:
        return (times[fifty] - times[ten]) / 40 * 1000

    print(f"  per-block cost (t50 - t10) / 40: {per_block(sync, 'bench_chain_10', 'bench_chain_50'):.2f} ms"
          f" (from the runs' own durations: {per_block(inside, 'bench_chain_10', 'bench_chain_50'):.2f} ms)")
    print(f"  in one process (run_pipeline_in_one_process): chain 10 {sync[one[0]]:.3f} s, chain 50 {sync[one[1]]:.3f} s;"
          f" per block, from the runs' own durations: {per_block(inside, *one):.2f} ms")

    print(f"\n(b) through the workers ({args.workers} qcluster workers), enqueue to completed")
    vacuum()
    cluster = start_cluster(args.workers)
    try:
        worker_run("bench_chain_10")  # waits for the cluster to come up
        timed: dict[str, float] = {}
        for uuid in shapes:
            samples = [worker_run(uuid) for _ in range(args.repeat)]
            timed[uuid] = statistics.median(samples)
            print(f"  {uuid:<18} {timed[uuid]:7.3f} s   (min {min(samples):.3f}, max {max(samples):.3f})")
        per_block = (timed["bench_chain_50"] - timed["bench_chain_10"]) / 40 * 1000
        print(f"  per-block cost (t50 - t10) / 40: {per_block:.2f} ms")
    finally:
        stop_cluster(cluster)


if __name__ == "__main__":
    main()

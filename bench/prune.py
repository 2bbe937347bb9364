"""Pruning old runs: loads N finished runs (10 block runs and 4 log lines each), old
enough to go, then times `runs_prune` deleting them all (batches of PRUNE_BATCH).

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/millrace_bench .venv/bin/python bench/prune.py [--runs 50000]
"""

from __future__ import annotations

import argparse
import time
from datetime import timedelta

from _setup import setup, vacuum


def load(runs: int) -> None:
    from django.utils import timezone

    from pipelines import services
    from pipelines.models import Pipeline
    from runs.models import BlockRun, LogEntry, PipelineRun

    Pipeline.objects.filter(uuid="bench_prune").delete()
    pipeline = services.pipeline_create(uuid="bench_prune")
    old = timezone.now() - timedelta(days=60)
    step = 5000
    for start in range(0, runs, step):
        made = PipelineRun.objects.bulk_create(
            PipelineRun(pipeline=pipeline, status="completed", execution_date=old, created_at=old, completed_at=old)
            for _ in range(min(step, runs - start))
        )
        BlockRun.objects.bulk_create(
            (BlockRun(pipeline_run=run, block_uuid=f"b{i}", status="completed", attempt=1) for run in made for i in range(10)),
            batch_size=10_000,
        )
        LogEntry.objects.bulk_create(
            (LogEntry(pipeline_run=run, timestamp=old, level="INFO", message=f"line {i}") for run in made for i in range(4)),
            batch_size=10_000,
        )
    # auto_now_add wrote now: age them.
    PipelineRun.objects.filter(pipeline=pipeline).update(created_at=old)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50_000)
    args = parser.parse_args()
    setup()
    from django.db import connection

    from runs.services import runs_prune

    started = time.perf_counter()
    load(args.runs)
    vacuum()
    print(f"database: {connection.vendor}; loaded {args.runs} runs in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    done = runs_prune(older_than=timedelta(days=30))
    took = time.perf_counter() - started
    print(f"pruned {done.runs} runs, {done.block_runs} block runs, {done.logs} log lines in {took:.1f} s"
          f" ({done.runs / took:,.0f} runs a second)")


if __name__ == "__main__":
    main()

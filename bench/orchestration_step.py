"""The orchestrator's own cost per block, with no child process: a chain of 50 blocks is
finished one block at a time, as a worker does (record the result, advance the run,
claim the next block of the chain in the same transaction), with no code run.

    .venv/bin/python bench/orchestration_step.py [--repeat 25]
    DATABASE_URL=postgres://... .venv/bin/python bench/orchestration_step.py

Prints the median and the fastest time per block."""

from __future__ import annotations

import argparse
import statistics
import time

from _setup import setup


def chain_pass(pipeline_uuid: str) -> tuple[float, int]:
    from pipelines.execution import ExecutionResult
    from pipelines.models import Pipeline
    from runs import orchestrator
    from runs.models import BlockRun

    run = orchestrator.run_create(Pipeline.objects.get(uuid=pipeline_uuid), start=False)
    [first] = orchestrator.advance(run.pk)
    BlockRun.objects.filter(pk=first).update(status="running", claim="first", attempt=1)
    block_run = BlockRun.objects.select_related("pipeline_run__pipeline").get(pk=first)
    claim, blocks = "first", 0
    started = time.perf_counter()
    while True:
        done = orchestrator.finish(block_run, claim, ExecutionResult(status="completed"), claim_next=True)
        blocks += 1
        if done.claimed is None:
            break
        claimed = done.claimed
        block_run = BlockRun(
            pk=claimed.block_run_id, pipeline_run=claimed.run, block_uuid=claimed.block_uuid,
            attempt=claimed.attempt, claim=claimed.claim, status="running",
        )
        claim = claimed.claim
    return (time.perf_counter() - started) / blocks * 1000, blocks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=25)
    args = parser.parse_args()
    setup()
    from django.db import connection

    from pipelines import services
    from pipelines.models import Pipeline

    uuid = "bench_step_chain_50"
    if not Pipeline.objects.filter(uuid=uuid).exists():
        pipeline = services.pipeline_create(uuid=uuid)
        for i in range(50):
            services.block_create(
                pipeline=pipeline, uuid=f"b{i:03d}", type="transformer" if i else "data_loader",
                content=f"@{'transformer' if i else 'data_loader'}\ndef run(*args, **kwargs):\n    return {i}\n",
                upstream_blocks=[f"b{i - 1:03d}"] if i else [],
            )
    samples = [chain_pass(uuid) for _ in range(args.repeat)]
    times = [ms for ms, _ in samples[min(5, len(samples) - 1):]]  # the first passes warm the caches
    print(f"database: {connection.vendor}; a chain of {samples[0][1]} blocks finished {args.repeat} times")
    print(f"  per block: median {statistics.median(times):.3f} ms, fastest {min(times):.3f} ms")


if __name__ == "__main__":
    main()

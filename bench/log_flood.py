"""A block that prints many lines: how much slower it runs under Millrace than the same
loop printing to a file, and what reaches the database.

    .venv/bin/python bench/log_flood.py [--lines 200000] [--repeat 5] [--uncapped]
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/millrace_bench .venv/bin/python bench/log_flood.py

Each run is a real `run_pipeline --sync` (the block in its child process, its lines
through the supervisor and the log writer into the configured database). The figure
that counts is the loop's own time, measured by the block: printing to its stdout
against printing the same lines to a file it opens itself. `--uncapped` also runs the
flood once with MILLRACE_LOG_LINES_PER_BLOCK=0 (every line a row), as before the cap.

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from _setup import ROOT, setup, vacuum

TO_STDOUT = """@data_loader
def load(*args, **kwargs):
    import time
    started = time.perf_counter()
    for i in range({lines}):
        print("line", i, "of a block that prints a great deal")
    return time.perf_counter() - started
"""
TO_FILE = """@data_loader
def load(*args, **kwargs):
    import os, tempfile, time
    fd, path = tempfile.mkstemp()
    started = time.perf_counter()
    with os.fdopen(fd, "w") as f:
        for i in range({lines}):
            print("line", i, "of a block that prints a great deal", file=f)
    took = time.perf_counter() - started
    os.unlink(path)
    return took
"""


def build(lines: int) -> None:
    from pipelines import services
    from pipelines.models import Pipeline

    for uuid, code in (("bench_log_flood", TO_STDOUT), ("bench_log_file", TO_FILE)):
        Pipeline.objects.filter(uuid=uuid).delete()
        pipeline = services.pipeline_create(uuid=uuid)
        services.block_create(pipeline=pipeline, uuid="load", type="data_loader", content=code.format(lines=lines))


def run(uuid: str, **env: str) -> tuple[float, float, int]:
    """(the loop's own time, the block run's recorded duration, log rows stored)."""
    from pipelines import variables
    from runs.models import BlockRun, LogEntry

    subprocess.run(
        [sys.executable, "manage.py", "run_pipeline", uuid, "--sync"], cwd=ROOT, env={**os.environ, **env},
        capture_output=True, check=True,
    )
    br = BlockRun.objects.filter(pipeline_run__pipeline__uuid=uuid).latest("id")
    return variables.read_value(br.outputs[0]), br.duration or 0.0, LogEntry.objects.filter(block_run=br).count()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--uncapped", action="store_true")
    args = parser.parse_args()
    setup()
    from django.conf import settings
    from django.db import connection

    build(args.lines)
    vacuum()
    print(f"database: {connection.vendor}; {os.cpu_count()} cores; {args.lines:,} lines; median of {args.repeat} runs")
    samples: dict[str, list[tuple[float, float, int]]] = {"bench_log_file": [], "bench_log_flood": []}
    for uuid in samples:
        run(uuid)  # warm up
    for _ in range(args.repeat):
        for uuid in samples:
            samples[uuid].append(run(uuid))
    loop = {uuid: statistics.median(s[0] for s in rows) for uuid, rows in samples.items()}
    block = {uuid: statistics.median(s[1] for s in rows) for uuid, rows in samples.items()}
    print(f"  printing to a file:          loop {loop['bench_log_file']:.3f} s, block run {block['bench_log_file']:.3f} s")
    print(f"  printing to stdout (logged): loop {loop['bench_log_flood']:.3f} s, block run {block['bench_log_flood']:.3f} s,"
          f" {samples['bench_log_flood'][-1][2]:,} log rows stored (MILLRACE_LOG_LINES_PER_BLOCK={settings.MILLRACE_LOG_LINES_PER_BLOCK:,})")
    print(f"  ratio, loop to loop: {loop['bench_log_flood'] / loop['bench_log_file']:.2f}x;"
          f" block run to block run: {block['bench_log_flood'] / block['bench_log_file']:.2f}x")
    if args.uncapped:
        took, duration, rows = run("bench_log_flood", MILLRACE_LOG_LINES_PER_BLOCK="0")
        print(f"  uncapped (every line a row): loop {took:.3f} s, block run {duration:.3f} s, {rows:,} log rows stored")


if __name__ == "__main__":
    main()

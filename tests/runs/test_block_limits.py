"""Limits a block cannot pass, with real blocks in real child processes: its stored log
lines are capped (head and tail kept, the whole output in a compressed file), printing
many lines stays about as fast as printing to a file, and a memory limit fails the block
instead of threatening the machine. And the clear messages a block run gets instead of a
Python error or a silent wait."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import pytest

from runs import orchestrator
from runs.models import BlockRun, LogEntry, PipelineRun
from runs.services import run_execute_sync
from tests.helpers import block_code, make_pipeline

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]


def _run(pipeline, **variables) -> PipelineRun:
    return run_execute_sync(orchestrator.run_create(pipeline, variables=variables, start=False))


def _file_lines(data_dir: Path, key: str) -> list[str]:
    with gzip.open(data_dir / key, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n").split(" ", 3)[3] for line in f]


def test_a_block_past_the_cap_keeps_its_head_and_tail_and_all_of_it_in_a_file(settings, data_dir):
    settings.MILLRACE_LOG_LINES_PER_BLOCK = 1000
    total = 25_000
    pipeline = make_pipeline("loud", [("loud", "data_loader", block_code("data_loader", f"""
for i in range({total}):
    print(f"line {{i}}")
return 1
"""))])

    run = _run(pipeline)

    assert run.status == "completed"
    br = run.block_runs.get()
    rows = list(LogEntry.objects.filter(block_run=br).order_by("id").values_list("message", flat=True))
    printed = [m for m in rows if m.startswith("line ")]
    assert printed == [f"line {i}" for i in range(500)] + [f"line {i}" for i in range(total - 500, total)]
    assert len(rows) == 1001
    assert rows[500].startswith(
        f"... {total - 1000:,} lines not stored here (lines 501 to {total - 500:,} of {total:,}; "
        "MILLRACE_LOG_LINES_PER_BLOCK is 1,000): the whole output is in pipeline_runs/"
    )
    assert rows[500].endswith(f"(GET /api/block_runs/{br.pk}/log_file)")
    assert br.metrics["log_lines"] == total and br.metrics["log_lines_left_out"] == total - 1000
    assert br.metrics["log_file"].endswith("/log.txt.gz")
    assert _file_lines(data_dir, br.metrics["log_file"]) == [f"line {i}" for i in range(total)]


def test_a_block_under_the_cap_stores_every_line_and_writes_no_file(settings, data_dir):
    settings.MILLRACE_LOG_LINES_PER_BLOCK = 1000
    pipeline = make_pipeline("quiet", [("quiet", "data_loader", block_code("data_loader", "for i in range(1000):\n    print(i)\nreturn 1"))])
    run = _run(pipeline)
    br = run.block_runs.get()
    assert LogEntry.objects.filter(block_run=br).count() == 1000
    assert "log_file" not in br.metrics
    assert not list(data_dir.rglob("log.txt.gz"))


# Prints `n` lines on stdout, one on stderr every 100 and a logger line every 1000, then
# says whether its stdout was still line-buffered.
CHATTY = block_code("data_loader", """
import sys
for i in range(kwargs["n"]):
    print(f"out {i}")
    if i % 100 == 0:
        print(f"err {i}", file=sys.stderr)
    if i % 1000 == 0:
        kwargs["logger"].info(f"log {i}")
return sys.stdout.line_buffering
""")


@pytest.mark.parametrize("lines", [200_000, 500])
def test_a_chatty_block_s_output_is_buffered_and_not_a_line_is_lost(settings, data_dir, lines):
    """Past CHATTY_LINES lines the supervisor has the child buffer its output (a system
    call per line was what made printing slow); signals landing in the middle of its
    writes must lose nothing, and a quiet block keeps its line buffering."""
    settings.MILLRACE_LOG_LINES_PER_BLOCK = 100
    pipeline = make_pipeline("chatty", [("chatty", "data_loader", CHATTY)])
    run = _run(pipeline, n=lines)
    assert run.status == "completed"
    br = run.block_runs.get()
    line_buffered = br.outputs[0]["value"]
    assert line_buffered is (lines < 1000)
    text = _file_lines(data_dir, br.metrics["log_file"])
    out = [line for line in text if line.startswith("out ")]
    err = [line for line in text if line.startswith("err ")]
    log = [line for line in text if line.startswith("log ")]
    assert out == [f"out {i}" for i in range(lines)]
    assert err == [f"err {i}" for i in range(0, lines, 100)]
    assert log == [f"log {i}" for i in range(0, lines, 1000)]


def test_a_block_over_its_memory_limit_fails_saying_so_and_one_under_it_completes(settings):
    settings.MILLRACE_BLOCK_MEMORY_MB = 256
    pipeline = make_pipeline("memory", [
        ("greedy", "data_loader", block_code("data_loader", "data = bytearray(1024 ** 3)\nreturn len(data)")),
        ("modest", "data_loader", block_code("data_loader", "data = bytearray(64 * 1024 ** 2)\nreturn len(data)")),
    ])
    run = _run(pipeline)
    rows = {br.block_uuid: br for br in run.block_runs.all()}
    assert rows["greedy"].status == "failed"
    assert rows["greedy"].error.startswith("The block used more than 256 MB of memory (MILLRACE_BLOCK_MEMORY_MB)")
    assert rows["modest"].status == "completed" and rows["modest"].outputs[0]["value"] == 64 * 1024 ** 2


def test_a_runtime_variable_named_like_a_parameter_gets_a_clear_message():
    pipeline = make_pipeline("clash", [
        ("load", "data_loader", block_code("data_loader", "return 1")),
        ("clean", "transformer", block_code("transformer", "return data + 1", "data, *args, **kwargs"), ["load"]),
    ])
    run = _run(pipeline, data=5)
    clean = run.block_runs.get(block_uuid="clean")
    assert clean.status == "failed"
    assert "got multiple values" not in clean.error
    assert "receives the output of its upstream block #1 as its parameter 'data'" in clean.error
    assert "the runtime variable 'data' has the same name" in clean.error


def test_a_sync_run_says_what_it_waits_for(settings):
    settings.MILLRACE_CONCURRENCY = 1
    holder = orchestrator.run_create(make_pipeline("holder", [("a", "data_loader", block_code("data_loader", "return 1"))]))
    assert BlockRun.objects.filter(pipeline_run=holder, status="queued").exists()  # no worker runs it
    waiting = orchestrator.run_create(make_pipeline("waiting", [("b", "data_loader", block_code("data_loader", "return 2"))]), start=False)
    told: list[str] = []

    def on_wait(message: str) -> None:
        told.append(message)
        orchestrator.run_cancel(holder.pk)  # frees the slot

    run = run_execute_sync(waiting, on_wait=on_wait)

    assert run.status == "completed"
    assert len(told) == 1
    assert told[0].startswith("waiting for a slot: the 1 block runs allowed at once (MILLRACE_CONCURRENCY)")
    assert f"run(s) {holder.pk}" in told[0] and "1 of them queued for a worker" in told[0]


def test_output_still_in_the_pipes_when_the_block_ends_is_all_read(tmp_path):
    """A chatty block's pipes hold a megabyte each; when the block ends with them full
    and its lines are stored slowly, every line must still be read (the supervisor used
    to stop reading 0.2 s after the block's result)."""
    from pipelines.execution import BlockSpec, log_lines, run_block

    received: list[str] = []

    def slow_store(items) -> None:
        time.sleep(0.05)  # a busy database
        received.extend(line.message for line in log_lines(items))

    code = "@data_loader\ndef load(*args, **kwargs):\n    for i in range(100_000):\n        print(i)\n"
    spec = BlockSpec("drain", "load", "data_loader", "python", code, data_dir=str(tmp_path), output_prefix="x")
    result = run_block(spec, on_log=slow_store)
    assert result.status == "completed", result.error
    assert received == [str(i) for i in range(100_000)]


def test_run_pipeline_says_when_nothing_will_run_its_blocks():
    import io

    from django.core.management import call_command

    make_pipeline("idle", [("a", "data_loader", block_code("data_loader", "return 1"))])
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(SystemExit):
        call_command("run_pipeline", "idle", "--timeout", "1.5", stdout=out, stderr=err)
    assert ": its blocks are queued, and no worker cluster is running: start one (manage.py qcluster), or run with --sync" in err.getvalue()
    assert out.getvalue().splitlines()[-1].endswith(" running")


def test_the_whole_output_is_downloadable_by_a_viewer(settings):
    from rest_framework.test import APIClient

    from tests.helpers import api_client, user_in

    settings.MILLRACE_LOG_LINES_PER_BLOCK = 10
    pipeline = make_pipeline("download", [
        ("loud", "data_loader", block_code("data_loader", "for i in range(100):\n    print(f'line {i}')\nreturn 1")),
        ("quiet", "data_loader", block_code("data_loader", "print('one line')\nreturn 1")),
    ])
    run = _run(pipeline)
    loud, quiet = run.block_runs.get(block_uuid="loud"), run.block_runs.get(block_uuid="quiet")
    viewer = api_client(user_in("viewer", "viewers"))

    response = viewer.get(f"/api/block_runs/{loud.pk}/log_file")

    assert response.status_code == 200
    assert response["Content-Type"] == "application/gzip"
    assert f'filename="run-{run.pk}-loud-attempt-1.log.gz"' in response["Content-Disposition"]
    text = gzip.decompress(b"".join(response.streaming_content)).decode()
    assert [line.split(" ", 3)[3] for line in text.splitlines()] == [f"line {i}" for i in range(100)]
    missing = viewer.get(f"/api/block_runs/{quiet.pk}/log_file")
    assert missing.status_code == 404 and "every line of its output is stored" in missing.json()["error"]["message"]
    assert viewer.get("/api/block_runs/999999/log_file").status_code == 404
    assert APIClient().get(f"/api/block_runs/{loud.pk}/log_file").status_code == 401


def test_the_admin_links_a_capped_block_run_to_its_whole_output(settings, client):
    from django.contrib.auth import get_user_model

    settings.MILLRACE_LOG_LINES_PER_BLOCK = 10
    pipeline = make_pipeline("adminlink", [("loud", "data_loader", block_code("data_loader", "for i in range(100):\n    print(i)\nreturn 1"))])
    br = _run(pipeline).block_runs.get()
    client.force_login(get_user_model().objects.create_superuser("root", password="pw"))
    page = client.get(f"/admin/runs/blockrun/{br.pk}/change/").content.decode()
    assert f'href="/api/block_runs/{br.pk}/log_file"' in page and "(90 lines not stored as log lines)" in page


def test_log_lines_the_database_cannot_hold_are_stored_escaped():
    """PostgreSQL refuses a NUL character in text, and a lone surrogate is not text:
    a block that prints one must not lose its log (or its run)."""
    pipeline = make_pipeline("odd", [("odd", "data_loader", block_code("data_loader", """
print("before\\x00after")
kwargs["logger"].info("half \\ud800 a pair")
return 1
"""))])
    run = _run(pipeline)
    assert run.status == "completed"
    messages = list(LogEntry.objects.filter(pipeline_run=run, block_uuid="odd").values_list("message", flat=True))
    assert "before\\x00after" in messages
    assert "half \\ud800 a pair" in messages

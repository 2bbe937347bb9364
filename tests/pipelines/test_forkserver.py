"""Block children come from a fork server, not from the orchestrating process."""

from __future__ import annotations

import os
import signal

import pytest

from pipelines import variables
from pipelines.execution import BlockSpec, process, run_block

pytestmark = pytest.mark.sqlite


def run(code: str, **fields) -> object:
    spec = BlockSpec("fs", "probe", "data_loader", "python", code, output_prefix="fs/probe", **fields)
    result = run_block(spec, on_log=lambda lines: None)
    assert result.status == "completed", result.error
    return variables.read_value(result.outputs[0])


# A dict: a returned list would be two outputs (Mage's rule).
PARENT = "import os\n@data_loader\ndef probe(*a, **k):\n    return {'pid': os.getpid(), 'parent': os.getppid()}\n"


def pids() -> tuple[int, int]:
    value = run(PARENT)
    return value["pid"], value["parent"]


def test_blocks_are_forked_by_one_server_and_not_by_the_caller():
    pid1, parent1 = pids()
    pid2, parent2 = pids()
    assert pid1 != pid2
    assert parent1 == parent2 != os.getpid()


def test_a_killed_fork_server_is_replaced_and_the_next_block_runs():
    _, server = pids()
    os.kill(server, signal.SIGKILL)
    os.waitpid(server, 0)
    _, new_server = pids()
    assert new_server != server


def test_a_block_sees_the_callers_environment_and_data_dir_at_call_time(monkeypatch, tmp_path, settings):
    run(PARENT)  # the server is up before the changes below
    monkeypatch.setenv("MILLRACE_PROBE", "now")
    settings.MILLRACE_DATA_DIR = tmp_path
    value = run("import os\n@data_loader\ndef probe(*a, **k):\n    return os.environ.get('MILLRACE_PROBE')\n")
    assert value == "now"
    assert (tmp_path / "fs" / "probe" / "output_0.json").exists()


def test_the_server_has_not_set_up_django(tmp_path):
    # Children start from a small interpreter: no app registry, no database connection.
    ready = run("import sys\n@data_loader\ndef probe(*a, **k):\n    return 'django.apps.registry' in sys.modules and __import__('django.apps').apps.apps.ready\n")
    assert ready is False
    assert process.servers  # and the caller keeps one server for its later blocks


def test_a_block_sees_exactly_the_callers_environment(monkeypatch):
    monkeypatch.setenv("MILLRACE_GONE", "before")
    run(PARENT)  # the server starts with MILLRACE_GONE set
    monkeypatch.delenv("MILLRACE_GONE")
    probe = "import os\n@data_loader\ndef probe(*a, **k):\n    return {'gone': os.environ.get('MILLRACE_GONE'), 'path': os.environ.get('PYTHONPATH')}\n"
    assert run(probe) == {"gone": None, "path": os.environ.get("PYTHONPATH")}
    # Back to the environment the server started with: nothing is sent, nothing differs.
    monkeypatch.setenv("MILLRACE_GONE", "before")
    assert run(probe) == {"gone": "before", "path": os.environ.get("PYTHONPATH")}


def test_the_server_stays_small_without_django():
    # Every megabyte the server holds makes each fork and each child's exit slower.
    loaded = run("import sys\n@data_loader\ndef probe(*a, **k):\n    return {'loaded': sorted(m for m in sys.modules if m.split('.')[0] in ('django', 'asyncio'))}\n")
    assert loaded == {"loaded": []}

"""A `Session`: one real child process runs several blocks one after another (a
pipeline run with Mage's `run_pipeline_in_one_process`), sharing its memory."""

from __future__ import annotations

import os
import signal
import textwrap

import pytest

from pipelines import variables
from pipelines.execution import BlockSpec, LogLine, Session, UpstreamInput, log_lines, run_block
from tests.pipelines.test_execution import is_gone

pytestmark = pytest.mark.sqlite


def spec(uuid: str, code: str, *, inputs: list[UpstreamInput] | None = None, **fields) -> BlockSpec:
    return BlockSpec(
        pipeline_uuid="one", block_uuid=uuid, block_type="transformer", language="python",
        content=textwrap.dedent(code), inputs=inputs or [], output_prefix=f"runs/1/{uuid}", **fields,
    )


def run_in(session: Session, block: BlockSpec) -> tuple[object, list[str]]:
    lines: list[LogLine] = []
    result = run_block(block, on_log=lambda items: lines.extend(log_lines(items)), session=session)
    return result, [line.message for line in lines]


def value(result) -> object:
    assert result.status == "completed", result.error
    return variables.read_value(result.outputs[0])


@pytest.fixture
def session():
    session = Session()
    yield session
    session.close()


def test_blocks_of_a_session_share_one_process_and_its_context(session):
    first, first_logs = run_in(session, spec("a", """
        import ctypes, os, sys

        @transformer
        def a(*args, **kwargs):
            kwargs["context"]["seen"] = ["a"]
            print("printed by a")
            print("warned by a", file=sys.stderr)
            ctypes.CDLL(None).printf(b"printf by a\\n")
            kwargs["logger"].info("logged by a")
            return {"pid": os.getpid()}
        """))
    second, second_logs = run_in(session, spec("b", """
        import os

        @transformer
        def b(*args, **kwargs):
            kwargs["context"]["seen"].append("b")
            print("printed by b")
            return {"pid": os.getpid(), "seen": kwargs["context"]["seen"]}
        """))

    assert value(second) == {"pid": value(first)["pid"], "seen": ["a", "b"]}
    # Each block's output lines come back with that block, C stdio's included.
    assert sorted(first_logs) == ["logged by a", "printed by a", "printf by a", "warned by a"]
    assert second_logs == ["printed by b"]
    pid = session.pid
    session.close()
    assert is_gone(pid)


def test_a_block_that_kills_its_process_ends_the_session_and_the_next_block_gets_a_new_one(session):
    pid_code = "import os\n@transformer\ndef p(*args, **kwargs):\n    return {'pid': os.getpid()}\n"
    before = value(run_in(session, spec("before", pid_code))[0])["pid"]

    crashed, _ = run_in(session, spec("crash", "import os\n@transformer\ndef c(*args, **kwargs):\n    os._exit(3)\n"))
    looped, _ = run_in(session, spec("loop", "@transformer\ndef l(*args, **kwargs):\n    while True:\n        pass\n", timeout=1))
    after = value(run_in(session, spec("after", pid_code))[0])["pid"]

    assert crashed.status == "failed" and "exited with code 3" in crashed.error
    assert looped.status == "failed" and looped.error.startswith("Timed out after 1 s")
    assert is_gone(before)
    assert after != before


def test_outputs_in_memory_pass_values_the_store_cannot_write_to_the_blocks_below(session):
    made = run_in(session, spec("lock", """
        import threading

        @transformer
        def make(*args, **kwargs):
            lock = threading.Lock()
            kwargs["context"]["lock"] = lock
            return lock, [1, 2]
        """, outputs_in_memory=True))[0]
    assert made.status == "completed", made.error
    lock_meta, list_meta = made.outputs
    assert lock_meta["kind"] == "memory" and lock_meta["type"] == "_thread.lock"
    assert list_meta["kind"] == "json"  # what the store can write, it writes as well

    used = run_in(session, spec("use", """
        @transformer
        def use(outputs, *args, **kwargs):
            lock, numbers = outputs
            return {"same_object": lock is kwargs["context"]["lock"], "numbers": numbers}
        """, inputs=[UpstreamInput("lock", made.outputs)]))[0]

    assert value(used) == {"same_object": True, "numbers": [1, 2]}
    # Outside that process the value does not exist, and reading it says why.
    with pytest.raises(variables.VariableError, match="kept only in the memory of the process"):
        variables.read_value(lock_meta)


def test_without_outputs_in_memory_a_value_the_store_cannot_write_fails_the_block(session):
    result, _ = run_in(session, spec("lock", """
        import threading

        @transformer
        def make(*args, **kwargs):
            return threading.Lock()
        """))

    assert result.status == "failed"
    assert "cannot be stored" in result.error


def test_a_process_killed_between_two_blocks_is_replaced_before_the_next_block(session):
    pid_code = "import os\n@transformer\ndef p(*args, **kwargs):\n    return {'pid': os.getpid()}\n"
    first = value(run_in(session, spec("first", pid_code))[0])["pid"]
    os.kill(first, signal.SIGKILL)  # the session's own child, by its id
    assert is_gone(first)

    second = run_in(session, spec("second", pid_code))[0]

    assert value(second)["pid"] != first

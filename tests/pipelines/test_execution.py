"""The block executor: each test runs real block code in a real forked child through
`pipelines.execution.run_block`, with real files in the test's data directory."""

from __future__ import annotations

import functools
import marshal
import os
import re
import signal
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import psutil
import pytest

from pipelines import variables
from pipelines.execution import (
    BlockSpec,
    ExecutionResult,
    LogLine,
    UpstreamInput,
    log_lines,
    run_block,
)
from pipelines.execution.python import (
    block_filename,
    compiled,
    input_value,
    parameters,
    parameters_inspected,
)

pytestmark = pytest.mark.sqlite

PIPELINE = "sales"


def run(
    code: str,
    *,
    block_type: str = "transformer",
    uuid: str = "blk",
    inputs: list[UpstreamInput] | None = None,
    kwargs: dict | None = None,
    configuration: dict | None = None,
    timeout: float | None = None,
    on_tick: Callable[[], bool] | None = None,
    tick: float = 2.0,
    logs: list[LogLine] | None = None,
) -> tuple[ExecutionResult, list[LogLine]]:
    logs = [] if logs is None else logs
    spec = BlockSpec(
        pipeline_uuid=PIPELINE, block_uuid=uuid, block_type=block_type, language="python",
        content=textwrap.dedent(code), configuration=configuration or {}, inputs=inputs or [],
        kwargs=kwargs or {}, output_prefix=f"runs/1/{uuid}", timeout=timeout,
    )
    result = run_block(spec, on_log=lambda items: logs.extend(log_lines(items)), on_tick=on_tick, tick=tick)
    return result, logs


def stored(result: ExecutionResult) -> list:
    return [variables.read_value(meta) for meta in result.outputs]


def messages(logs: list[LogLine]) -> list[str]:
    return [line.message for line in logs]


def upstream(uuid: str, *values) -> UpstreamInput:
    return UpstreamInput(uuid, variables.write_outputs(f"runs/1/{uuid}", list(values)))


def is_gone(pid: int, within: float = 3.0) -> bool:
    """True once `pid` has ended (a zombie waiting for init to reap it counts as ended)."""
    deadline = time.monotonic() + within
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def kill_if_running(pid: int) -> None:
    # Only the process this test's block started, by its id.
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def pid_from(logs: list[LogLine], label: str) -> int:
    for line in logs:
        match = re.search(rf"{label}=(\d+)", line.message)
        if match:
            return int(match.group(1))
    raise AssertionError(f"no {label}=<pid> line in {messages(logs)}")


# Inputs and kwargs


def test_upstream_outputs_arrive_as_positional_arguments_in_edge_order():
    first = upstream("first", "from first")
    second = upstream("second", {"n": 2})

    result, logs = run(
        """
        @transformer
        def combine(a, b, **kwargs):
            print(f"a={a!r} b={b!r}")
            return {"a": a, "b": b}
        """,
        inputs=[first, second],
    )

    assert result.status == "completed", result.error
    assert stored(result) == [{"a": "from first", "b": {"n": 2}}]
    assert "a='from first' b={'n': 2}" in messages(logs)

    swapped, _ = run("@transformer\ndef combine(a, b, **kwargs):\n    return {'a': a, 'b': b}\n", inputs=[second, first])
    assert stored(swapped) == [{"a": {"n": 2}, "b": "from first"}]


def test_kwargs_carry_runtime_variables_logger_context_and_configuration():
    result, _ = run(
        """
        import logging

        @data_loader
        def load(*args, **kwargs):
            return {
                "args": list(args),
                "env": kwargs["env"],
                "execution_date": kwargs["execution_date"],
                "logger": isinstance(kwargs["logger"], logging.Logger),
                "context": kwargs["context"],
                "configuration": kwargs["configuration"],
            }
        """,
        block_type="data_loader",
        kwargs={"env": "prod", "execution_date": "2024-05-01T00:00:00+00:00"},
        configuration={"data_provider": "postgres"},
    )

    assert result.status == "completed", result.error
    assert stored(result) == [{
        "args": [],
        "env": "prod",
        "execution_date": "2024-05-01T00:00:00+00:00",
        "logger": True,
        "context": {},
        "configuration": {"data_provider": "postgres"},
    }]


def test_a_function_gets_only_the_keyword_arguments_it_names():
    result, _ = run(
        """
        @data_loader
        def load(*, env, configuration):
            return [env, configuration]
        """,
        block_type="data_loader", kwargs={"env": "dev", "other": 1}, configuration={"k": "v"},
    )

    assert result.status == "completed", result.error
    assert stored(result) == ["dev", {"k": "v"}]



def _signatures() -> list:
    def f1(a, b, *args, c, d=1, **kwargs): ...
    def f2(a, /, b, c=3, *, d): ...
    def f3(*args, **kwargs): ...
    def f4(): ...
    def f5(a=1, b=2): ...
    def f6(a, b, /, c, *args): ...
    def f7(x, *, y, z=0): ...

    def wrapped(a, b, c): ...

    @functools.wraps(wrapped)
    def wrapper(*args, **kwargs): ...

    class CallableObject:
        def __call__(self, a, b=1, **kwargs): ...

    return [f1, f2, f3, f4, f5, f6, f7, wrapper, functools.partial(f1, 1), CallableObject()]


@pytest.mark.parametrize("function", _signatures(), ids=lambda f: getattr(f, "__name__", type(f).__name__))
def test_parameters_read_off_the_code_object_match_inspect(function):
    # The executor reads a plain function's parameters off its code object (cheaper in a
    # freshly forked child); it must agree with inspect.signature on every shape.
    assert parameters(function) == parameters_inspected(function)


# Logs


def test_print_logger_and_stderr_lines_come_back_through_on_log_with_levels():
    result, logs = run(
        """
        import sys

        @data_loader
        def load(*args, logger, **kwargs):
            print("printed line")
            logger.info("info via %s", "logger")
            logger.warning("careful")
            logger.error("went wrong")
            print("to stderr", file=sys.stderr)
            return 1
        """,
        block_type="data_loader",
    )

    assert result.status == "completed", result.error
    got = {(line.level, line.message) for line in logs}
    assert {
        ("INFO", "printed line"),
        ("INFO", "info via logger"),
        ("WARNING", "careful"),
        ("ERROR", "went wrong"),
        ("WARNING", "to stderr"),
    } <= got
    assert all(isinstance(line.timestamp, float) and line.timestamp > 0 for line in logs)


def test_c_level_writes_to_stdout_and_stderr_are_captured():
    result, logs = run(
        """
        import os

        @data_loader
        def load(*args, **kwargs):
            os.write(1, b"raw\\n")
            os.write(2, b"raw err\\n")
            print("no newline at the end", end="")
        """,
        block_type="data_loader",
    )

    assert result.status == "completed", result.error
    got = {(line.level, line.message) for line in logs}
    assert {("INFO", "raw"), ("WARNING", "raw err"), ("INFO", "no newline at the end")} <= got


def test_output_of_a_c_library_printf_is_not_lost():
    # C code writing through libc's stdio (buffered when stdout is a pipe) must be
    # flushed before the child ends.
    result, logs = run(
        """
        import ctypes

        @data_loader
        def load(*args, **kwargs):
            ctypes.CDLL(None).printf(b"from printf\\n")
        """,
        block_type="data_loader",
    )

    assert result.status == "completed", result.error
    assert "from printf" in messages(logs)


def test_a_logger_line_of_300_kb_comes_back_whole():
    result, logs = run(
        """
        @data_loader
        def load(*args, logger, **kwargs):
            logger.info("x" * 300_000)
            return 1
        """,
        block_type="data_loader",
    )

    assert result.status == "completed", result.error
    assert "x" * 300_000 in messages(logs)


# Outputs


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("return 1, 2", [1, 2]),
        ("return [1, 2, 3]", [1, 2, 3]),
        ("return None", []),
        ("pass", []),
        ("return {'a': 1, 'b': [1, 2]}", [{"a": 1, "b": [1, 2]}]),
        ("return 'text'", ["text"]),
    ],
    ids=["tuple-is-two", "list-is-three", "none-is-none", "no-return-is-none", "dict-is-one", "scalar-is-one"],
)
def test_mage_output_rules(body, expected):
    result, _ = run(f"@data_loader\ndef load(*args, **kwargs):\n    {body}\n", block_type="data_loader")

    assert result.status == "completed", result.error
    assert stored(result) == expected
    assert result.metrics["outputs"] == len(expected)


def test_a_dataframe_in_a_list_is_one_output():
    result, _ = run(
        """
        import pandas as pd

        @data_loader
        def load(*args, **kwargs):
            return [pd.DataFrame({"id": [1, 2, 3], "name": ["a", "b", "c"]})]
        """,
        block_type="data_loader",
    )

    assert result.status == "completed", result.error
    assert len(result.outputs) == 1
    assert result.outputs[0]["kind"] == variables.KIND_DATAFRAME
    pd.testing.assert_frame_equal(stored(result)[0], pd.DataFrame({"id": [1, 2, 3], "name": ["a", "b", "c"]}))
    assert result.metrics["rows"] == 3


def test_a_wide_dataframe_output_is_stored():
    # Its meta (columns and dtypes) makes the child's result message a few hundred KB.
    result, _ = run(
        """
        import numpy as np
        import pandas as pd

        @data_loader
        def load(*args, **kwargs):
            names = [f"{'measurement_' * 8}{i:05d}" for i in range(2000)]
            return pd.DataFrame(np.zeros((1, 2000)), columns=names)
        """,
        block_type="data_loader",
    )

    assert result.status == "completed", result.error
    assert result.outputs[0]["shape"] == [1, 2000]


def test_input_value_gives_a_single_output_as_is_and_several_as_a_list():
    single = variables.write_outputs("runs/1/one", [{"k": "v"}])
    several = variables.write_outputs("runs/1/two", [1, 2])

    assert input_value(single) == {"k": "v"}
    assert input_value(several) == [1, 2]
    assert input_value([]) is None


def test_a_downstream_receives_a_frame_as_is_and_a_multi_output_upstream_as_a_list():
    frame = upstream("frame", pd.DataFrame({"x": [1, 2]}))
    pair = upstream("pair", "left", "right")

    result, _ = run(
        """
        import pandas as pd

        @transformer
        def join(df, both, **kwargs):
            return {"df": isinstance(df, pd.DataFrame), "rows": len(df), "both": both}
        """,
        inputs=[frame, pair],
    )

    assert result.status == "completed", result.error
    assert stored(result) == [{"df": True, "rows": 2, "both": ["left", "right"]}]


# Arity


def test_fewer_positional_parameters_than_inputs_fails_naming_the_function():
    result, _ = run(
        "@transformer\ndef combine_sales(only_one, **kwargs):\n    return 1\n",
        inputs=[upstream("a", 1), upstream("b", 2)],
    )

    assert result.status == "failed"
    assert "combine_sales()" in result.error
    assert "takes 1 positional argument but receives 2" in result.error
    assert result.outputs == []


def test_more_required_parameters_than_inputs_fails_naming_the_missing_ones():
    result, _ = run(
        "@transformer\ndef combine_sales(a, b, lookup, **kwargs):\n    return 1\n",
        inputs=[upstream("a", 1), upstream("b", 2)],
    )

    assert result.status == "failed"
    assert "combine_sales() requires 3 positional arguments but receives 2" in result.error
    assert "lookup" in result.error


# Mage compatibility


def test_the_mage_import_guard_works_when_the_decorators_are_injected():
    result, _ = run(
        """
        if 'data_loader' not in globals():
            from mage_ai.data_preparation.decorators import data_loader
        if 'test' not in globals():
            from mage_ai.data_preparation.decorators import test


        @data_loader
        def load_data(*args, **kwargs):
            return {"rows": 3}


        @test
        def test_output(output, *args) -> None:
            assert output == {"rows": 3}
        """,
        block_type="data_loader",
    )

    assert result.status == "completed", result.error
    assert stored(result) == [{"rows": 3}]


def test_the_mage_import_path_resolves_to_our_decorators():
    result, _ = run(
        """
        from mage_ai.data_preparation.decorators import transformer
        import mage_ai.data_preparation.decorators as mage_decorators
        import pipelines.decorators


        @transformer
        def shape(*args, **kwargs):
            return {"ours": mage_decorators is pipelines.decorators}
        """,
        block_type="custom",
    )

    assert result.status == "completed", result.error
    assert stored(result) == [{"ours": True}]


def test_the_mage_guard_imports_when_the_name_is_not_injected():
    result, _ = run(
        """
        globals().pop('data_loader', None)
        if 'data_loader' not in globals():
            from mage_ai.data_preparation.decorators import data_loader


        @data_loader
        def load_data(*args, **kwargs):
            return "imported"
        """,
        block_type="data_loader",
    )

    assert result.status == "completed", result.error
    assert stored(result) == ["imported"]


def test_a_block_without_a_decorated_function_fails_clearly():
    result, _ = run("def load_data(*args, **kwargs):\n    return 1\n", block_type="data_loader", uuid="orders")

    assert result.status == "failed"
    assert result.error == "Block 'orders' defines no function decorated with @data_loader"
    assert result.traceback == ""


# Failures


def test_an_exception_fails_with_the_users_traceback_only():
    code = textwrap.dedent(
        """
        @transformer
        def clean(*args, **kwargs):
            rows = [1, 2, 3]
            return helper(rows)


        def helper(rows):
            raise ValueError(f"bad rows: {len(rows)}")
        """
    )
    line_of = {text.strip(): n for n, text in enumerate(code.splitlines(), start=1)}

    result, _ = run(code, uuid="clean")

    assert result.status == "failed"
    assert result.error == "ValueError: bad rows: 3"
    trace = result.traceback
    assert trace.startswith("Traceback (most recent call last):")
    raise_line = line_of['raise ValueError(f"bad rows: {len(rows)}")']
    assert f'File "{PIPELINE}/transformer/clean.py", line {line_of["return helper(rows)"]}, in clean' in trace
    assert f'File "{PIPELINE}/transformer/clean.py", line {raise_line}, in helper' in trace
    assert 'raise ValueError(f"bad rows: {len(rows)}")' in trace
    assert "pipelines/execution" not in trace and "python.py" not in trace
    assert trace.rstrip().endswith("ValueError: bad rows: 3")


def test_the_child_runs_the_code_the_caller_compiled():
    # The caller compiles once and the child loads that code instead of compiling the
    # source: a spec whose compiled code differs from its text runs the compiled code.
    spec = BlockSpec(
        pipeline_uuid=PIPELINE, block_uuid="twice", block_type="data_loader", language="python",
        content="@data_loader\ndef load(*args, **kwargs):\n    return 1\n", output_prefix="runs/1/twice",
    )
    spec.code = compiled("@data_loader\ndef load(*args, **kwargs):\n    return 2\n", block_filename(spec))

    result = run_block(spec, on_log=lambda lines: None)

    assert result.status == "completed"
    assert stored(result) == [2]


def test_compiled_code_is_made_once_per_text_and_keeps_the_blocks_file_name():
    code = marshal.loads(compiled("x = 1\n", "p/transformer/b.py"))

    assert code.co_filename == "p/transformer/b.py"
    assert compiled("x = 1\n", "p/transformer/b.py") is compiled("x = 1\n", "p/transformer/b.py")
    assert compiled("def broken(:\n", "p/transformer/b.py") is None


def test_a_syntax_error_at_run_time_fails_the_block_naming_the_line():
    # Blocks are checked on save, but a file edited on disk reaches the executor as it is.
    result, _ = run("x = 1\n\ndef broken(:\n    return x\n", uuid="broken")

    assert result.status == "failed"
    assert result.error.startswith("SyntaxError: ")
    assert "line 3" in result.error


def test_an_error_at_module_level_points_at_the_users_line():
    result, _ = run("x = 1\nimport no_such_module_here\n", uuid="imports")

    assert result.status == "failed"
    assert "ModuleNotFoundError" in result.error
    assert f'File "{PIPELINE}/transformer/imports.py", line 2, in <module>' in result.traceback
    assert "pipelines/execution" not in result.traceback


def test_a_block_that_loops_forever_is_killed_at_its_timeout():
    started = time.monotonic()
    result, _ = run("while True:\n    pass\n", timeout=1)
    elapsed = time.monotonic() - started

    assert elapsed < 5
    assert result.status == "failed"
    assert "Timed out after 1 s" in result.error


def test_on_tick_returning_false_cancels_the_block_and_its_subprocesses():
    # The sleeps are bounded so that a broken kill fails this test instead of hanging it.
    logs: list[LogLine] = []

    def keep_going() -> bool:
        return not any("grandchild=" in line.message for line in logs)

    started = time.monotonic()
    result, _ = run(
        """
        import subprocess, time

        @custom
        def run(*args, **kwargs):
            child = subprocess.Popen(["sleep", "20"])
            print(f"grandchild={child.pid}")
            time.sleep(30)
        """,
        block_type="custom", on_tick=keep_going, tick=0.05, logs=logs,
    )
    elapsed = time.monotonic() - started
    pid = pid_from(logs, "grandchild")
    try:
        assert result.status == "cancelled"
        assert "Cancelled" in result.error
        assert elapsed < 5
        assert is_gone(pid), f"the block's subprocess {pid} still runs"
    finally:
        kill_if_running(pid)


def test_a_block_that_returns_while_its_subprocess_runs_is_not_held_up_by_it():
    started = time.monotonic()
    result, logs = run(
        """
        import subprocess

        @custom
        def run(*args, **kwargs):
            child = subprocess.Popen(["sleep", "20"])
            print(f"grandchild={child.pid}")
            return "done"
        """,
        block_type="custom",
    )
    elapsed = time.monotonic() - started
    pid = pid_from(logs, "grandchild")
    try:
        assert result.status == "completed", result.error
        assert stored(result) == ["done"]
        assert elapsed < 5
        assert is_gone(pid)
    finally:
        kill_if_running(pid)


def test_a_subprocess_in_its_own_session_does_not_hold_the_run_open():
    # A daemon that left the block's process group but kept its stdout: the block has
    # returned, so the run must end without waiting for the daemon.
    started = time.monotonic()
    result, logs = run(
        """
        import subprocess

        @custom
        def run(*args, **kwargs):
            child = subprocess.Popen(["sleep", "3"], start_new_session=True)
            print(f"daemon={child.pid}")
            return "done"
        """,
        block_type="custom",
    )
    elapsed = time.monotonic() - started
    kill_if_running(pid_from(logs, "daemon"))

    assert result.status == "completed", result.error
    assert elapsed < 2, f"run_block returned after {elapsed:.1f} s"


def _after_a_crash_the_caller_still_runs_blocks() -> None:
    result, _ = run("@data_loader\ndef load(*args, **kwargs):\n    return 'still fine'\n", block_type="data_loader", uuid="after")
    assert result.status == "completed", result.error
    assert stored(result) == ["still fine"]


def test_os_exit_fails_the_block_with_its_exit_code_and_the_caller_carries_on():
    result, _ = run("import os\n\n@custom\ndef run(*args, **kwargs):\n    os._exit(3)\n", block_type="custom")

    assert result.status == "failed"
    assert "exited with code 3" in result.error
    _after_a_crash_the_caller_still_runs_blocks()


def test_a_segfault_fails_the_block_naming_sigsegv_and_the_caller_carries_on():
    result, _ = run(
        "import ctypes\n\n@custom\ndef run(*args, **kwargs):\n    ctypes.string_at(0)\n",
        block_type="custom",
    )

    assert result.status == "failed"
    assert "SIGSEGV" in result.error
    _after_a_crash_the_caller_still_runs_blocks()


@pytest.mark.django_db
def test_the_callers_database_connection_survives_a_block_run():
    from pipelines.models import Pipeline

    Pipeline.objects.create(uuid="before", name="before")

    result, _ = run("import os\n\n@custom\ndef run(*args, **kwargs):\n    os._exit(1)\n", block_type="custom")
    assert result.status == "failed"

    Pipeline.objects.create(uuid="after", name="after")
    assert sorted(Pipeline.objects.values_list("uuid", flat=True)) == ["after", "before"]


# Tests, conditions, sensors


def test_a_failing_test_function_fails_the_block_run_and_stores_nothing(data_dir: Path):
    result, _ = run(
        """
        @data_loader
        def load(*args, **kwargs):
            return {"rows": 0}


        @test
        def test_has_rows(output, *args) -> None:
            assert output["rows"] > 0, "no rows were loaded"
        """,
        block_type="data_loader", uuid="orders",
    )

    assert result.status == "failed"
    assert result.error == "AssertionError: no rows were loaded"
    assert "in test_has_rows" in result.traceback
    assert result.outputs == []
    assert not list((data_dir / "runs/1/orders").glob("*"))


@pytest.mark.parametrize(("env", "status"), [("dev", "condition_failed"), ("prod", "completed")])
def test_a_condition_decides_whether_the_block_runs(env, status):
    result, logs = run(
        """
        @condition
        def only_in_prod(*args, **kwargs):
            return kwargs["env"] == "prod"


        @transformer
        def transform(*args, **kwargs):
            print("MAIN RAN")
            return 1
        """,
        kwargs={"env": env},
    )

    assert result.status == status, result.error
    assert ("MAIN RAN" in messages(logs)) is (status == "completed")
    assert len(result.outputs) == (1 if status == "completed" else 0)
    if status == "condition_failed":
        assert "only_in_prod()" in result.error


def test_a_sensor_polls_until_it_returns_true(tmp_path: Path):
    state = tmp_path / "polls.txt"

    result, logs = run(
        f"""
        from pathlib import Path

        STATE = Path({str(state)!r})


        @sensor
        def wait_for_upload(*args, **kwargs):
            polls = int(STATE.read_text()) + 1 if STATE.exists() else 1
            STATE.write_text(str(polls))
            return polls >= 2
        """,
        block_type="sensor", configuration={"poke_interval": 0.1}, timeout=10,
    )

    assert result.status == "completed", result.error
    assert state.read_text() == "2"
    assert "Sensor condition met after 2 polls" in messages(logs)


def test_a_sensor_that_never_succeeds_times_out_with_a_clear_error():
    started = time.monotonic()
    result, _ = run(
        "@sensor\ndef wait_for_upload(*args, **kwargs):\n    return False\n",
        block_type="sensor", configuration={"poke_interval": 0.1, "timeout": 0.5}, timeout=10,
    )

    assert time.monotonic() - started < 5
    assert result.status == "failed"
    assert "Sensor condition not met within 0.5 s" in result.error

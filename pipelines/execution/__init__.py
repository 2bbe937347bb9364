"""Running one block's code: `run_block` forks a child process and runs it there."""

from __future__ import annotations

import logging
from typing import Any

# Imported here, in the parent, so that each forked child finds them loaded instead of
# importing them again (which would cost more than the fork itself).
from pipelines import variables
from pipelines.execution import python
from pipelines.execution.process import LogSink, Session, Tick, run_in_child, start_server
from pipelines.execution.spec import (
    FAILED,
    INTERRUPTED,
    BlockSpec,
    ExecutionResult,
    LogChunk,
    LogLine,
    UpstreamInput,
    log_lines,
)

__all__ = [
    "INTERRUPTED", "BlockSpec", "ExecutionResult", "LogChunk", "LogLine", "UpstreamInput", "log_lines", "run_block",
    "prepare", "LogSink", "Session", "Tick",
]


def _dispatch(spec: BlockSpec, logger: logging.Logger, context: dict[str, Any]) -> ExecutionResult:
    if spec.language == "python":
        return python.execute(spec, logger, context)
    return ExecutionResult(status=FAILED, error=f"Blocks in {spec.language!r} cannot be run yet")


def run_block(
    spec: BlockSpec, *, on_log: LogSink, on_tick: Tick | None = None, tick: float = 2.0, session: Session | None = None,
) -> ExecutionResult:
    """Run a block in a child process of its own, or in the `session`'s process, which
    runs the blocks given to it one after another."""
    if not spec.data_dir:
        spec.data_dir = str(variables.root())
    if spec.language == "python" and spec.code is None:
        spec.code = python.compiled(spec.content, python.block_filename(spec))
    if session is not None:
        return session.run(spec, _dispatch, on_log=on_log, on_tick=on_tick, tick=tick)
    return run_in_child(spec, _dispatch, on_log=on_log, on_tick=on_tick, tick=tick)



def prepare() -> None:
    """Start the process that forks block children, ahead of the first block."""
    start_server(_dispatch)

"""What the executor is given and what it gives back. Plain data: the runs app builds a
BlockSpec from its rows, the executor never reads the database."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, NamedTuple

COMPLETED = "completed"
FAILED = "failed"
CONDITION_FAILED = "condition_failed"
CANCELLED = "cancelled"
# The block was stopped because its worker is shutting down: not a failure of the
# block, which the orchestrator hands back to run again.
INTERRUPTED = "interrupted"


@dataclass
class UpstreamInput:
    block_uuid: str
    outputs: list[dict]  # metas from the variable store, in output order


@dataclass
class BlockSpec:
    pipeline_uuid: str
    block_uuid: str
    block_type: str
    language: str
    content: str
    configuration: dict = field(default_factory=dict)
    inputs: list[UpstreamInput] = field(default_factory=list)
    # Everything a block finds in kwargs except `logger` and `context`, JSON-able.
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Variable-store prefix under which this attempt writes its outputs.
    output_prefix: str = ""
    timeout: float | None = None
    # The variable store's root, given here rather than read from settings in the child:
    # the fork server it comes from may have started before the settings changed.
    data_dir: str = ""
    # The environment the block sees; None: the caller's at the time of the call (a
    # long-lived fork server would otherwise hand out its own, older one).
    environ: dict[str, str] | None = None
    # The Python block's code compiled by the caller (marshal format, for this same
    # interpreter), or None: the child then compiles `content` itself.
    code: bytes | None = None
    # Set by a `Session`: the child waits for another block after this one.
    keep_alive: bool = False
    # Mage's cache_block_output_in_memory, in a run in one process: outputs stay in the
    # process's memory for the blocks below, even those the store cannot write.
    outputs_in_memory: bool = False
    # The most memory (MB) the block's process may hold (RLIMIT_DATA); None: no limit.
    memory_limit_mb: int | None = None


class LogLine(NamedTuple):
    timestamp: float
    level: str
    message: str


@dataclass(frozen=True, slots=True)
class LogChunk:
    """Lines of stdout or stderr read together (`count` of them, separated by newlines in
    `text`), which share a time and a level. The supervisor hands output on in chunks: a
    block may print a million lines, and making an object of each line was most of what
    keeping up with it cost. (Not a NamedTuple: its `count` would hide tuple.count.)"""

    timestamp: float
    level: str
    text: str
    count: int

    def lines(self) -> list[LogLine]:
        # tuple.__new__ through map: no Python call per line.
        return list(map(tuple.__new__, repeat(LogLine), zip(repeat(self.timestamp), repeat(self.level), self.text.split("\n"))))


def log_lines(items: Iterable[LogLine | LogChunk]) -> list[LogLine]:
    """What a log sink was given, line by line."""
    out: list[LogLine] = []
    for item in items:
        if isinstance(item, LogChunk):
            out.extend(item.lines())
        else:
            out.append(item)
    return out


@dataclass
class ExecutionResult:
    status: str
    outputs: list[dict] = field(default_factory=list)
    error: str = ""
    traceback: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

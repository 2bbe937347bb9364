"""The statements every block of every run goes through, written out by hand: for these
one-row statements the ORM spends several times longer building the SQL than the
database spends running it, and a chain of blocks is a loop over them (README,
"Performance"). Values go through the fields' own adapters, so both databases get what
the ORM would send. Rows come back as small named types (`RunRow`, `BlockState`)."""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, connections, models

from pipelines.execution import ExecutionResult, LogLine
from pipelines.models import Pipeline
from runs.models import (
    BlockRun,
    BlockRunStatus,
    LogEntry,
    PipelineRun,
    PipelineRunStatus,
)
from runs.orchestrator.decide import BlockState

S = BlockRunStatus


# The environment variable that names the worker cluster a process belongs to (set by
# `manage.py qcluster` before it starts its processes).
CLUSTER_ENV = "MILLRACE_CLUSTER"

_label: tuple[int, str] | None = None  # (pid, label): computed once per process


def worker_label() -> str:
    """Who runs a block run, stored with its claim: host and process, and `@cluster`
    when the process belongs to a worker cluster (see `runs.cluster`)."""
    global _label
    pid = os.getpid()
    if _label is None or _label[0] != pid:
        cluster = os.environ.get(CLUSTER_ENV)
        _label = (pid, f"{socket.gethostname()}:{pid}" + (f"@{cluster}" if cluster else ""))
    return _label[1]


_BR = BlockRun._meta.db_table


def _db_time(value: datetime) -> Any:
    return connection.ops.adapt_datetimefield_value(value)


_JSON_FIELDS = {name: cast(models.JSONField, BlockRun._meta.get_field(name)) for name in ("outputs", "metrics")}


def _db_json(field: str, value: Any) -> Any:
    return _JSON_FIELDS[field].get_db_prep_save(value, connection)


def _prepared(*statements: tuple[str, str]) -> list[str]:
    """The statements `(name, sql with %s placeholders)` as this connection should run
    them: on PostgreSQL, prepared once per connection and executed by name. Client-side
    binding, which Django uses, has the server plan every query afresh, and for these
    small statements planning costs about as much as running them. Off
    with MILLRACE_PREPARED_STATEMENTS=false (behind a pooler that hands each transaction
    another server connection, a prepared statement would not be there)."""
    db = connections[DEFAULT_DB_ALIAS]  # looked up once: `connection` is a proxy
    if db.vendor != "postgresql" or not settings.MILLRACE_PREPARED_STATEMENTS:
        return [sql for _, sql in statements]
    db.ensure_connection()
    done: tuple[Any, set[str]] | None = db.__dict__.get("_millrace_prepared")
    if done is None or done[0] is not db.connection:
        done = db.__dict__["_millrace_prepared"] = (db.connection, set())
    for name, sql in statements:
        if name not in done[1]:
            parts = sql.split("%s")  # placeholders become $1, $2, ...
            numbered = "".join(f"{part}${i}" for i, part in enumerate(parts[:-1], 1)) + parts[-1]
            with db.cursor() as cursor:
                # Prepared statements outlive a rolled-back transaction: once is enough.
                cursor.execute(f"PREPARE {name} AS {numbered}")
            done[1].add(name)
    return [_execute_text(name, sql) for name, sql in statements]


@functools.cache
def _execute_text(name: str, sql: str) -> str:
    count = sql.count("%s")
    return f"EXECUTE {name}({', '.join(['%s'] * count)})" if count else f"EXECUTE {name}"


_CONCURRENCY = Pipeline._meta.get_field("concurrency_config")
_REFRESH_RUN_SQL = (
    f"SELECT r.status, r.waiting_for_slot, r.waiting_for_run_slot, r.started_at IS NULL, "
    f"p.version, p.concurrency_config "
    f"FROM {PipelineRun._meta.db_table} r JOIN {Pipeline._meta.db_table} p ON p.id = r.pipeline_id WHERE r.id = %s"
)


class RunRow(NamedTuple):
    """What can have changed in a run (and its pipeline) since a worker loaded it."""

    status: str
    waiting_for_slot: bool
    waiting_for_run_slot: bool
    not_started: bool
    version: int
    concurrency_config: Any  # as the database returns it

    @classmethod
    def of(cls, row: tuple[Any, ...] | None) -> RunRow | None:
        if row is None:
            return None
        status, slot, run_slot, not_started, version, concurrency = row
        return cls(status, bool(slot), bool(run_slot), bool(not_started), version, concurrency)


def _refresh_run_sql() -> str:
    # Locks the run's row only, as `select_for_update(of=("self",))` does; SQLite has
    # one writer at a time anyway.
    return _REFRESH_RUN_SQL + (" FOR UPDATE OF r" if connection.features.has_select_for_update else "")


def read_run_row(run_id: int) -> RunRow | None:
    """Lock a run's row and read what can have changed since it was loaded."""
    with connection.cursor() as cursor:
        cursor.execute(_refresh_run_sql(), [run_id])
        return RunRow.of(cursor.fetchone())


def run_refreshed(known: PipelineRun, row: RunRow | None) -> PipelineRun | None:
    """`known` (a run loaded with its pipeline) updated from `row`; None when the row is
    missing or the run was started by someone else since it was loaded (then the
    caller loads it whole)."""
    if row is None or (not row.not_started and known.started_at is None):
        return None
    known.status, known.waiting_for_slot, known.waiting_for_run_slot = row.status, row.waiting_for_slot, row.waiting_for_run_slot
    known.started_at = None if row.not_started else known.started_at
    known.pipeline.version = row.version
    # The stub wants an expression; JSONField.from_db_value never reads it.
    known.pipeline.concurrency_config = _CONCURRENCY.from_db_value(row.concurrency_config, None, connection)  # type: ignore[arg-type]
    return known


_STATUSES_SQL = (
    f"SELECT id, block_uuid, status, attempt, (next_retry_at IS NOT NULL AND next_retry_at > %s) "
    f"FROM {_BR} WHERE pipeline_run_id = %s AND dynamic_parent_id IS NULL"
)


def block_states(run_id: int, now: datetime) -> list[BlockState]:
    """A run's block runs (not dynamic children) as `decide` reads them."""
    with connection.cursor() as cursor:
        cursor.execute(_STATUSES_SQL, [_db_time(now), run_id])
        return _block_states(cursor.fetchall())


def _block_states(rows: list[tuple[Any, ...]]) -> list[BlockState]:
    return [BlockState(pk, uuid, st, attempt, bool(waits)) for pk, uuid, st, attempt, waits in rows]


# What claiming sets: the block run is `running` under a new claim token (fencing).
_CLAIM_SET = (
    "status = %s, claim = %s, attempt = attempt + 1, started_at = %s, heartbeat_at = %s, completed_at = NULL, "
    "next_retry_at = NULL, worker = %s, error = '', traceback = '', updated_at = %s"
)


def _claim_params(claim: str, ts: Any) -> list[Any]:
    return [S.RUNNING, claim, ts, ts, worker_label(), ts]


def claim_block_run(block_run_id: int, claim: str, now: datetime, *, from_status: str = S.QUEUED) -> bool:
    """Compare-and-swap a block run to `running` under a new claim token (fencing)."""
    ts = _db_time(now)
    queued_at = ", queued_at = %s" if from_status == S.INITIAL else ""
    params = _claim_params(claim, ts) + ([ts] if queued_at else []) + [block_run_id, from_status]
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {_BR} SET {_CLAIM_SET}{queued_at} WHERE id = %s AND status = %s", params)
        return cursor.rowcount == 1


_RECORD_SQL = (
    f"UPDATE {_BR} SET status = %s, completed_at = %s, outputs = %s, error = %s, traceback = %s, "
    "metrics = %s, code_hash = %s, updated_at = %s WHERE id = %s AND claim = %s AND status = %s"
)


def _record_params(block_run_id: int, claim: str, status: str, result: ExecutionResult, code_hash: str, now: datetime) -> list[Any]:
    ts = _db_time(now)
    return [
        status, ts, _db_json("outputs", result.outputs), result.error[:10000], result.traceback,
        _db_json("metrics", result.metrics), code_hash, ts, block_run_id, claim, S.RUNNING,
    ]


def record_result(block_run_id: int, claim: str, status: str, result: ExecutionResult, code_hash: str, now: datetime) -> bool:
    """Write an attempt's result, if the attempt still holds its claim (fencing)."""
    with connection.cursor() as cursor:
        cursor.execute(_RECORD_SQL, _record_params(block_run_id, claim, status, result, code_hash, now))
        return cursor.rowcount == 1


class ChainClaim(NamedTuple):
    """The block to claim with a finished block's result (`decide.chain_candidate`),
    under a new claim token, if the pipeline is still at `version`."""

    block_uuid: str
    claim: str
    version: int


@dataclass
class RunRead:
    """What `record_result_and_read` read for the advance that follows: the run's row,
    its block runs, and the next block of a chain if the same query claimed it."""

    run: RunRow | None
    blocks: list[BlockState]
    chained: ChainClaim | None = None


# Claims the next block of a chain in the query that records the result of the block
# above, on the conditions on which `advance` would claim it (`decide`): that result
# recorded as completed; the run running, on the definition the caller read the chain
# from, with no per-run block limit (`decide.chain_candidate`) and no block waiting for
# a global slot (which gets the freed slot first: `decide.admit` would count it); the
# block not waiting for a retry (`decide.plan`). The global limit needs no count: the
# finished block frees the slot. tests/runs/test_decide_property.py checks that this
# statement and `advance` decide alike.
_CHAIN_CLAIM_SQL = (
    f"UPDATE {_BR} SET {_CLAIM_SET}, queued_at = %s "
    "WHERE pipeline_run_id = %s AND block_uuid = %s AND dynamic_parent_id IS NULL AND status = %s "
    "AND (next_retry_at IS NULL OR next_retry_at <= %s) "
    f"AND EXISTS (SELECT 1 FROM {_BR} f WHERE f.id = %s AND f.claim = %s AND f.status = %s) "
    f"AND EXISTS (SELECT 1 FROM {PipelineRun._meta.db_table} r JOIN {Pipeline._meta.db_table} p ON p.id = r.pipeline_id "
    "WHERE r.id = %s AND r.status = %s AND NOT r.waiting_for_slot AND p.version = %s "
    "AND COALESCE(p.concurrency_config -> 'block_run_limit', 'null') IN ('null', '0'))"
)


def record_result_and_read(
    block_run_id: int, claim: str, status: str, result: ExecutionResult, code_hash: str, now: datetime, run_id: int,
    chain: ChainClaim | None = None,
) -> tuple[bool, RunRead]:
    """Lock the run, `record_result`, claim the next block of a chain (`chain`), and
    read what `advance` needs, all in one round trip to PostgreSQL (one query of
    several statements): each round trip costs the chain a wake-up of the database
    server and of this process. If the result was not recorded (the claim was lost),
    the caller ends the transaction and the lock goes with it."""
    ts = _db_time(now)
    statements = [("millrace_lock_run", _refresh_run_sql()), ("millrace_record", _RECORD_SQL)]
    params = [run_id, *_record_params(block_run_id, claim, status, result, code_hash, now)]
    if chain is not None:
        statements.append(("millrace_chain_claim", _CHAIN_CLAIM_SQL))
        params += [
            *_claim_params(chain.claim, ts), ts, run_id, chain.block_uuid, S.INITIAL, ts,
            block_run_id, claim, S.COMPLETED, run_id, PipelineRunStatus.RUNNING, chain.version,
        ]
    statements.append(("millrace_statuses", _STATUSES_SQL))
    params += [ts, run_id]
    with connection.cursor() as cursor:
        # One result per statement, in the order above.
        cursor.execute("; ".join(_prepared(*statements)), params)
        run_row = RunRow.of(cursor.fetchone())
        cursor.nextset()
        won = cursor.rowcount == 1
        chained = None
        if chain is not None:
            cursor.nextset()
            chained = chain if cursor.rowcount == 1 else None
        cursor.nextset()
        return won, RunRead(run_row, _block_states(cursor.fetchall()), chained)


def lock_run_row(run_id: int, *, share: bool = False) -> None:
    """Lock a run's row to the end of the transaction, or with `share` only against a
    change of its key (what adding a row that references it takes anyway, at commit).
    Nothing to do on SQLite, which has one writer at a time."""
    if connection.features.has_select_for_update:
        mode = "KEY SHARE" if share else "UPDATE"
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT id FROM {PipelineRun._meta.db_table} WHERE id = %s FOR {mode}", [run_id])


def log_row(
    run_id: int, block_run_id: int | None, ts: datetime, level: str, message: str,
    block_uuid: str = "", block_type: str = "", attempt: int = 0,
) -> LogEntry:
    return LogEntry(
        pipeline_run_id=run_id, block_run_id=block_run_id, timestamp=ts, level=level[:10],
        message=message, block_uuid=block_uuid, block_type=block_type, attempt=attempt,
    )


_LOG_COLUMNS = "(pipeline_run_id, block_run_id, timestamp, level, message, block_uuid, block_type, attempt)"
_LOG_INSERT_SQL = f"INSERT INTO {LogEntry._meta.db_table} {_LOG_COLUMNS} VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
_LOG_COPY_SQL = f"COPY {LogEntry._meta.db_table} {_LOG_COLUMNS} FROM STDIN"
_COPY_FROM = 50  # rows: fewer go in one INSERT


@functools.cache
def _log_insert_sql(rows: int) -> str:
    values = ", ".join(["(%s, %s, %s, %s, %s, %s, %s, %s)"] * rows)
    return f"INSERT INTO {LogEntry._meta.db_table} {_LOG_COLUMNS} VALUES {values}"


def insert_log_lines(
    run_id: int, block_run_id: int, block_uuid: str, block_type: str, attempt: int, lines: list[LogLine],
) -> None:
    """Insert a block run's log lines by the fastest way each database has: COPY on
    PostgreSQL (one INSERT for a few lines), one statement run for every row on SQLite. A model object per
    line cost the worker more than the database spent on the rows (0.35 s for 5,000
    lines, while the block waited on its full pipe), and long multi-row INSERTs spent
    most of their time in psycopg parsing their own text."""
    stamps: dict[float, Any] = {}
    rows = []
    for line in lines:
        ts = stamps.get(line.timestamp)
        if ts is None:  # lines read together share their timestamp
            ts = stamps[line.timestamp] = datetime.fromtimestamp(line.timestamp, tz=UTC)
        rows.append((run_id, block_run_id, ts, line.level[:10], _storable(line.message), block_uuid, block_type, attempt))
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql" and len(rows) > _COPY_FROM:
            with cursor.cursor.copy(_LOG_COPY_SQL) as copy:
                for row in rows:
                    copy.write_row(row)
        elif connection.vendor == "postgresql":
            # A few lines (most blocks'): one statement, one round trip (COPY takes two).
            cursor.execute(_log_insert_sql(len(rows)), [value for row in rows for value in row])
        else:
            adapt = connection.ops.adapt_datetimefield_value
            cursor.executemany(_LOG_INSERT_SQL, [(*row[:2], adapt(row[2]), *row[3:]) for row in rows])


def _storable(text: str) -> str:
    """`text` as a text column holds it: PostgreSQL refuses NUL characters, and a lone
    surrogate (which a block's logger can send) is not text either."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text

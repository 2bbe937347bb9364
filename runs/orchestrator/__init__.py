"""The run state machine: the one place where run and block-run statuses change.

1. Create: `run_create` makes a run with one block run per executable block (`initial`).
2. Decide: `decide` is the one rule for what may start now (ready blocks, limits,
   retries not yet due, the next block of a chain, the run's final status). It reads no
   database; everything below writes what it decides.
3. Advance: `advance` moves a run forward (see its docstring); `runs_start` starts many
   fresh runs at once with the same decision.
4. Execute: `block_run_execute` claims a queued block run, runs its code in a child
   process, and `finish` records the result and advances the run in the same
   transaction, so no polling gap separates one block from the next.
5. Reconcile: `reconcile` repairs what a dead worker or a dead worker cluster left
   behind (`cluster_recover` also hands back what a cluster's forced stop left).
6. Every periodic pass handles each row in a savepoint of its own (`isolated`); a row
   it cannot handle is failed on that row (`salvage`) and the pass goes on.

Every transition is a compare-and-swap (`filter(status=...).update(...)`) so that two
workers, or a worker and a cancel, can never both win.

Row locks on PostgreSQL are always taken in one order: a run, then its block runs, then
its pipeline. A transaction that changes a block run locks (or, to add log rows,
share-locks) its run first; the other order deadlocks with a cancel.

The package: `decide` (what may start, pure), `create` (new runs), `advance` (writing
what `decide` decides, and sending queued block runs to the workers), `execute` (a
block run from claim to result), `logs` (its log lines, capped), `retries` (and
hand-backs), `operations` (stop, retry and cancel), `reconcile`, `isolate` and
`salvage` (one row at a time), and `sql` (the hand-written statements of the hot path).
The modules use each other's public names; code outside the package uses only the
names below (an import-linter contract holds it to that).
"""

from runs.orchestrator.advance import Advanced, Claimed, advance, dispatch, start_waiting_runs
from runs.orchestrator.create import run_create, runs_start
from runs.orchestrator.execute import Report, block_run_execute, finish
from runs.orchestrator.isolate import isolated
from runs.orchestrator.logs import LogWriter
from runs.orchestrator.operations import (
    RETRY_MODES,
    ActionRefused,
    block_run_cancel,
    enforce_deadlines,
    run_cancel,
    run_retry,
    run_stop,
)
from runs.orchestrator.reconcile import cluster_recover, reconcile
from runs.orchestrator.retries import (
    RetryPolicy,
    retries_due,
    retry_delay,
    retry_policy,
    wake_waiting_runs,
)
from runs.orchestrator.sql import CLUSTER_ENV, ChainClaim, record_result_and_read, worker_label

__all__ = [
    "CLUSTER_ENV", "RETRY_MODES", "ActionRefused", "Advanced", "ChainClaim", "Claimed", "LogWriter", "Report", "RetryPolicy",
    "advance", "block_run_cancel", "block_run_execute", "cluster_recover", "dispatch", "enforce_deadlines", "finish",
    "isolated", "reconcile", "record_result_and_read", "retries_due", "retry_delay", "retry_policy", "run_cancel",
    "run_create", "run_retry", "run_stop", "runs_start", "start_waiting_runs", "wake_waiting_runs", "worker_label",
]

"""Builders shared by the test suites."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from django.db import connection

from pipelines import services
from pipelines.models import Pipeline

ROOT = Path(__file__).resolve().parent.parent


def block_code(kind: str, body: str, params: str = "*args, **kwargs") -> str:
    lines = body.strip("\n").splitlines()
    indented = "\n".join("    " + line for line in lines)
    return f"@{kind}\ndef run({params}):\n{indented}\n"



def user_in(name: str, group: str | None = None, **flags):
    """A user with password "pw", in `group` ("editors", "viewers") if given."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group

    user = get_user_model().objects.create_user(name, password="pw", **flags)
    if group:
        user.groups.add(Group.objects.get_or_create(name=group)[0])
    return user


def api_client(user):
    """A DRF test client logged in as `user`."""
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(user)
    return client


def write_files(root: Path, files: dict[str, str | bytes]) -> None:
    """Write `files` ({path relative to root: text or bytes}) under `root` (a Mage
    project, say), making folders as needed."""
    for relpath, content in files.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)


def make_pipeline(uuid: str, blocks: Iterable[Sequence], **fields) -> Pipeline:
    """blocks: (uuid, type, code[, [upstream uuids]]) in creation order."""
    pipeline = services.pipeline_create(uuid=uuid, **fields)
    for spec in blocks:
        uuid_, type_, code = spec[:3]
        ups = spec[3] if len(spec) > 3 else []
        extra = spec[4] if len(spec) > 4 else {}
        services.block_create(pipeline=pipeline, uuid=uuid_, type=type_, content=code, upstream_blocks=ups, **extra)
    return pipeline


def orders_pipeline() -> Pipeline:
    """A two-block pipeline with variables, as the API tests use it."""
    return make_pipeline(
        "orders",
        [
            ("load", "data_loader", block_code("data_loader", "return 1")),
            ("clean", "transformer", block_code("transformer", "return 2"), ["load"]),
        ],
        variables={"region": "eu", "limit": 10},
    )


def webhook_trigger(pipeline: Pipeline):
    """An active API trigger of `pipeline` with variables of its own."""
    from triggers import services as trigger_services

    return trigger_services.trigger_create(
        pipeline=pipeline, name="webhook", schedule_type="api", status="active", variables={"limit": 20},
    )


def chain(uuid: str, n: int, body: str = "return 1") -> Pipeline:
    blocks = []
    for i in range(n):
        kind = "data_loader" if i == 0 else "transformer"
        blocks.append((f"b{i:03d}", kind, block_code(kind, body), [f"b{i - 1:03d}"] if i else []))
    return make_pipeline(uuid, blocks)


def database_url() -> str:
    """A URL for the database the test is using, for child processes (workers)."""
    s = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{s['NAME']}"
    user = s.get("USER") or "postgres"
    host = s.get("HOST") or "127.0.0.1"
    port = s.get("PORT") or 5432
    return f"postgres://{user}@{host}:{port}/{s['NAME']}"


class WorkerCluster:
    """A real `manage.py qcluster` on the test database. Its output is read as it comes
    (a worker logs a line per block run, and a full pipe would stop it)."""

    def __init__(self, data_dir: Path, workers: int = 2, env: dict | None = None):
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url(),
            "MILLRACE_DATA_DIR": str(data_dir),
            "MILLRACE_WORKERS": str(workers),
            "MILLRACE_BROKER_POLL": "0.05",
            # A stop at the end of a test hands back what still runs at once.
            "MILLRACE_SHUTDOWN_GRACE": "1",
            **(env or {}),
        }
        self.proc: subprocess.Popen | None = None
        self._output: list[bytes] = []
        self._reader: threading.Thread | None = None

    def start(self) -> WorkerCluster:
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "qcluster"], cwd=ROOT, env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            self._output.append(line)

    @property
    def output(self) -> str:
        return b"".join(self._output).decode(errors="replace")

    def signal_group(self, sig: int, timeout: float = 60) -> tuple[float, int | None]:
        """Send `sig` to the cluster's whole process group, as systemd, honcho and a
        terminal's Ctrl-C do; returns (seconds until its main process exited, its exit
        code, None if it had not exited within `timeout`)."""
        assert self.proc is not None
        started = time.monotonic()
        os.killpg(self.proc.pid, sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - started
        if self._reader is not None:
            self._reader.join(timeout=5)
        return took, code

    def stop(self) -> str:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.signal_group(signal.SIGTERM, timeout=15)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left behind
        except ProcessLookupError:
            pass
        self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        return self.output


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


# --- processes: finding, killing and outliving workers and blocks --------------------------

def worker_pid(label: str) -> int:
    """The pid in a `BlockRun.worker` label ("hostname:pid", then "@cluster" for a block
    run of a worker cluster)."""
    return int(label.split("@", 1)[0].rsplit(":", 1)[1])


def _is_alive(pid: int) -> bool:
    import psutil

    try:
        # A zombie has ended: it only waits for its parent to collect its status.
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def alive(pids: Iterable[int]) -> set[int]:
    """Those of `pids` whose process is still running."""
    return {pid for pid in pids if _is_alive(pid)}


def process_tree(pid: int) -> set[int]:
    """`pid` and every process descended from it, as they are now (empty once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return {pid} | {child.pid for child in root.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def group_members(pgid: int) -> set[int]:
    """The running processes of process group `pgid` (a block's child leads its own)."""
    import psutil

    found = set()
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and _is_alive(proc.pid):
                found.add(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


def wait_gone(pids: Iterable[int], timeout: float) -> float:
    """Wait until none of `pids` runs; returns the seconds it took. Fails naming the
    survivors after `timeout`."""
    pids = set(pids)
    started = time.monotonic()
    while True:
        left = alive(pids)
        if not left:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"processes {sorted(left)} still alive {timeout} s later")
        time.sleep(0.02)


def reconcile_until(predicate, timeout: float, every: float = 0.2):
    """Run the scheduler's reconcile pass every `every` seconds until `predicate()` holds."""
    from runs import orchestrator

    def step():
        orchestrator.reconcile()
        return predicate()

    return wait_for(step, timeout=timeout, interval=every)


def pids_in(path: Path) -> list[int]:
    """The pids a block wrote to `path`, one per line (none while it does not exist)."""
    try:
        return [int(line) for line in path.read_text().split()]
    except FileNotFoundError:
        return []

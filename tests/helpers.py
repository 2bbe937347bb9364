"""Builders shared by the test suites."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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


def make_pipeline(uuid: str, blocks: Iterable[Sequence], **fields) -> Pipeline:
    """blocks: (uuid, type, code[, [upstream uuids]]) in creation order."""
    pipeline = services.pipeline_create(uuid=uuid, **fields)
    for spec in blocks:
        uuid_, type_, code = spec[:3]
        ups = spec[3] if len(spec) > 3 else []
        extra = spec[4] if len(spec) > 4 else {}
        services.block_create(pipeline=pipeline, uuid=uuid_, type=type_, content=code, upstream_blocks=ups, **extra)
    return pipeline


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
    """A real `manage.py qcluster` on the test database."""

    def __init__(self, data_dir: Path, workers: int = 2, env: dict | None = None):
        self.env = dict(
            os.environ,
            DATABASE_URL=database_url(),
            MILLRACE_DATA_DIR=str(data_dir),
            MILLRACE_WORKERS=str(workers),
            MILLRACE_BROKER_POLL="0.05",
            **(env or {}),
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerCluster:
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "qcluster"], cwd=ROOT, env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        return self

    def stop(self) -> str:
        assert self.proc is not None
        if self.proc.poll() is None:
            # SIGTERM to the cluster's main process only: it stops its workers itself.
            # Signalling the whole group at once makes django-q2 wait for its timeouts.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left behind
        except ProcessLookupError:
            pass
        out = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
        return out


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")

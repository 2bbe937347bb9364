from __future__ import annotations

import pytest

from tests.helpers import WorkerCluster


@pytest.fixture
def cluster(request, data_dir):
    """Starts real `qcluster` workers on the test database (`cluster(workers=2, **env)`)
    and stops them after the test. A test module's `CLUSTER_ENV` gives default
    environment variables for its clusters."""
    started: list[WorkerCluster] = []
    defaults = getattr(request.module, "CLUSTER_ENV", {})

    def start(workers: int = 2, **env: str) -> WorkerCluster:
        c = WorkerCluster(data_dir, workers=workers, env={**defaults, **env}).start()
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()

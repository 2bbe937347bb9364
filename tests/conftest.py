from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def data_dir(settings, tmp_path):
    """Each test writes block outputs to its own directory."""
    path = tmp_path / "data"
    path.mkdir()
    settings.MILLRACE_DATA_DIR = path
    return path


@pytest.fixture(autouse=True)
def fresh_definitions():
    """Transactional tests flush the tables and SQLite then hands out the same pipeline
    ids again: a definition cached by an earlier test must not be taken for a new one."""
    from pipelines.selectors import forget_definitions

    forget_definitions()
    yield
    forget_definitions()

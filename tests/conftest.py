from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def data_dir(settings, tmp_path):
    """Each test writes block outputs to its own directory."""
    path = tmp_path / "data"
    path.mkdir()
    settings.MILLRACE_DATA_DIR = path
    return path

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


# --- users and API clients shared by every suite ----------------------------------------
# Users have the password "pw"; the roles are the groups of config/common/permissions.py
# (editors change and run, viewers read) and Django's staff flag (staff administer).


@pytest.fixture
def editor_user():
    from tests.helpers import user_in

    return user_in("erin", "editors")


@pytest.fixture
def viewer_user():
    from tests.helpers import user_in

    return user_in("vic", "viewers")


@pytest.fixture
def staff_user():
    from tests.helpers import user_in

    return user_in("stan", is_staff=True, is_superuser=True)


@pytest.fixture
def editor(editor_user):
    """An API client authenticated as an editor."""
    from tests.helpers import api_client

    return api_client(editor_user)


@pytest.fixture
def viewer(viewer_user):
    """An API client authenticated as a viewer."""
    from tests.helpers import api_client

    return api_client(viewer_user)


@pytest.fixture
def staff(staff_user):
    """An API client authenticated as a staff superuser."""
    from tests.helpers import api_client

    return api_client(staff_user)

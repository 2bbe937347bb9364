"""What a new user meets on a first start: the admin and token commands, static files
and the favicon under a real uvicorn, `/healthz`, and an OpenAPI root that speaks to
API users."""

from __future__ import annotations

import http.client
import io
import os
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import OperationalError, connection
from django.test import Client
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.helpers import ROOT, user_in

pytestmark = pytest.mark.sqlite

BIN = Path(sys.executable).parent


def _run(command: str, *args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(command, *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


# --- create_api_token --------------------------------------------------------------------------

@pytest.mark.django_db
def test_create_api_token_prints_the_bare_key_and_says_how_to_send_it_on_stderr() -> None:
    user = user_in("bob", "editors")

    out, err = _run("create_api_token", "bob")

    key = Token.objects.get(user=user).key
    assert out == f"{key}\n"  # what `TOKEN=$(manage.py create_api_token bob)` captures
    assert f"Authorization: Token {key}" in err
    assert f"Authorization: Bearer {key}" in err
    assert "GET /api/pipeline_schedules/<id>" in err and "admin" in err
    # Both headers the message names really are accepted.
    for scheme in ("Token", "Bearer"):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"{scheme} {key}")
        assert client.get("/api/").json()["user"]["username"] == "bob"


# --- ensure_admin ------------------------------------------------------------------------------

@pytest.mark.django_db
def test_ensure_admin_creates_one_admin_with_a_password_shown_once(monkeypatch) -> None:
    monkeypatch.delenv("MILLRACE_ADMIN_USER", raising=False)
    monkeypatch.delenv("MILLRACE_ADMIN_PASSWORD", raising=False)

    first, _ = _run("ensure_admin")
    again, _ = _run("ensure_admin")

    admin = get_user_model().objects.get(is_superuser=True)
    assert admin.username == "admin"
    password = first.split("with password ", 1)[1].split()[0]
    assert admin.check_password(password)
    assert "shown only this once" in first
    assert "manage.py changepassword admin" in first
    # Later starts name the admin and the way back in, and never a password.
    assert again.strip() == (
        "Admin user 'admin' exists; a lost password is reset with `manage.py changepassword admin`."
    )
    assert password not in again
    assert get_user_model().objects.count() == 1


@pytest.mark.django_db
def test_ensure_admin_takes_the_name_and_password_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("MILLRACE_ADMIN_USER", "ops")
    monkeypatch.setenv("MILLRACE_ADMIN_PASSWORD", "a-chosen-secret")

    out, _ = _run("ensure_admin")

    admin = get_user_model().objects.get(is_superuser=True)
    assert admin.username == "ops" and admin.check_password("a-chosen-secret")
    assert "a-chosen-secret" not in out
    assert "MILLRACE_ADMIN_PASSWORD" in out


@pytest.mark.django_db
def test_ensure_admin_names_an_existing_superuser_of_another_name(monkeypatch) -> None:
    monkeypatch.setenv("MILLRACE_ADMIN_USER", "admin")
    get_user_model().objects.create_superuser("root", password="pw")

    out, _ = _run("ensure_admin")

    assert "'root'" in out and "manage.py changepassword root" in out
    assert not get_user_model().objects.filter(username="admin").exists()


# --- /healthz ----------------------------------------------------------------------------------

@pytest.mark.django_db
def test_healthz_answers_ok_without_login_and_is_never_cached() -> None:
    response = Client().get("/healthz")

    assert response.status_code == 200
    assert response.content == b"ok"
    assert response["Content-Type"].startswith("text/plain")
    assert "no-cache" in response["Cache-Control"] and "max-age=0" in response["Cache-Control"]


@pytest.mark.django_db
def test_healthz_answers_503_not_ok_and_nothing_more_when_the_database_does_not() -> None:
    """The one mock: the database is made unreachable for this request only, by a cursor
    that raises OperationalError; breaking the real database mid-test would break the
    rest of the test run."""
    refused = OperationalError("connection refused: secret-host:5432")
    with mock.patch.object(connection, "cursor", side_effect=refused):
        response = Client().get("/healthz")

    assert response.status_code == 503
    assert response.content == b"not ok"
    assert "no-cache" in response["Cache-Control"]


@pytest.mark.django_db
def test_healthz_refuses_writes() -> None:
    assert Client().post("/healthz").status_code == 405


def test_the_health_view_imports_none_of_the_apps() -> None:
    """config/ sits below every app: the health check must not drag one in."""
    code = (
        "import sys, config.health; "
        "print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in {'pipelines', 'runs', 'triggers', 'io_connectors'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings"},
    )
    assert result.stdout.strip() == "[]"


# --- favicon and the API root's description ----------------------------------------------------

@pytest.mark.django_db
def test_favicon_ico_leads_to_our_svg_and_admin_pages_link_it() -> None:
    response = Client().get("/favicon.ico")

    assert response.status_code == 302
    assert response["Location"] == "/static/favicon.svg"
    svg = ET.parse(ROOT / "static" / "favicon.svg").getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    login = Client().get("/admin/login/").content.decode()
    assert '<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">' in login
    assert "admin/css/base.css" in login  # still Django's own admin page around it


@pytest.mark.django_db
def test_the_api_root_description_speaks_to_api_users() -> None:
    client = APIClient()
    client.force_login(user_in("vic", "viewers"))

    schema = client.get("/api/schema/").json()

    description = schema["paths"]["/api/"]["get"]["description"]
    assert "token" in description
    assert "config/api.py" not in description and "DRF" not in description


# --- static files under a real uvicorn ---------------------------------------------------------

@dataclass
class Server:
    port: int
    log: Path
    static_root: Path

    def request(self, path: str, method: str = "GET", headers: dict | None = None) -> tuple:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_listening(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"uvicorn exited:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"uvicorn did not listen within 30 s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    """`make run`'s web process: migrate and collectstatic into a temporary var dir and
    SQLite file, then uvicorn on a free loopback port. The log is complete once the
    server has stopped, at the end of the module."""
    var = tmp_path_factory.mktemp("first_start")
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{var / 'millrace.sqlite3'}",
        "MILLRACE_VAR_DIR": str(var),
        "DEBUG": "0",
        # Every warning shown, whatever the caller's environment silences.
        "PYTHONWARNINGS": "default",
        "PYTHONUNBUFFERED": "1",
    }
    manage = [str(BIN / "python"), "manage.py"]
    subprocess.run([*manage, "migrate", "--noinput", "-v0"], cwd=ROOT, env=env, check=True)
    subprocess.run([*manage, "collectstatic", "--noinput", "-v0"], cwd=ROOT, env=env, check=True)
    port = _free_port()
    log = var / "uvicorn.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [str(BIN / "uvicorn"), "config.asgi:application", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _wait_until_listening(port, proc, log)
        yield Server(port=port, log=log, static_root=var / "staticfiles")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_uvicorn_serves_a_collected_stylesheet_with_its_type_and_caching(server: Server) -> None:
    status, headers, body = server.request("/static/admin/css/base.css")

    assert status == 200
    assert headers["content-type"].startswith("text/css")
    assert body == (server.static_root / "admin/css/base.css").read_bytes()
    assert b"font-family" in body
    assert headers["content-length"] == str(len(body))
    assert headers["cache-control"] == "max-age=60, public"
    assert headers["x-content-type-options"] == "nosniff"
    # A browser that has it gets a 304 and no body.
    again = server.request("/static/admin/css/base.css", headers={"If-None-Match": headers["etag"]})
    assert again[0] == 304 and again[2] == b""


def test_uvicorn_streams_a_file_larger_than_one_chunk_whole(server: Server) -> None:
    on_disk = (server.static_root / "admin/js/vendor/jquery/jquery.js").read_bytes()
    assert len(on_disk) > 3 * 64 * 1024

    status, headers, body = server.request("/static/admin/js/vendor/jquery/jquery.js")

    assert status == 200 and body == on_disk
    assert headers["content-type"].startswith("text/javascript")


def test_uvicorn_answers_head_range_and_wrong_methods(server: Server) -> None:
    status, headers, body = server.request("/static/admin/css/base.css", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 1000

    status, headers, body = server.request("/static/admin/css/base.css", headers={"Range": "bytes=0-9"})
    assert status == 206 and body == (server.static_root / "admin/css/base.css").read_bytes()[:10]

    assert server.request("/static/admin/css/base.css", method="POST")[0] == 405


@pytest.mark.parametrize(
    "path",
    [
        "/static/nope.css",
        "/static/admin/",
        "/static/../manage.py",
        "/static/%2e%2e/manage.py",
        "/static/admin/../../config/settings.py",
        "/static/..%2fmanage.py",
    ],
)
def test_uvicorn_answers_404_for_unknown_files_and_path_traversal(server: Server, path: str) -> None:
    status, headers, body = server.request(path)

    assert status == 404
    assert body == b"Not Found"
    assert headers["x-content-type-options"] == "nosniff"


def test_uvicorn_serves_the_favicon_and_health(server: Server) -> None:
    status, headers, _ = server.request("/favicon.ico")
    assert status == 302 and headers["location"] == "/static/favicon.svg"

    status, headers, body = server.request(headers["location"])
    assert status == 200 and headers["content-type"].startswith("image/svg+xml")
    assert body.startswith(b"<svg")

    status, _, body = server.request("/healthz")
    assert (status, body) == (200, b"ok")


def test_uvicorn_logs_no_synchronous_iterator_warning(server: Server) -> None:
    # Served again here so that this test stands alone when run by itself.
    for path in ("/static/admin/css/base.css", "/static/admin/js/core.js", "/static/favicon.svg"):
        assert server.request(path)[0] == 200

    log = server.log.read_text()

    # The log holds the server's output (its access lines), so what is absent is absent.
    assert '"GET /static/admin/js/core.js HTTP/1.1" 200' in log
    assert "synchronous iterators" not in log
    assert ": Warning: " not in log

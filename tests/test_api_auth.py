"""The API's doors: roles, session and token authentication, `create_api_token`, the
JSON error format, and the OpenAPI schema."""

from __future__ import annotations

import io
import json

import pytest
from django.contrib.auth.models import AnonymousUser, Group
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.http import Http404
from django.test import RequestFactory
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from config.common.api import exception_handler, json_not_found, json_server_error
from config.common.permissions import user_can_edit, user_can_view
from tests.helpers import block_code, make_pipeline, user_in
from triggers import services
from triggers.models import Event

pytestmark = [pytest.mark.django_db, pytest.mark.sqlite]


# --- roles -------------------------------------------------------------------------------------

def test_roles(django_user_model, editor_user, viewer_user) -> None:
    plain = user_in("pat")
    staff = user_in("sam", is_staff=True)
    root = django_user_model.objects.create_superuser("root", password="pw")
    gone = user_in("gone", "editors", is_active=False)

    assert [user_can_view(u) for u in (AnonymousUser(), viewer_user, plain, editor_user, staff, root, gone)] == [
        False, True, True, True, True, True, False,
    ]
    assert [user_can_edit(u) for u in (AnonymousUser(), viewer_user, plain, editor_user, staff, root, gone)] == [
        False, False, False, True, True, True, False,
    ]


def test_a_user_in_both_groups_may_edit() -> None:
    user = user_in("both", "viewers")
    user.groups.add(Group.objects.get_or_create(name="editors")[0])

    assert user_can_edit(user)


# --- authentication ----------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["/api/", "/api/pipeline_runs", "/api/pipeline_schedules", "/api/events/", "/api/schema/"])
def test_anonymous_gets_a_json_401(url: str) -> None:
    response = APIClient().get(url)

    assert response.status_code == 401
    assert response["Content-Type"].startswith("application/json")
    assert response["WWW-Authenticate"] == "Token"
    assert response.json()["error"] == {
        "code": 401, "type": "not_authenticated",
        "message": "Authentication credentials were not provided.",
    }


def test_anonymous_writes_are_refused_and_change_nothing() -> None:
    make_pipeline("p", [("load", "data_loader", block_code("data_loader", "return 1"))])

    response = APIClient().post("/api/pipelines/p/pipeline_schedules", {"name": "x", "schedule_type": "api"}, format="json")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == 401


@pytest.mark.parametrize("keyword", ["Token", "Bearer"])
def test_a_token_authenticates(editor_user, keyword: str) -> None:
    token = Token.objects.create(user=editor_user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"{keyword} {token.key}")

    me = client.get("/api/")
    created = client.post("/api/events/", {"event": {"source": "cli", "name": "ping"}}, format="json")

    assert me.status_code == 200
    assert me.json()["user"] == {"username": "erin", "can_edit": True, "is_staff": False}
    assert created.status_code == 201
    assert Event.objects.get().created_by == editor_user


def test_a_wrong_token_is_a_json_401(editor_user) -> None:
    Token.objects.create(user=editor_user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")

    response = client.get("/api/")

    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_failed"


def test_the_token_of_an_inactive_user_is_refused(editor_user) -> None:
    token = Token.objects.create(user=editor_user)
    editor_user.is_active = False
    editor_user.save()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")

    assert client.get("/api/").status_code == 401


def test_a_session_authenticates_and_its_writes_need_a_csrf_token(editor_user) -> None:
    client = APIClient(enforce_csrf_checks=True)
    client.login(username="erin", password="pw")

    read = client.get("/api/")
    write = client.post("/api/events/", {"event": {"source": "ui", "name": "click"}}, format="json")

    assert read.status_code == 200
    assert write.status_code == 403
    assert "CSRF" in write.json()["error"]["message"]
    assert not Event.objects.exists()


# --- create_api_token --------------------------------------------------------------------------

def _command(*args: str) -> str:
    out = io.StringIO()
    call_command("create_api_token", *args, stdout=out)
    return out.getvalue().strip()


def test_create_api_token_creates_then_prints_the_same_token(editor_user) -> None:
    first = _command("erin")
    again = _command("erin")

    assert first == again == Token.objects.get(user=editor_user).key
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {first}")
    assert client.get("/api/").json()["user"]["username"] == "erin"


def test_create_api_token_rotate_replaces_the_token(editor_user) -> None:
    old = _command("erin")

    new = _command("erin", "--rotate")

    assert new != old
    assert Token.objects.get(user=editor_user).key == new
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {old}")
    assert client.get("/api/").status_code == 401


def test_create_api_token_refuses_an_unknown_or_inactive_user() -> None:
    user_in("gone", is_active=False)

    with pytest.raises(CommandError, match="No user 'nobody'"):
        _command("nobody")
    with pytest.raises(CommandError, match="inactive"):
        _command("gone")
    assert not Token.objects.exists()


# --- errors are JSON ---------------------------------------------------------------------------

def test_an_unknown_api_url_is_a_json_404(viewer_user) -> None:
    client = APIClient()
    client.force_login(viewer_user)

    response = client.get("/api/no-such-thing")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == 404


def test_a_non_json_content_type_is_a_json_415(editor_user) -> None:
    client = APIClient()
    client.force_authenticate(editor_user)

    response = client.post("/api/events/", "source=a&name=b", content_type="application/x-www-form-urlencoded")

    assert response.status_code == 415
    assert response.json()["error"]["code"] == 415
    assert not Event.objects.exists()


def test_an_unexpected_error_is_a_logged_json_500(editor_user, monkeypatch, caplog) -> None:
    # A fault injected into our own service: the only way to reach the 500 path on
    # purpose; the assertion is about what the client gets and what the log keeps.
    def broken(**kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(services, "event_record", broken)
    client = APIClient()
    client.force_authenticate(editor_user)

    response = client.post("/api/events/", {"event": {"source": "a", "name": "b"}}, format="json")

    assert response.status_code == 500
    assert response.json() == {"error": {"code": 500, "type": "server_error", "message": "Internal server error."}}
    assert "disk on fire" not in response.content.decode()
    assert any("disk on fire" in (r.exc_text or "") or r.exc_info for r in caplog.records if r.name == "millrace.api")


def test_django_validation_errors_become_400s_naming_the_field() -> None:
    by_field = exception_handler(ValidationError({"schedule_interval": ["bad cron"], "__all__": ["and more"]}), {})
    as_list = exception_handler(ValidationError(["first problem", "second problem"]), {})

    assert by_field.status_code == 400
    assert by_field.data["error"]["fields"] == {"schedule_interval": ["bad cron"], "non_field_errors": ["and more"]}
    assert "schedule_interval: bad cron" in by_field.data["error"]["message"]
    assert as_list.status_code == 400
    assert as_list.data["error"]["fields"] == {}
    assert as_list.data["error"]["message"] == "first problem; second problem"


# --- schema ------------------------------------------------------------------------------------

def test_the_openapi_schema_answers_a_logged_in_user(viewer_user) -> None:
    client = APIClient()
    client.force_login(viewer_user)

    response = client.get("/api/schema/")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/vnd.oai.openapi+json")
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    assert client.get("/api/schema/?format=yaml").content.startswith(b"openapi: 3.")
    paths = schema["paths"]
    assert "/api/pipeline_schedules/{id}/pipeline_runs/{token}" in paths
    assert "/api/pipelines/{pipeline_uuid}/pipeline_schedules" in paths
    assert "/api/pipeline_runs" in paths and "/api/events" in paths
    # The API trigger needs no login (its token is in the path); everything else does.
    assert paths["/api/pipeline_schedules/{id}/pipeline_runs/{token}"]["post"]["security"] == [{}]
    schemes = {name for item in paths["/api/events"]["post"]["security"] for name in item}
    assert schemes == {"tokenAuth", "bearerAuth", "cookieAuth"}


def test_django_level_404_and_500_pages_are_json_only_under_api() -> None:
    factory = RequestFactory()

    api_500 = json_server_error(factory.get("/api/pipeline_runs"))
    page_500 = json_server_error(factory.get("/pipelines/"))
    page_404 = json_not_found(factory.get("/pipelines/nope"), Http404())

    assert api_500.status_code == 500
    assert json.loads(api_500.content)["error"]["type"] == "server_error"
    assert page_500.status_code == 500 and page_500["Content-Type"].startswith("text/html")
    assert page_404.status_code == 404 and page_404["Content-Type"].startswith("text/html")

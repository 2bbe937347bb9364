"""The project's URLs: the pages of each app, login and logout, the admin, `/healthz`, and
under `/api/` the API root, the OpenAPI schema and each app's routes (`runs/urls.py`,
`triggers/urls.py`)."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.templatetags.static import static
from django.urls import include, path
from django.utils.cache import patch_cache_control
from django.views.decorators.http import require_safe
from django.views.generic import RedirectView
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.renderers import OpenApiJsonRenderer, OpenApiYamlRenderer
from drf_spectacular.utils import extend_schema, inline_serializer
from drf_spectacular.views import SpectacularAPIView
from rest_framework import serializers
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from config.common.permissions import CanView, user_can_edit, user_is_admin
from config.health import healthz
from runs.urls import api_urlpatterns as runs_api
from runs.urls import page_urlpatterns as runs_pages
from triggers.urls import api_urlpatterns as triggers_api
from triggers.urls import page_urlpatterns as triggers_pages


class BearerTokenScheme(OpenApiAuthenticationExtension):
    """The schema's name for `Authorization: Bearer <token>` (drf-spectacular would
    otherwise take it for DRF's `Token` scheme of the same name)."""

    target_class = "config.common.permissions.BearerTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema: object) -> dict:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API token, from `manage.py create_api_token <username>`.",
        }


# The API root lives here, not in config/common/api.py, because DRF imports that module while
# its own views are still loading. Its docstring is the endpoint's description in the
# OpenAPI schema, so it speaks to API users only.
class ApiRootView(APIView):
    """Who the caller is and what they may do: a quick way to check that a token works."""

    permission_classes = [CanView]

    @extend_schema(
        responses=inline_serializer(
            "ApiRoot",
            fields={
                "user": inline_serializer(
                    "ApiUser",
                    fields={
                        "username": serializers.CharField(),
                        "can_edit": serializers.BooleanField(),
                        "is_staff": serializers.BooleanField(),
                    },
                ),
                "schema": serializers.CharField(),
            },
        )
    )
    def get(self, request: Request) -> Response:
        user = request.user
        return Response(
            {
                "user": {
                    "username": user.get_username(),
                    "can_edit": user_can_edit(user),
                    "is_staff": user_is_admin(user),
                },
                "schema": request.build_absolute_uri("/api/schema/"),
            }
        )


@require_safe
def favicon(request: HttpRequest) -> HttpResponse:
    """Browsers ask for /favicon.ico on pages that name no icon (the API's JSON, the
    schema); the icon is the static SVG, which admin pages link directly."""
    # Not permanent: a 301 would stay in browsers' caches for good if the icon moved.
    response = HttpResponseRedirect(static("favicon.svg"))
    patch_cache_control(response, public=True, max_age=24 * 3600)
    return response


class SchemaView(SpectacularAPIView):
    """`GET /api/schema/`: the OpenAPI schema, JSON by default (`?format=yaml` for YAML);
    its errors in JSON like every other API answer, never in YAML."""

    renderer_classes = [OpenApiJsonRenderer, OpenApiYamlRenderer]

    def handle_exception(self, exc: Exception) -> Response:
        response = super().handle_exception(exc)
        self.request.accepted_renderer = JSONRenderer()
        self.request.accepted_media_type = JSONRenderer.media_type
        return response


# Each app owns its routes (`<app>/urls.py`); here they are only put under `/api/`.
api_urlpatterns = [
    path("", ApiRootView.as_view(), name="api-root"),
    path("schema/", SchemaView.as_view(), name="api-schema"),
    *runs_api,
    *triggers_api,
]

urlpatterns = [
    path("", RedirectView.as_view(url="/pipelines/", permanent=False)),
    path("login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
    path("favicon.ico", favicon),
    path("api/", include(api_urlpatterns)),
    # The pages (server-rendered, HTMX), each app's own.
    *runs_pages,
    *triggers_pages,
]

# Under /api/ a missing page or a crash outside an API view is still answered in JSON.
handler404 = "config.common.api.json_not_found"
handler500 = "config.common.api.json_server_error"

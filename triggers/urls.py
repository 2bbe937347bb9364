"""`/api/` routes of the triggers app (Mage's paths; with or without a trailing slash)."""

from __future__ import annotations

from django.urls import URLPattern, path

from triggers import api


def _route(route: str, view: object, name: str) -> list[URLPattern]:
    # Mage's clients call `/api/pipeline_schedules/1`; Django's habit is a trailing
    # slash. Both answer, with no redirect (a redirected POST loses its body).
    return [path(route, view, name=name), path(f"{route}/", view)]


api_urlpatterns: list[URLPattern] = [
    *_route("pipeline_schedules", api.PipelineScheduleList.as_view(), "api-pipeline-schedules"),
    *_route(
        "pipelines/<slug:pipeline_uuid>/pipeline_schedules",
        api.PipelinePipelineSchedules.as_view(),
        "api-pipeline-pipeline-schedules",
    ),
    *_route("pipeline_schedules/<int:pk>", api.PipelineScheduleDetail.as_view(), "api-pipeline-schedule"),
    *_route(
        "pipeline_schedules/<int:pk>/rotate_token",
        api.PipelineScheduleRotateToken.as_view(),
        "api-pipeline-schedule-rotate-token",
    ),
    *_route("pipeline_schedules/<int:pk>/run", api.PipelineScheduleRunNow.as_view(), "api-pipeline-schedule-run"),
    *_route(
        "pipeline_schedules/<int:pk>/pipeline_runs/<str:token>",
        api.ApiTriggerView.as_view(),
        "api-trigger",
    ),
    # Without a token: answered 403 by the same view, never a login page or an HTML 404.
    *_route(
        "pipeline_schedules/<int:pk>/pipeline_runs",
        api.ApiTriggerMissingTokenView.as_view(),
        "api-trigger-no-token",
    ),
    *_route("events", api.EventList.as_view(), "api-events"),
]

"""Routes of the triggers app: its pages (and those that combine pipelines, runs and
triggers), and under `/api/` Mage's paths (with or without a trailing slash)."""

from __future__ import annotations

from django.urls import URLPattern

from config.common.routes import mage_route
from triggers import api
from triggers.views import pipelines

api_urlpatterns: list[URLPattern] = [
    *mage_route("pipeline_schedules", api.PipelineScheduleList.as_view(), "api-pipeline-schedules"),
    *mage_route(
        "pipelines/<slug:pipeline_uuid>/pipeline_schedules",
        api.PipelinePipelineSchedules.as_view(),
        "api-pipeline-pipeline-schedules",
    ),
    *mage_route("pipeline_schedules/<int:pk>", api.PipelineScheduleDetail.as_view(), "api-pipeline-schedule"),
    *mage_route(
        "pipeline_schedules/<int:pk>/rotate_token",
        api.PipelineScheduleRotateToken.as_view(),
        "api-pipeline-schedule-rotate-token",
    ),
    *mage_route("pipeline_schedules/<int:pk>/run", api.PipelineScheduleRunNow.as_view(), "api-pipeline-schedule-run"),
    *mage_route(
        "pipeline_schedules/<int:pk>/pipeline_runs/<str:token>",
        api.ApiTriggerView.as_view(),
        "api-trigger",
    ),
    # Without a token: answered 403 by the same view, never a login page or an HTML 404.
    *mage_route(
        "pipeline_schedules/<int:pk>/pipeline_runs",
        api.ApiTriggerMissingTokenView.as_view(),
        "api-trigger-no-token",
    ),
    *mage_route("events", api.EventList.as_view(), "api-events"),
]

# The pages: each page module lists its own routes.
page_urlpatterns: list[URLPattern] = [*pipelines.urlpatterns]

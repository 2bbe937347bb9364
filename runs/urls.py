"""Routes of the runs app: its pages, and under `/api/` Mage's paths (with or without a
trailing slash)."""

from __future__ import annotations

from django.urls import URLPattern

from config.common.routes import mage_route
from runs import api
from runs.views import logs, run_detail, runs_list

api_urlpatterns: list[URLPattern] = [
    *mage_route("pipeline_runs", api.PipelineRunList.as_view(), "api-pipeline-runs"),
    *mage_route("pipeline_runs/<int:pk>", api.PipelineRunDetail.as_view(), "api-pipeline-run"),
    *mage_route("block_runs/<int:pk>/log_file", api.BlockRunLogFile.as_view(), "api-block-run-log-file"),
]

# The run pages: each page module lists its own routes.
page_urlpatterns: list[URLPattern] = [*runs_list.urlpatterns, *run_detail.urlpatterns, *logs.urlpatterns]

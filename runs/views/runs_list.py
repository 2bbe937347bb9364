"""The runs of a pipeline (`/pipelines/<uuid>/runs`, its "Runs" tab): newest first,
paginated and filtered by status in SQL; for editors, Mage's four batch operations and
"Run now".

Mage's batch operations, and what each calls (the services the admin's actions call):

- "Retry selected": each selected run again from scratch (`runs_retry`, mode `all`);
- "Retry incomplete block runs" of the selected runs: the block runs of each that did
  not complete (`runs_retry`, mode `incomplete`), the completed ones keeping their outputs;
- "Cancel selected": each selected run that has not finished (`runs_cancel`);
- "Cancel all running": every run of the pipeline not finished (`pipeline_cancel_running`).

Mage's own "Retry all incomplete block runs" button takes no selection: it retries the
incomplete block runs of every failed run of the pipeline. It is offered too, as the
admin's action does it (`pipeline_retry_incomplete`: every failed or cancelled run).

Each is two POSTs: the first answers a confirmation saying how many runs it will touch
(an HTMX-swapped panel, or the page with the panel when HTMX is not there), the second
(`confirm=yes`) does it and reports what changed and why the others were refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.urls import URLPattern, path, reverse
from django.views.decorators.http import require_POST, require_safe

from config.common import jsonsafe
from config.common.permissions import user_can_edit
from pipelines.models import Pipeline
from runs import orchestrator, selectors, services
from runs.models import RUN_TERMINAL, PipelineRunStatus, RunType

PER_PAGE = 50
# More ids than a few pages' worth is not a selection made on this page.
MAX_SELECTED = 500
_ID_DIGITS = 18  # an id of more digits would overflow a bigint column (PostgreSQL errors)
VARIABLES_EXAMPLE = '{"region": "eu"}'


@dataclass(frozen=True)
class BatchAction:
    label: str
    verb: str  # for the report: "Retried 3 runs"
    selected: bool  # acts on the selected runs (else on the whole pipeline)
    eligible: Callable[[str], bool]  # which statuses it can change
    run: Callable[[Pipeline, list[int], Any], services.BatchResult]
    # For an action on the whole pipeline: the runs it will touch.
    statuses: tuple[str, ...] = ()


def _finished(status: str) -> bool:
    return status in RUN_TERMINAL


ACTIONS: dict[str, BatchAction] = {
    "retry": BatchAction(
        "Retry selected runs", "Retried", True, _finished,
        lambda pipeline, ids, user: services.runs_retry(ids, mode="all", user=user),
    ),
    "retry_incomplete": BatchAction(
        "Retry incomplete block runs of the selected runs", "Retried the incomplete block runs of", True, _finished,
        lambda pipeline, ids, user: services.runs_retry(ids, mode="incomplete", user=user),
    ),
    "retry_incomplete_all": BatchAction(
        "Retry all incomplete block runs of this pipeline (its failed and cancelled runs)",
        "Retried the incomplete block runs of", False, _finished,
        lambda pipeline, ids, user: services.pipeline_retry_incomplete(pipeline, user=user),
        (PipelineRunStatus.FAILED, PipelineRunStatus.CANCELLED),
    ),
    "cancel": BatchAction(
        "Cancel selected runs", "Cancelled", True, lambda status: not _finished(status),
        lambda pipeline, ids, user: services.runs_cancel(ids, user=user),
    ),
    "cancel_running": BatchAction(
        "Cancel all running runs of this pipeline", "Cancelled", False, lambda status: not _finished(status),
        lambda pipeline, ids, user: services.pipeline_cancel_running(pipeline, user=user),
        (PipelineRunStatus.INITIAL, PipelineRunStatus.RUNNING),
    ),
}


def _pipeline(uuid: str) -> Pipeline:
    return get_object_or_404(Pipeline, uuid=uuid)


def _status_filter(request: HttpRequest) -> str:
    status = request.GET.get("status", "")
    return status if status in PipelineRunStatus.values else ""


def _list_url(pipeline: Pipeline, status: str = "") -> str:
    url = reverse("pipeline-runs-list", args=[pipeline.uuid])
    return f"{url}?status={status}" if status in PipelineRunStatus.values and status else url


def _page_context(request: HttpRequest, pipeline: Pipeline, **extra: Any) -> dict[str, Any]:
    status = _status_filter(request)
    page = Paginator(selectors.pipeline_runs_filter(pipeline.pk, status=status), PER_PAGE).get_page(request.GET.get("page"))
    return {
        "pipeline": pipeline, "tab": "runs", "page": page, "status": status,
        "statuses": PipelineRunStatus.values, "can_edit": user_can_edit(request.user),
        "actions": ACTIONS, "variables_text": "", "variables_error": "", "variables_example": VARIABLES_EXAMPLE,
        **extra,
    }


@login_required
@require_safe
def runs_list(request: HttpRequest, pipeline_uuid: str) -> HttpResponse:
    pipeline = _pipeline(pipeline_uuid)
    return render(request, "runs/runs_list.html", _page_context(request, pipeline))


def _editor_pipeline(request: HttpRequest, pipeline_uuid: str) -> Pipeline:
    pipeline = _pipeline(pipeline_uuid)
    if not user_can_edit(request.user):
        raise PermissionDenied("Retrying, cancelling and starting runs needs an editor's rights.")
    return pipeline


def _selected_ids(values: list[str]) -> tuple[list[int], list[str]]:
    """The ids among `values`, and the values that are not ids."""
    ids, bad = [], []
    for value in values:
        text = value.strip()
        if text.isascii() and text.isdigit() and len(text) <= _ID_DIGITS:
            ids.append(int(text))
        else:
            bad.append(text[:40])
    return sorted(set(ids)), bad


def _refuse(request: HttpRequest, pipeline: Pipeline, back: str, text: str) -> HttpResponse:
    """Bad input: the message in the panel (HTMX) or on the list page."""
    if request.htmx:  # type: ignore[attr-defined]
        return render(request, "runs/partials/_runs_confirm.html", {"pipeline": pipeline, "panel": {"error": text, "back": back}})
    messages.error(request, text)
    return HttpResponseRedirect(back)


@login_required
@require_POST
def runs_action(request: HttpRequest, pipeline_uuid: str) -> HttpResponse:
    """Without `confirm`: the confirmation of a batch operation. With `confirm=yes`: the
    operation, through the run services, then back to the list with its report."""
    pipeline = _editor_pipeline(request, pipeline_uuid)
    back = _list_url(pipeline, request.POST.get("status", ""))
    action = ACTIONS.get(request.POST.get("action", ""))
    if action is None:
        return _refuse(request, pipeline, back, "Choose an action.")
    ids: list[int] = []
    statuses: dict[int, str] = {}
    if action.selected:
        ids, bad = _selected_ids(request.POST.getlist("run"))
        if bad:
            return _refuse(request, pipeline, back, f"Not run ids: {', '.join(repr(b) for b in bad[:5])}.")
        if not ids:
            return _refuse(request, pipeline, back, "No runs selected: tick the runs to act on first.")
        if len(ids) > MAX_SELECTED:
            return _refuse(request, pipeline, back, f"At most {MAX_SELECTED} runs at once.")
        statuses = selectors.pipeline_runs_statuses(pipeline.pk, ids)
        if len(statuses) < len(ids):
            return _refuse(request, pipeline, back, f"Not runs of {pipeline.uuid}: {_ids(sorted(set(ids) - set(statuses)))}.")
    if request.POST.get("confirm") != "yes":
        return _confirm(request, pipeline, back, action, list(statuses), statuses)
    result = action.run(pipeline, list(statuses), request.user)
    if not action.selected and not result.changed and not result.refused:
        messages.info(request, f"No run of {pipeline.uuid} was {' or '.join(action.statuses)}: nothing to do.")
    else:
        _report(request, result, action.verb)
    return HttpResponseRedirect(back)


def _ids(ids: list[int]) -> str:
    return ", ".join(f"#{i}" for i in ids[:10]) + (" ..." if len(ids) > 10 else "")


def _confirm(
    request: HttpRequest, pipeline: Pipeline, back: str, action: BatchAction, ids: list[int], statuses: dict[int, str],
) -> HttpResponse:
    if action.selected:
        touched = sum(1 for status in statuses.values() if action.eligible(status))
    else:
        touched = selectors.pipeline_runs_count(pipeline.pk, action.statuses)
    panel = {
        "pipeline": pipeline, "back": back, "action": action, "action_key": request.POST["action"], "ids": ids,
        "selected": len(ids), "touched": touched, "skipped": len(ids) - touched if action.selected else 0,
        "status": request.POST.get("status", ""),
    }
    if request.htmx:  # type: ignore[attr-defined]
        return render(request, "runs/partials/_runs_confirm.html", {"pipeline": pipeline, "panel": panel})
    return render(request, "runs/runs_list.html", _page_context(request, pipeline, panel=panel))


def _report(request: HttpRequest, result: services.BatchResult, verb: str) -> None:
    count = result.count
    if count or not result.refused:
        messages.success(request, f"{verb} {count} run{'s' if count != 1 else ''}.")
    for run_id, reason in result.refused.items():
        messages.warning(request, f"Refused run #{run_id}: {reason}")


@login_required
@require_POST
def runs_create(request: HttpRequest, pipeline_uuid: str) -> HttpResponse:
    """"Run now": a manual run with the variables given (a JSON object), merged over the
    pipeline's, created and started by the same service as `manage.py run_pipeline`."""
    pipeline = _editor_pipeline(request, pipeline_uuid)
    text = request.POST.get("variables", "").strip()
    try:
        variables = jsonsafe.loads(text, root="variables") if text else {}
        if not isinstance(variables, dict):
            raise jsonsafe.JSONValueError("variables", "must be a JSON object, like " + VARIABLES_EXAMPLE)
    except jsonsafe.JSONValueError as exc:
        context = _page_context(request, pipeline, variables_text=text, variables_error=str(exc))
        return render(request, "runs/runs_list.html", context, status=400)
    run = orchestrator.run_create(pipeline, variables=variables, run_type=RunType.MANUAL, created_by=request.user)
    messages.success(request, f"Run #{run.pk} created.")
    return HttpResponseRedirect(f"/pipelines/{pipeline.uuid}/runs/{run.pk}")


urlpatterns: list[URLPattern] = [
    path("pipelines/<slug:pipeline_uuid>/runs", runs_list, name="pipeline-runs-list"),
    path("pipelines/<slug:pipeline_uuid>/runs/actions", runs_action, name="pipeline-runs-action"),
    path("pipelines/<slug:pipeline_uuid>/runs/new", runs_create, name="pipeline-runs-create"),
]

"""`GET /healthz` for load balancers and process supervisors."""

from __future__ import annotations

import logging

from django.db import DatabaseError, connection
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

log = logging.getLogger("millrace.health")


def database_answers() -> bool:
    """True when the default database runs a trivial query."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except DatabaseError:
        # The reason goes to the log for the operator, never to the anonymous caller.
        log.warning("healthz: the database does not answer", exc_info=True)
        return False
    return True


@never_cache
@require_safe
def healthz(request: HttpRequest) -> HttpResponse:
    """`200 ok` when the database answers, else `503 not ok`. No login: a load balancer
    has none, which is also why the body says nothing more."""
    if database_answers():
        return HttpResponse("ok", content_type="text/plain; charset=utf-8")
    return HttpResponse("not ok", status=503, content_type="text/plain; charset=utf-8")

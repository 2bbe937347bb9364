"""The ASGI entry point (uvicorn): static files, then Django for HTTP, Channels for
websockets."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from django.conf import settings
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
# Django must be set up before anything imports models (the websocket routes do).
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from whitenoise.middleware import WhiteNoiseMiddleware  # noqa: E402

from config.routing import websocket_urlpatterns  # noqa: E402

# As Django's ASGIHandler takes them, so that it is an ASGIApp.
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[Mapping[str, Any]]]
Send = Callable[[Mapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CHUNK_SIZE = 64 * 1024


class StaticFiles:
    """Serves STATIC_URL before Django sees the request, streaming each file
    asynchronously.

    Under ASGI, whitenoise's middleware hands Django a FileResponse over a plain file, and
    Django 5.2 then warns "StreamingHttpResponse must consume synchronous iterators" and
    reads the whole file into memory in a thread. Django's own ASGIStaticFilesHandler
    avoids the warning the same way (whole file in a thread) but serves through
    `django.views.static.serve`, the development view: finders only, no Cache-Control.
    So whitenoise still decides everything (its index of STATIC_ROOT and finders, which
    already refuses path traversal, content types, Cache-Control, ETag and 304, Range,
    gzip/brotli variants, 405); only the sending is ours, chunk by chunk in a thread.
    The middleware stays in MIDDLEWARE for config/wsgi.py, where it has no such problem.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.whitenoise = WhiteNoiseMiddleware(get_response=None)
        self.prefix: str = self.whitenoise.static_prefix
        # What SecurityMiddleware added when whitenoise ran behind it, and that matters for
        # a file: no browser may guess a type other than the one we send.
        self.extra_headers: list[tuple[bytes, bytes]] = (
            [(b"x-content-type-options", b"nosniff")] if settings.SECURE_CONTENT_TYPE_NOSNIFF else []
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = _path_without_root(scope) if scope["type"] == "http" else ""
        if not path.startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        if self.whitenoise.autorefresh:
            # DEBUG: look on disk for each request, as whitenoise does, so that a file
            # added while the server runs is served without a restart.
            static_file = await asyncio.to_thread(self.whitenoise.find_file, path)
        else:
            static_file = self.whitenoise.files.get(path)
        if static_file is None:
            # Answered here, not by Django: a missing stylesheet needs no session,
            # middleware or error page, and a 404 body that says nothing more.
            await _send_plain(send, 404, b"Not Found", self.extra_headers)
            return
        response = static_file.get_response(scope["method"], _wsgi_headers(scope))
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
        await send(
            {
                "type": "http.response.start",
                "status": int(response.status),
                "headers": headers + self.extra_headers,
            }
        )
        await _send_file(send, response.file)


def _path_without_root(scope: Scope) -> str:
    # Under `uvicorn --root-path /x` the path includes the root path (ASGI spec), and
    # STATIC_URL is relative to it, as Django's ASGIRequest reads it.
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path.removeprefix(root) if root else path


def _wsgi_headers(scope: Scope) -> dict[str, str]:
    """The request headers in the WSGI `environ` shape whitenoise reads (`HTTP_RANGE`,
    `HTTP_IF_NONE_MATCH`, ...); repeated headers joined with commas."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", []):
        key = "HTTP_" + raw_name.decode("latin-1").upper().replace("-", "_")
        value = raw_value.decode("latin-1")
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    return headers


async def _send_file(send: Send, file: Any) -> None:
    """The body, read in a thread so the event loop never waits on the disk; the file is
    closed even when the client goes away mid-way."""
    if file is None:  # HEAD, 304, 405, 416
        await send({"type": "http.response.body", "body": b""})
        return
    try:
        while True:
            chunk = await asyncio.to_thread(file.read, CHUNK_SIZE)
            if not chunk:
                break
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        file.close()


async def _send_plain(
    send: Send, status: int, body: bytes, extra_headers: list[tuple[bytes, bytes]]
) -> None:
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers + extra_headers})
    await send({"type": "http.response.body", "body": body})


application = ProtocolTypeRouter(
    {
        "http": StaticFiles(django_asgi_app),
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)

"""Websocket routes. The run page's live log stream is added with the run pages."""

websocket_urlpatterns: list = []

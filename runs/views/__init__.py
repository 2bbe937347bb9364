"""The run pages (server-rendered, HTMX): one module per page."""

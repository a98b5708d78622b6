"""The webchat page: ``GET /`` and its static assets (package data ``sessiongate.gateway/static``, source ``app/static``).

Plain files, no build step. The page loads nothing from anywhere but the
gateway itself, and says so to the browser with a Content-Security-Policy.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

__all__ = ["PAGE_HEADERS", "STATIC_PACKAGE", "routes"]

STATIC_PACKAGE = ("sessiongate.gateway", "static")
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}


def routes() -> list[BaseRoute]:
    """``GET /`` (the page) and ``/static/*`` (its script and style)."""
    static = StaticFiles(packages=[STATIC_PACKAGE])
    index_path = Path(static.all_directories[0]) / "index.html"

    async def page(request: Request) -> FileResponse:
        return FileResponse(index_path, media_type="text/html", headers=PAGE_HEADERS)

    return [
        Route("/", page, methods=["GET", "HEAD"], name="webchat"),
        Mount("/static", app=static, name="static"),
    ]

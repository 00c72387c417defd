"""GET / (the playground page), GET /docs (Swagger UI from local files) and the /static mount.

Nothing here loads from a CDN: uPlot and Swagger UI are vendored under ``service/playground/vendor``,
and the pages' Content-Security-Policy lets the browser fetch only from this server.
"""

from __future__ import annotations

from functools import cache

from fastapi import APIRouter, FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from service.api.deps import TapeserveRoute
from service.playground import PLAYGROUND_DIR, STATIC_SUFFIXES

__all__ = ["STATIC_PATH", "PlaygroundFiles", "mount_static", "router"]

router = APIRouter(route_class=TapeserveRoute, tags=["playground"])

STATIC_PATH = "/static"

# Same-origin only: a page that cannot reach a CDN fails loudly in development, not in an air gap.
# Inline styles are allowed because uPlot and Swagger UI set element styles; inline scripts are not.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The page is tiny and changes with the package; revalidating keeps an upgraded server's page current.
    "Cache-Control": "no-cache",
}


@cache
def _page(name: str) -> str:
    return (PLAYGROUND_DIR / name).read_text(encoding="utf-8")


@router.get("/", operation_id="playground_page", include_in_schema=False, response_class=HTMLResponse)
async def playground_page() -> HTMLResponse:
    """Serve the playground: an expression editor with result tables and plots."""
    return HTMLResponse(_page("index.html"), headers=_PAGE_HEADERS)


@router.get("/docs", operation_id="swagger_ui", include_in_schema=False, response_class=HTMLResponse)
async def swagger_ui() -> HTMLResponse:
    """Serve Swagger UI for /openapi.json from the vendored bundle (works offline)."""
    return HTMLResponse(_page("docs.html"), headers=_PAGE_HEADERS)


class PlaygroundFiles(StaticFiles):
    """StaticFiles over the playground package that hands out web assets only (no .py, no caches)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        name = path.rsplit("/", 1)[-1]
        suffix = name[name.rfind(".") :] if "." in name else ""
        if suffix not in STATIC_SUFFIXES or "__pycache__" in path.split("/"):
            raise StarletteHTTPException(status_code=404)
        response = await super().get_response(path, scope)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response


def mount_static(app: FastAPI) -> None:
    """Mount the playground's files at /static (a router cannot carry a mount into the app)."""
    app.mount(STATIC_PATH, PlaygroundFiles(directory=PLAYGROUND_DIR), name="static")

"""The web page at `/` (like llama.cpp's server UI): a streaming chat with the sampling settings
and a JSON-schema box, and a live panel of the server's own metrics read from `/metrics`.

Three static files shipped in the package (static/: index.html, app.js, style.css), read once at
start-up; no build step and nothing loaded from elsewhere (the Content-Security-Policy says so to
the browser too). The page itself is open like /health; the API calls it makes carry the key the
user types into it."""
from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
          "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/static/style.css": ("style.css", "text/css; charset=utf-8")}
PATHS = frozenset(_FILES)
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def add_web_ui_routes(app: FastAPI) -> None:
    static = resources.files("kvflow.entrypoints.openai") / "static"
    for path, (name, media_type) in _FILES.items():
        body = (static / name).read_bytes()

        async def serve(body: bytes = body, media_type: str = media_type) -> Response:
            return Response(body, media_type=media_type, headers=_HEADERS)

        app.add_api_route(path, serve, methods=["GET"], include_in_schema=False)

"""`GET /store`: the store page, plain HTML/CSS/JS shipped with the package (no build
step, nothing from a CDN), under a strict Content-Security-Policy: only this origin's
script, style and API; no inline script, no framing."""

from __future__ import annotations

from importlib import resources
from typing import Final

import orjson
from aiohttp import web

CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_FILES: Final = {
    "store.html": "text/html",
    "store.css": "text/css",
    "store.js": "text/javascript",
}
_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return resources.files("proxy.ledger.credit_api").joinpath("static", name).read_bytes()


def add_store_routes(router: web.UrlDispatcher, *, demo: bool) -> None:
    files = {name: _read(name) for name in _FILES}  # read once, at start-up
    config = orjson.dumps({"demo": demo})

    def serve(name: str) -> web.Response:
        return web.Response(
            body=files[name], content_type=_FILES[name], charset="utf-8", headers=_HEADERS
        )

    async def page(_request: web.Request) -> web.Response:
        return serve("store.html")

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _FILES or name == "store.html":
            raise web.HTTPNotFound()
        return serve(name)

    async def store_config(_request: web.Request) -> web.Response:
        return web.Response(body=config, content_type="application/json", headers=_HEADERS)

    router.add_get("/store", page)
    router.add_get("/store/config.json", store_config)
    router.add_get("/store/{name}", asset)

"""Serves /console: a fixed set of files shipped in the package (no directory listing, no path from the URL),
with headers that keep the page to its own origin."""

from __future__ import annotations

import importlib.resources

from aiohttp import web

PREFIX = "/console"
# name -> content type; anything else under /console/ is a 404.
ASSETS = {
    "index.html": "text/html",
    "console.js": "text/javascript",
    "console.css": "text/css",
}
_HEADERS = {
    # Only this origin's files and APIs: no CDN, no inline script, nothing framed.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self';"
                               " frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files that change with the package: always revalidate rather than run a stale console.
    "Cache-Control": "no-cache",
}


def _read_assets() -> dict[str, bytes]:
    root = importlib.resources.files(__package__).joinpath("static")
    return {name: root.joinpath(name).read_bytes() for name in ASSETS}


def install_console(app: web.Application) -> None:
    """Add /console to `app` (its API calls go to /v1 and to the gateway's /api/v1, clowder_balancer.gateway)."""
    assets = _read_assets()  # read once: a missing file fails at start, not on a user's first visit

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info.get("name") or "index.html"
        if name not in assets:
            raise web.HTTPNotFound()
        return web.Response(body=assets[name], content_type=ASSETS[name], charset="utf-8", headers=_HEADERS)

    async def to_slash(request: web.Request) -> web.Response:
        raise web.HTTPFound(PREFIX + "/")

    app.router.add_get(PREFIX, to_slash)
    app.router.add_get(PREFIX + "/", asset)
    app.router.add_get(PREFIX + "/{name}", asset)

"""The console's routes on a bare aiohttp app, no cluster: what /console serves, with which headers, and that its
files reach nothing beyond this origin."""

from __future__ import annotations

import importlib.resources
import re

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from clowder_balancer.console import install_console
from clowder_balancer.console.routes import ASSETS


@pytest.fixture
async def client():
    app = web.Application()
    install_console(app)
    async with TestClient(TestServer(app)) as client:
        yield client


@pytest.mark.inprocess
async def test_console_redirects_to_its_page_and_serves_each_file(client):
    response = await client.get("/console", allow_redirects=False)
    assert response.status == 302 and response.headers["Location"] == "/console/"
    page = await client.get("/console/")
    assert page.status == 200 and page.content_type == "text/html"
    html = await page.text()
    assert '<script src="/console/console.js" defer></script>' in html
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    for name, content_type in ASSETS.items():
        response = await client.get(f"/console/{name}")
        assert response.status == 200 and response.content_type == content_type, name


@pytest.mark.inprocess
@pytest.mark.parametrize("path", ["/console/nope.js", "/console/..%2Froutes.py", "/console/static/console.js"])
async def test_only_the_listed_files_are_served(client, path):
    assert (await client.get(path)).status == 404


@pytest.mark.unit
def test_the_files_load_nothing_from_elsewhere():
    """No CDN, no font or script from another host: the only absolute URL is the SVG namespace name."""
    root = importlib.resources.files("clowder_balancer.console").joinpath("static")
    for name in ASSETS:
        text = root.joinpath(name).read_text()
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s'\"`)]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (name, urls)
        assert ".innerHTML" not in text and "insertAdjacentHTML" not in text, name  # API data goes in as text only


# GET /api/v1/runtime-stats, which the console reads, is the gateway's: tests/rest/test_rest_runtime_stats.py.

"""google.api.http path templates: the grammar, matching, and the errors for templates that break it."""

from __future__ import annotations

import pytest

from clowder_common.rest.template import TemplateError, parse_template

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("template, path, expected", [
    ("/v1/images/{alias}", "/v1/images/smol", {"alias": "smol"}),
    ("/v1/images/{alias}", "/v1/images/a%20b", {"alias": "a b"}),
    ("/v1/images/{alias}", "/v1/images/a%2Fb", {"alias": "a/b"}),
    ("/v1/images/{alias}", "/v1/images/a/b", None),
    ("/v1/images/{alias}:pull", "/v1/images/smol:pull", {"alias": "smol"}),
    ("/v1/images/{alias}:pull", "/v1/images/smol", None),
    ("/v1/images/{alias}:pull", "/v1/images/smol:push", None),
    ("/v1/{deployment.name}/x", "/v1/web/x", {"deployment.name": "web"}),
    ("/v1/{name=projects/*/models/*}", "/v1/projects/p/models/m", {"name": "projects/p/models/m"}),
    ("/v1/{name=projects/*/models/*}", "/v1/projects/p/other/m", None),
    ("/v1/{path=files/**}", "/v1/files/a/b/c", {"path": "files/a/b/c"}),
    ("/v1/{path=files/**}", "/v1/files/a%2Fb", {"path": "files/a%2Fb"}),
    ("/v1/*/images", "/v1/anything/images", {}),
    ("/v1/images", "/v1/images/", None),
])
def test_matching(template, path, expected):
    assert parse_template(template).match(path) == expected


def test_verbs_variables_and_openapi_form():
    parsed = parse_template("/api/v1/{deployment.name=deployments/*}:rollout")
    assert parsed.verb == "rollout" and [v.field_path for v in parsed.variables] == ["deployment.name"]
    assert parsed.openapi_path() == "/api/v1/{deployment.name}:rollout"
    assert parse_template("/a/b/{c}").literal_segments == 2


@pytest.mark.parametrize("template", [
    "api/v1/images", "/api//images", "/api/{alias", "/api/{alias}}", "/api/{a{b}}", "/api/{9bad}",
    "/api/**/images", "/api/images:", "/api/{a=b/{c}}", "/api/im*ages",
])
def test_bad_templates_are_refused(template):
    with pytest.raises(TemplateError):
        parse_template(template)

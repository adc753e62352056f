"""Pure functions of the controller: pagination, validation, backoff."""

from __future__ import annotations

import pytest

from clowder.controller.v1 import resources_pb2
from clowder_common.errors import InvalidArgument
from clowder_controller.pagination import paginate
from clowder_controller.reconciler import backoff_delay
from clowder_controller.validation import validate_image, validate_source_url

pytestmark = pytest.mark.unit


def test_paginate_walks_all_items_once():
    items = [(f"n{i:02d}", i) for i in range(7)]
    seen, token = [], ""
    while True:
        page, token = paginate(items, 3, token)
        seen += page
        if not token:
            break
    assert seen == list(range(7))


def test_paginate_rejects_foreign_token_and_huge_pages():
    with pytest.raises(InvalidArgument) as bad_token:
        paginate([("a", 1)], 10, "%%%not-base64")
    assert bad_token.value.violations[0].field == "page_token"
    with pytest.raises(InvalidArgument):
        paginate([("a", 1)], 5000, "")


@pytest.mark.parametrize("url, ok", [
    ("file:///models/a.gguf", True),
    ("https://example.invalid/a.gguf", True),
    ("http://127.0.0.1:8080/a.gguf", True),
    ("file://relative/a.gguf", False),
    ("hf:///unsloth/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_K_M.gguf", True),
    ("s3://models/smol.gguf", True),
    ("oci://127.0.0.1:5000/models/smol:v1", True),
    ("peer://127.0.0.1:1/sha256:00", False),
    ("ftp://host/a.gguf", False),
    ("http:///nohost", False),
    ("/models/a.gguf", False),
    ("", False),
])
def test_source_url_schemes(url, ok):
    if ok:
        assert validate_source_url(url) == url
    else:
        with pytest.raises(InvalidArgument) as err:
            validate_source_url(url)
        assert err.value.violations[0].field == "image.source_url"


@pytest.mark.parametrize("alias", ["Smol", "-x", "a b", "../etc", "a" * 64, ""])
def test_bad_aliases_are_rejected(alias):
    with pytest.raises(InvalidArgument) as err:
        validate_image(resources_pb2.Image(alias=alias, source_url="file:///m.gguf"))
    assert err.value.violations[0].field == "image.alias"


def test_configuration_ranges_name_each_field():
    config = resources_pb2.ImageConfiguration(temperature=3.0, top_p=0.0)
    with pytest.raises(InvalidArgument) as err:
        validate_image(resources_pb2.Image(alias="ok", source_url="file:///m.gguf", configuration=config))
    assert {v.field for v in err.value.violations} == {"image.configuration.temperature",
                                                        "image.configuration.top_p"}


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{{ m.content }}", "does not parse"),
    ("x" * (64 * 1024 + 1), "larger than"),
])
def test_a_broken_chat_template_is_refused_when_the_image_is_created(template, message):
    config = resources_pb2.ImageConfiguration(chat_template=template)
    with pytest.raises(InvalidArgument) as err:
        validate_image(resources_pb2.Image(alias="ok", source_url="file:///m.gguf", configuration=config))
    assert err.value.violations[0].field == "image.configuration.chat_template" and message in err.value.message


def test_a_chat_template_with_generation_markers_and_loop_controls_is_accepted():
    template = ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
                "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}")
    config = resources_pb2.ImageConfiguration(chat_template=template)
    validate_image(resources_pb2.Image(alias="ok", source_url="file:///m.gguf", configuration=config))


def test_backoff_grows_and_is_capped():
    delays = [backoff_delay(n) for n in range(10)]
    assert delays[0] == 0 and delays[1] == 1 and delays[2] == 2
    assert all(a <= b for a, b in zip(delays, delays[1:]))
    assert max(delays) == 30


@pytest.mark.parametrize("ref, ok", [
    ("", True), ("env:HF_TOKEN", True), ("file:/run/secrets/hf", True),
    ("hf_abcdef123456", False), ("env:", False), ("env:1X", False), ("file:relative", False),
    ("file:/a/../etc/shadow", False),
])
def test_credentials_are_references_only(ref, ok):
    from clowder_controller.validation import validate_credentials_ref

    if ok:
        validate_credentials_ref(ref)
    else:
        with pytest.raises(InvalidArgument) as err:
            validate_credentials_ref(ref)
        assert err.value.violations[0].field == "image.credentials_ref"

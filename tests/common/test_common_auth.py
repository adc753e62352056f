"""The admin token: generated once, stored 0600, never a default."""

from __future__ import annotations

import os
import stat

import pytest

from clowder_common import auth

pytestmark = pytest.mark.unit


def test_generated_token_is_private_and_stable(tmp_path, monkeypatch):
    monkeypatch.delenv(auth.TOKEN_ENV, raising=False)
    first = auth.ensure_admin_token(tmp_path)
    assert len(first) >= 32
    mode = stat.S_IMODE(os.stat(auth.token_path(tmp_path)).st_mode)
    assert mode == 0o600
    assert auth.ensure_admin_token(tmp_path) == first
    assert auth.read_admin_token(tmp_path) == first
    other = tmp_path / "other"
    assert auth.ensure_admin_token(other) != first  # no built-in default


def test_environment_token_wins(tmp_path, monkeypatch):
    monkeypatch.setenv(auth.TOKEN_ENV, "from-env")
    assert auth.ensure_admin_token(tmp_path) == "from-env"
    assert not auth.token_path(tmp_path).exists()  # nothing written when the operator supplied one
    assert auth.bearer_metadata("t") == (("authorization", "Bearer t"),)


def test_log_redaction():
    import logging

    from clowder_common.logs import RedactingFormatter

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "sent Bearer abc.def and token=xyz", None, None)
    text = RedactingFormatter("%(message)s").format(record)
    assert "abc.def" not in text and "xyz" not in text and "[redacted]" in text

"""Shared constants of the SDK tests."""

from __future__ import annotations

TOKEN = "sdk-test-admin-token"
MODEL = "smol"
CHAT = [{"role": "user", "content": "Name three colours."}]


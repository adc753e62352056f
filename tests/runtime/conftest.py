"""The runtime tests' fixtures."""

from __future__ import annotations

import pytest

from runtime_helpers import runtime_stub


@pytest.fixture(scope="module")
async def stub(runtime):
    """A RuntimeService stub on the module's `runtime` (a module that serves one defines that fixture)."""
    async with runtime_stub(runtime) as stub:
        yield stub

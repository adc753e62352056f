"""The storage tests' fixtures."""

from __future__ import annotations

import pytest

from helpers.storage import RangedSource


@pytest.fixture
async def source():
    """A started RangedSource on loopback."""
    src = RangedSource()
    await src.start()
    yield src
    await src.stop()

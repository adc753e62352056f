"""An EtcdState of a test's own: a fresh key prefix on a given etcd, emptied and closed afterwards."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

from clowder_common.etcd import EtcdState


def fresh_prefix(label: str = "test") -> str:
    """`/<label>-<8 hex>/`: tests sharing one etcd never see each other's keys."""
    return f"/{label}-{uuid.uuid4().hex[:8]}/"


@contextlib.asynccontextmanager
async def prefixed_state(etcd_endpoint: str, prefix: str) -> AsyncIterator[EtcdState]:
    state = EtcdState([etcd_endpoint], prefix)
    await state.connect()
    try:
        yield state
    finally:
        await state.delete_prefix(prefix)
        await state.close()

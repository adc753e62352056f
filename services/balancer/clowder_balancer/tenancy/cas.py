"""Compare-and-swap of one protobuf value in etcd: read, change, write only if nobody wrote in between."""

from __future__ import annotations

import asyncio
from typing import Callable, TypeVar

from google.protobuf.message import DecodeError, Message

from clowder_common.errors import Unavailable
from clowder_common.etcd import EtcdState

M = TypeVar("M", bound=Message)
R = TypeVar("R")

# Rounds before giving up: each lost round means another writer succeeded, so this bounds only pathological
# contention (hundreds of balancers hammering one key).
MAX_ROUNDS = 64


async def swap(state: EtcdState, key: str, cls: type[M], change: Callable[[M], R], timeout_s: float) -> R:
    """Apply `change` to the value at `key` (a fresh `cls()` when absent) and write it back atomically.

    `change` may run several times (once per lost race) and must be a pure function of the value it is
    given; what it returns on the round that wins is returned. Raises Unavailable when etcd does not answer
    within `timeout_s` in all.
    """
    async def rounds() -> R:
        current = await state.get_raw(key)
        raw, revision = (current.data, current.mod_revision) if current is not None else (b"", 0)
        for _ in range(MAX_ROUNDS):
            value = cls()
            try:
                value.ParseFromString(raw)
            except DecodeError:
                value = cls()  # an unreadable record starts over rather than blocking the key forever
            result = change(value)
            # A missing key has mod revision 0, so one compare covers "still absent" and "unchanged".
            swapped = await state.compare_and_put(key, value.SerializeToString(), expect_mod_revision=revision)
            if swapped.done:
                return result
            # The losing round's answer already holds the winner's value: no second read.
            found = swapped.current
            raw, revision = (found.data, found.mod_revision) if found is not None else (b"", 0)
        raise Unavailable(f"{key}: too much contention", retry_after=1.0)

    try:
        return await asyncio.wait_for(rounds(), timeout_s)
    except asyncio.TimeoutError as exc:
        # etcd errors arrive as Unavailable from the state layer already.
        raise Unavailable(f"etcd did not answer: {exc!r}", retry_after=1.0) from None

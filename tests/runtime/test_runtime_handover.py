"""The decode thread's hand-over to the event loop: batches from another thread arrive in order, none lost."""

from __future__ import annotations

import asyncio
import threading

import pytest

from clowder_runtime.handover import Handover


@pytest.mark.unit
async def test_batches_sent_from_another_thread_are_delivered_on_the_loop_in_order():
    loop = asyncio.get_running_loop()
    got: list[int] = []
    threads: set[int] = set()
    done = asyncio.Event()

    def deliver(batch: list[int]) -> None:
        threads.add(threading.get_ident())
        got.extend(batch)
        if got and got[-1] == 9_999:
            done.set()

    handover: Handover[list[int]] = Handover(loop, deliver)
    # Many more wake-ups than the pipe holds: a full pipe must neither block the sender nor lose a batch.
    sender = threading.Thread(target=lambda: [handover.send([i, i + 1]) for i in range(0, 10_000, 2)])
    sender.start()
    await asyncio.wait_for(done.wait(), 30)
    sender.join(10)
    assert got == list(range(10_000))
    assert threads == {threading.get_ident()}

    handover.send([10_000])
    handover.close()
    # What was sent before close is delivered by it; nothing after.
    assert got[-1] == 10_000
    handover.send([10_001])
    await asyncio.sleep(0.05)
    assert got[-1] == 10_000

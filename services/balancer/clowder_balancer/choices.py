"""n choices of one request: n runtime generations on one replica, merged into one stream tagged by index.

The first generation starts alone; the others start once it has sent its first message, so its prompt is in
the replica's KV cache by then and they reuse it instead of each evaluating the prompt again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

from clowder.runtime.v1 import runtime_pb2

from clowder_balancer.router import Router

# Messages buffered between the n generations and the one consumer; beyond it the generations wait.
QUEUE_SIZE = 64
_DONE = object()


def _wrap_int64(value: int) -> int:
    return (value + 2**63) % 2**64 - 2**63


def choice_requests(request: runtime_pb2.GenerateRequest, n: int) -> list[runtime_pb2.GenerateRequest]:
    """One runtime request per choice: own request ids, and seeds seed+i when the client gave a seed (so the
    choices differ, and the same request gives the same n answers again)."""
    out = [request]
    for i in range(1, n):
        copy = runtime_pb2.GenerateRequest()
        copy.CopyFrom(request)
        copy.request_id = f"{request.request_id}-{i}"
        if request.sampling.HasField("seed"):
            copy.sampling.seed = _wrap_int64(request.sampling.seed + i)
        out.append(copy)
    return out


async def generate_choices(
    router: Router, model: str, requests: list[runtime_pb2.GenerateRequest], session: str = ""
) -> AsyncGenerator[tuple[int, runtime_pb2.GenerateResponse], None]:
    """(choice index, runtime message) pairs of all choices until each has finished; the first failure ends
    the whole request (raised here, the other generations cancelled)."""
    if len(requests) == 1:
        async with contextlib.aclosing(router.generate(model, requests[0], session=session)) as stream:
            async for message in stream:
                yield 0, message
        return
    route = router.route_request(model, requests[0], session=session)
    queue: asyncio.Queue = asyncio.Queue(QUEUE_SIZE)
    home = [""]

    def landed(address: str) -> None:
        home[0] = address

    async def pump(index: int) -> None:
        try:
            stream = router.generate(model, requests[index], session=session, route=route, prefer=home[0],
                                     on_choice=landed if index == 0 else None)
            async with contextlib.aclosing(stream):
                async for message in stream:
                    await queue.put((index, message))
            await queue.put((index, _DONE))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await queue.put((index, exc))

    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(pump(0))]
    finished = 0
    try:
        while finished < len(requests):
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if len(tasks) == 1:
                # The first choice has its first message (or is already done): the prompt is cached now.
                tasks += [loop.create_task(pump(i)) for i in range(1, len(requests))]
            if item is _DONE:
                finished += 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

"""The decode thread's outputs to the event loop: one wake-up a step that never makes the decode thread wait.

asyncio's call_soon_threadsafe wakes the loop with a socket write that lets go of the GIL: the loop's thread,
woken on the other core, takes the GIL at once and keeps it while it handles the outputs, and the decode thread
waits for it to get the GIL back before it can sample the next step and call llama_decode (measured: 0.1-0.25 ms
a step, 2-5% of a single stream's step on two cores). Here the wake-up is a pipe write made while holding the
GIL (through ctypes.PyDLL, whose calls keep it): the loop's thread wakes, waits for the GIL, and gets it when the
decode thread lets go of it in llama_decode, right after. Outputs travel in a deque (appends and pops are
atomic), so the loop needs no lock either.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import os
from typing import Callable, Generic, TypeVar

T = TypeVar("T")

_libc = ctypes.PyDLL(None)
_write = _libc.write
_write.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
_write.restype = ctypes.c_ssize_t
_WAKE = b"\0"


class Handover(Generic[T]):
    """Batches of T from any thread to `deliver`, called on `loop` in the order they were sent."""

    def __init__(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[T], None]) -> None:
        self._loop = loop
        self._deliver = deliver
        self._batches: collections.deque[T] = collections.deque()
        self._read_fd, self._write_fd = os.pipe()
        for fd in (self._read_fd, self._write_fd):
            # A full pipe already holds a wake-up: the write may fail then, and must not block.
            os.set_blocking(fd, False)
        loop.add_reader(self._read_fd, self._drain)
        self._closed = False

    def send(self, batch: T) -> None:
        """From any thread; holds the GIL throughout."""
        if self._closed:
            return
        self._batches.append(batch)
        _write(self._write_fd, _WAKE, 1)

    def _drain(self) -> None:
        try:
            os.read(self._read_fd, 4096)
        except BlockingIOError:
            pass
        while self._batches:
            self._deliver(self._batches.popleft())

    def close(self) -> None:
        """On the loop's thread: what was sent is delivered, then nothing more is taken."""
        if self._closed:
            return
        self._closed = True
        self._drain()
        self._loop.remove_reader(self._read_fd)
        os.close(self._read_fd)
        os.close(self._write_fd)

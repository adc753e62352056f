"""Cutting a running llama_decode short from another thread, so an interactive request does not wait out a batch step.

llama.cpp asks a context's abort callback after every node of the graph it computes (a node takes well under a
millisecond here), and on "abort" it drops what the step had put in the KV cache and returns 2 from
llama_decode. A Python callback would be called from llama.cpp's compute thread hundreds of times a step, and
each call would take the GIL the event loop holds: it would slow every step. So the callback is a C function
that only reads a flag: libc's `strlen` over a two-byte buffer. The buffer holds "" (length 0: go on) or "\\x01"
(length 1: abort); ggml reads the callback's result as a C bool, which is the low byte of strlen's return value
on the C ABIs llama.cpp runs on (x86-64 and AArch64 return both in the same register). Setting or clearing the
flag is a one-byte write, without a lock.

llama.cpp reports an aborted step as a failure on its log (four lines, at error level); while a flag is set those
lines are dropped, so an operator does not read a normal preemption as an error.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import weakref
from typing import Any

import llama_cpp

_ABORT = b"\x01"
# Every StepAbort alive: llama.cpp's log is one per process.
_flags: weakref.WeakSet[StepAbort] = weakref.WeakSet()
# llama-cpp-python prints llama.cpp's messages at or above this logger's level (model.py sets it to errors).
_llama_logger = logging.getLogger("llama-cpp-python")
_LEVELS = {1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR, 4: logging.DEBUG}
_last_level = logging.INFO


@llama_cpp.llama_log_callback
def _log(level: int, text: bytes, _: ctypes.c_void_p) -> None:
    """llama-cpp-python's own log callback, less what an aborted step reports while its flag is set."""
    global _last_level
    # Level 5 continues the previous message.
    _last_level = _LEVELS.get(level, _last_level)
    if any(flag.requested for flag in _flags):
        return
    if _llama_logger.level <= _last_level:
        print(text.decode("utf-8", errors="replace"), end="", flush=True, file=sys.stderr)


class StepAbort:
    """The abort flag of one llama.cpp context."""

    def __init__(self) -> None:
        self._flag = ctypes.create_string_buffer(2)
        # The process's own symbols, libc's among them (find_library would run ldconfig or a compiler).
        address = ctypes.cast(ctypes.CDLL(None).strlen, ctypes.c_void_p).value
        assert address is not None, "libc has no strlen"
        # Kept on the instance: llama.cpp holds only the raw pointers.
        self._callback = llama_cpp.ggml_abort_callback(address)

    def install(self, ctx: Any) -> None:
        llama_cpp.llama_set_abort_callback(ctx, self._callback, ctypes.cast(self._flag, ctypes.c_void_p))
        _flags.add(self)
        llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))

    def request(self) -> None:
        """The running (or next) llama_decode of the context stops at its next node and returns 2."""
        self._flag.value = _ABORT

    def clear(self) -> None:
        self._flag.value = b""

    @property
    def requested(self) -> bool:
        return self._flag.value == _ABORT

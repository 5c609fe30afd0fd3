"""Keeping large, short-lived buffers from staying resident after they are freed.

A ``GetManagedObjects`` reply for thousands of devices is marshalled into buffers of several
megabytes. glibc serves such buffers with ``mmap`` at first, but after the first one is freed it
raises its threshold and serves the next from the heap, where they stay resident long after
they are freed: each large reply would leave the daemon tens of megabytes larger. Fixing the
threshold (which also stops its adjustment) gives those pages back on every ``free``.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("vfiocaps")

# From glibc's <malloc.h>.
M_MMAP_THRESHOLD = -3
# Allocations at least this large get their own mapping: a few dozen per large reply.
MMAP_THRESHOLD_BYTES = 256 * 1024


def return_large_buffers(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Make allocations of at least *threshold* bytes be returned to the system when freed.

    Returns whether the C library took the setting; ``False`` (logged at DEBUG) where it has no
    ``mallopt`` (a C library other than glibc) or refused. Raises nothing.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError) as err:
        log.debug("mallopt is not available (%s): large buffers stay with the allocator", err)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        log.debug("mallopt(M_MMAP_THRESHOLD, %d) was refused", threshold)
        return False
    return True

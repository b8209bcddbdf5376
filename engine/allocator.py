"""glibc malloc settings for inference's large temporaries.

A first turn allocates and frees the same large buffers in every layer: at 1080p the vision MLP's
4,032 x 4,096 activations are 33 MB each, above glibc's largest dynamic mmap threshold (32 MB), so
each is a fresh mmap whose pages the kernel faults in and zeroes on first touch, and memory freed
at the top of a heap is handed back to be faulted in again. One vision forward took 100,000-
500,000 page faults and 0.2-0.8 s of system time on 2 cores. With a 64 MB mmap threshold and a
256 MB trim threshold most of those buffers are reused from the heap instead (a thread allocating
two 33 MB buffers per round: 75 % fewer faults); the 1080p first token went from 5.6-6.9 s to
5.1-5.7 s (same VM, alternating runs). Freed memory up to that much stays with the process for
reuse: resident memory settles at the first turn's high-water mark.

Linux with glibc only; elsewhere (musl, macOS) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger("vlbot.engine")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 64 * 1024 * 1024
TRIM_THRESHOLD = 256 * 1024 * 1024


def keep_large_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
    if not done:
        logger.info("malloc thresholds left as they are (mallopt refused)")
    return done

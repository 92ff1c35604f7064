"""Keep freed memory in the process for reuse (glibc's malloc), so that a sampler's
per-step tensors do not each cost fresh pages from the kernel.

By default glibc hands large freed blocks back to the kernel and maps new ones for the next
allocation: every step of a sampler then pays a page fault per 4 KiB of every temporary
tensor. Measured on the quick ``bayesfilter-diff validate`` (one process, one thread):
99.6 s wall, 29.6 s of it in the kernel, against 59.5 s and 0.7 s with the settings below
(benchmarks/results.md). The price: the process's resident memory stays near its peak
instead of shrinking after it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["tune_allocator"]

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


def tune_allocator(
    mmap_threshold: int = 2**30, trim_threshold: int = 2**31 - 1, top_pad: int = 2**28
) -> bool:
    """Ask glibc's ``malloc`` to serve blocks up to ``mmap_threshold`` bytes from its heap,
    to return freed memory to the kernel only above ``trim_threshold`` bytes, and to grow the
    heap ``top_pad`` bytes at a time (``mallopt``). Called by the command line and by the
    study workers; call it at the start of a long sampling script.

    Returns whether the settings were applied (``False`` off glibc: other C libraries are
    left as they are).
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    clamp = 2**31 - 1  # mallopt takes a C int
    ok = mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, clamp))
    ok &= mallopt(_M_TRIM_THRESHOLD, min(trim_threshold, clamp))
    ok &= mallopt(_M_TOP_PAD, min(top_pad, clamp))
    return bool(ok)

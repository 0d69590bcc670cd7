"""Keep the memory a training step frees for the next step, instead of handing it back to the kernel.

glibc's malloc serves large blocks (a step's activation buffers) with mmap and unmaps them when freed, so every
step faults the same memory in again: a quarter of a training's CPU time went to page faults. With mmap off for
blocks (M_MMAP_MAX=0) and the heap never trimmed (M_TRIM_THRESHOLD), freed buffers stay in the process and are
reused. Every command sets this at start (``multitask.cli.guarded``); MULTITASK_MALLOC=default leaves glibc's
defaults. Elsewhere than glibc nothing is changed.
"""
from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
NEVER_TRIM = 2**31 - 1

state = "default"  # what keep_freed_memory did: kept | default (why)


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.mallinfo2  # glibc (2.33+) only
    except (OSError, AttributeError):
        return None
    libc.mallinfo2.restype = MallInfo2
    return libc


def keep_freed_memory() -> str:
    """Set the allocator once for this process (and the workers it forks); returns ``state``."""
    global state
    if state != "default":
        return state
    libc = _libc()
    if os.environ.get("MULTITASK_MALLOC", "keep") == "default":
        state = "default (MULTITASK_MALLOC=default)"
    elif libc is None:
        state = "default (not glibc)"
    elif libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM):
        state = "kept"
    else:
        state = "default (mallopt refused)"
    return state


def large_blocks_mapped() -> bool:
    """Read back what is in force: whether a 64 MiB block is still served by mmap (glibc's default)."""
    libc = _libc()
    if libc is None:
        return True
    before = libc.mallinfo2().hblks
    block = ctypes.create_string_buffer(64 * 2**20)  # malloc'ed by CPython
    mapped = libc.mallinfo2().hblks > before
    del block
    return mapped

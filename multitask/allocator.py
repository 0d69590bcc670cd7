"""Keep the memory a training step frees for the next step, instead of handing it back to the kernel.

glibc's malloc serves large blocks (a step's activation buffers) with mmap and unmaps them when freed, so every
step faults the same memory in again: a quarter of a training's CPU time went to page faults. Two remedies, in
order of preference (MULTITASK_MALLOC names one; docs/speed.md has the measurements behind the order):

- ``tcmalloc`` (the default when installed: Debian/Ubuntu ``libtcmalloc-minimal4``): gperftools' malloc keeps
  freed blocks in its own caches, so the faults go, and it packs blocks of many sizes more tightly than a glibc
  heap that is never trimmed, so the peak memory goes down too. A running process cannot change its malloc, so a
  command started without it runs itself again at once with the library preloaded (``restart_with_tcmalloc``).
- ``keep`` (the fallback): glibc with mmap off for blocks (M_MMAP_MAX=0) and the heap never trimmed
  (M_TRIM_THRESHOLD): the faults go, the peak grows by the heap's fragmentation.

``default`` leaves glibc's defaults. Every command applies this at start (``multitask.cli.guarded``). Elsewhere
than glibc nothing is changed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path
from typing import Optional

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
NEVER_TRIM = 2**31 - 1
SETTINGS = ("tcmalloc", "keep", "default")
RESTARTED = "MULTITASK_MALLOC_RESTARTED"  # set on the restart: a library that fails to preload is tried once

state = "default"  # what keep_freed_memory did: tcmalloc | kept | default (why)


def setting() -> str:
    return os.environ.get("MULTITASK_MALLOC", "tcmalloc")


def environment(wanted: str) -> dict:
    """This process's environment for a child that is to choose ``wanted`` itself (without the preload that this
    process may have been restarted with)."""
    env = {k: v for k, v in os.environ.items() if k != RESTARTED}
    preload = [p for p in env.pop("LD_PRELOAD", "").split(":") if p and "tcmalloc" not in p]
    return {**env, "MULTITASK_MALLOC": wanted, **({"LD_PRELOAD": ":".join(preload)} if preload else {})}


def tcmalloc_library() -> Optional[str]:
    """The installed tcmalloc's file name (found as ld.so finds it), or None."""
    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def tcmalloc_loaded() -> bool:
    try:
        return "libtcmalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def restart_with_tcmalloc() -> None:
    """Replace this process by the same command with tcmalloc preloaded (same PID, arguments and environment),
    unless it is loaded already, not installed, not wanted, or was tried once. Call it first thing, before a
    thread or a file is opened."""
    if setting() != "tcmalloc" or os.environ.get(RESTARTED) or tcmalloc_loaded():
        return
    library = tcmalloc_library()  # last: finding it runs ldconfig
    if library is None:
        return
    preload = ":".join(filter(None, [library, os.environ.get("LD_PRELOAD")]))
    # tcmalloc warns on stderr about every block over 1 GB, which a large batch's activations can be
    env = {**os.environ, "LD_PRELOAD": preload, RESTARTED: "1", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**40)}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


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
    if setting() not in SETTINGS:
        state = f"default (MULTITASK_MALLOC={setting()} is not one of {', '.join(SETTINGS)})"
    elif tcmalloc_loaded():
        state = "tcmalloc"
    elif setting() == "default":
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

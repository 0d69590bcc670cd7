"""Atomic file writes: a crash or kill -9 leaves either the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def errors_named(path: Path, staging: Optional[Path] = None) -> Iterator[None]:
    """An OSError inside raised again naming what the user knows: ``path``; or, with ``staging`` (a temporary copy
    of the folder ``path``), the file it named there as the same file under ``path``."""
    try:
        yield
    except OSError as e:
        name = os.fsdecode(e.filename) if e.filename is not None else ""
        where = str(path) + name[len(str(staging)):] if staging and name.startswith(str(staging)) else str(path)
        raise OSError(e.errno, e.strerror, where) from None


# mkstemp makes 0600 files; written files get the mode open() would give them, as the user's umask says.
FILE_MODE = 0o666 & ~_umask()


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """``write`` into a temporary file beside ``path``, then rename it over ``path``. A failure leaves ``path``
    as it was and raises an OSError naming ``path`` (not the temporary file)."""
    path = Path(path)
    with errors_named(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with errors_named(path):
            write(Path(tmp))
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def writable_folder(path: Path) -> None:
    """``path`` made if missing, and a file created and removed in it: an OSError naming ``path`` when the system
    refuses (read-only, permission, full), before a writer that would fail in a thread of its own."""
    with errors_named(path):
        Path(path).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic(path, lambda tmp: _torch_save(obj, tmp))


def _torch_save(obj: Any, tmp: Path) -> None:
    """torch.save, whose failed writes (a full disk above all) come as RuntimeErrors from its C++ writer: as an
    OSError, so that they are said in one line like any other."""
    try:
        torch.save(obj, tmp)
    except RuntimeError as e:  # "file write failed", or "[enforce fail at inline_container.cc] unexpected pos"
        if not any(word in str(e).lower() for word in ("write", "inline_container", "unexpected pos")):
            raise
        full = shutil.disk_usage(tmp.parent).free < 64 * 2**20
        raise OSError(errno.ENOSPC if full else errno.EIO, "No space left on device" if full else str(e),
                      str(tmp)) from None


def atomic_to_csv(df, path: Path) -> None:
    _atomic(path, lambda tmp: df.to_csv(tmp, index=False))


@contextlib.contextmanager
def staged_output(out: Path, ours: Sequence[str], overwrite: bool, command: str) -> Iterator[Path]:
    """A new folder beside ``out`` to write a command's outputs into, moved into ``out`` only when the command
    succeeds: a failure, a kill or a full disk leaves ``out`` as it was. ``out`` must be new or empty, unless
    ``overwrite``, which then replaces this command's own earlier outputs (the names or glob patterns in ``ours``)
    and leaves any other file alone. A second command writing the same ``out`` meanwhile is refused in one line (a
    lock on ``.<out>.lock`` beside it while the command runs, dropped by the system when the process ends, even by
    kill -9)."""
    from filelock import FileLock, Timeout

    from multitask.errors import ConfigError

    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder")
    with errors_named(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(out.parent / f".{out.name}.lock", mode=FILE_MODE)
        try:
            lock.acquire(timeout=0)
        except Timeout:  # an OSError (TimeoutError) too: said here, not as a refusal of the system
            raise ConfigError(f"--out {out}: is being written by another command; wait for it, or give another "
                              "folder") from None
    try:
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise ConfigError(f"--out {out}: not empty; give a new folder, or --overwrite to replace what an "
                              f"earlier {command} wrote there")
        staged = re.compile(rf"\.{re.escape(out.name)}\.\d+\.tmp")
        for stale in out.parent.iterdir():  # a command killed while writing here (kill -9); none writes now
            if staged.fullmatch(stale.name):
                shutil.rmtree(stale, ignore_errors=True)
        staging = out.parent / f".{out.name}.{os.getpid()}.tmp"
        try:
            with errors_named(out, staging):  # said for the files the user asked for, not their staged copies
                staging.mkdir()
                yield staging
                _move_in(staging, out, ours)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        # removed while still held: a command that opened it meanwhile finds it unlinked once it gets the lock, and
        # takes a new one (filelock checks), so no lock file is left beside the outputs
        Path(lock.lock_file).unlink(missing_ok=True)
        lock.release()


def _move_in(staging: Path, out: Path, ours: Sequence[str]) -> None:
    """The staged outputs into ``out``: the whole folder at once when ``out`` is new or empty; else this command's
    earlier outputs are removed and the new ones moved in beside the user's other files."""
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists() and not out.is_symlink():
        os.rename(staging, out)
        return
    for pattern in ours:
        for old in out.glob(pattern):
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    for new in staging.iterdir():
        os.replace(new, out / new.name)

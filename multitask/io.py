"""Atomic file writes: a crash or kill -9 leaves either the old file or the new one, never half of one."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp makes 0600 files; written files get the mode open() would give them, as the user's umask says.
FILE_MODE = 0o666 & ~_umask()


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """``write`` into a temporary file beside ``path``, then rename it over ``path``. A failure leaves ``path``
    as it was and raises an OSError naming ``path`` (not the temporary file)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(e.filename or path)) from None
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic(path, lambda tmp: _torch_save(obj, tmp))


def _torch_save(obj: Any, tmp: Path) -> None:
    """torch.save, whose failed writes (a full disk above all) come as RuntimeErrors from its C++ writer: as an
    OSError, so that they are said in one line like any other."""
    try:
        torch.save(obj, tmp)
    except RuntimeError as e:
        if "write" not in str(e).lower():
            raise
        full = shutil.disk_usage(tmp.parent).free < 64 * 2**20
        raise OSError(errno.ENOSPC if full else errno.EIO, "No space left on device" if full else str(e),
                      str(tmp)) from None


def atomic_to_csv(df, path: Path) -> None:
    _atomic(path, lambda tmp: df.to_csv(tmp, index=False))


def output_folder(out: Path, ours: Sequence[str], overwrite: bool, command: str) -> Path:
    """``out`` made ready for a command's outputs, never mixing two runs of it: created when missing; refused
    when it holds anything, unless ``overwrite``, which first removes this command's own earlier outputs (the
    names or glob patterns in ``ours``) and leaves any other file alone."""
    from multitask.errors import ConfigError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"--out {out}: not empty; give a new folder, or --overwrite to replace what an "
                              f"earlier {command} wrote there")
        for pattern in ours:
            for old in out.glob(pattern):
                shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out

"""Atomic file writes: a crash or kill -9 leaves either the old file or the new one, never half of one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp makes 0600 files; written files get the mode open() would give them, as the user's umask says.
FILE_MODE = 0o666 & ~_umask()


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_to_csv(df, path: Path) -> None:
    _atomic(path, lambda tmp: df.to_csv(tmp, index=False))

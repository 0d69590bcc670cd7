"""Torch dataset over the table, and the decoded-image cache.

Decoding a JPEG every epoch is wasted work: every photo is prepared once (decode, crop, resize) into one uint8
array file under ``data.cache_dir``, keyed by the files (path, size, mtime) and the preparation settings, so a
changed file or a changed crop/size builds a new cache. Augmentation runs on the cached arrays. Building the cache
decodes every photo, which is also where unreadable and truncated files are found.

The cache's rows are read from the file when a photo is needed, not memory-mapped: the kernel's page cache keeps
them in RAM all the same (shared by the loader workers, and given back when memory is short), but a mapped file
counts into each process's resident memory, so a training on 20,000 photos looked 2 GB larger than it is to a
scheduler or an out-of-memory killer.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from multitask.data.images import files_key
from multitask.io import atomic_write_text, errors_named
from multitask.data.sources import Problem
from multitask.data.transforms import FaceFraming
from multitask.parallel import on_every_core


def _frame_chunk(args) -> list:
    framing, paths = args
    out = []
    for p in paths:
        try:
            out.append(framing(p))
        except Exception as e:  # any decoder error is a bad file, reported with its path
            out.append(f"unreadable image ({type(e).__name__}: {e})")
    return out


def frame_all(paths: Sequence[str], framing: FaceFraming, sink: Optional[np.ndarray] = None,
              workers: int = 0) -> list[Problem]:
    """Frame every photo (in parallel), writing into ``sink`` when given; returns the unreadable ones."""
    chunk = 64
    jobs = [(framing, list(paths[i:i + chunk])) for i in range(0, len(paths), chunk)]
    return _collect(on_every_core(_frame_chunk, jobs, workers), paths, sink, chunk)


def _collect(results, paths, sink, chunk) -> list[Problem]:
    problems = []
    for j, batch in enumerate(results):
        for k, item in enumerate(batch):
            i = j * chunk + k
            if isinstance(item, str):
                problems.append(Problem(paths[i], item))
            elif sink is not None:
                sink[i] = item
    return problems


def cache_key(paths: Sequence[str], framing: FaceFraming) -> str:
    faces = None if framing.faces is None else [framing.faces.get(str(p)) for p in paths]
    settings = (framing.crop, framing.size, framing.face_crop, framing.face_margin, faces,
                sorted(framing.typical.items()))
    return files_key(paths, repr(settings + (4,)))  # 4: the unreadable files are kept by row


class CachedImages:
    """Rows of an image cache file (N x H x W x 3 uint8 ``.npy``), read on access: ``images[i]`` is one photo,
    ``images[mask or indices]`` a selection of rows (nothing read), ``np.asarray(images)`` all of them."""

    def __init__(self, path: Path):
        header = np.load(path, mmap_mode="r")  # the header only: where the rows start and their shape
        self.path, self.offset, self.photo_shape = Path(path), header.offset, header.shape[1:]
        self.rows = np.arange(header.shape[0])
        self.row_bytes = int(np.prod(self.photo_shape))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple:
        return (len(self.rows), *self.photo_shape)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            offset = self.offset + int(self.rows[index]) * self.row_bytes
            return np.fromfile(self.path, np.uint8, self.row_bytes, offset=offset).reshape(self.photo_shape)
        chosen = copy.copy(self)
        chosen.rows = self.rows[index]
        return chosen

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, np.uint8)
        for i in range(len(self)):
            out[i] = self[i]
        return out if dtype is None else out.astype(dtype)


class RowWriter:
    """``writer[i] = photo`` writes row i of an open cache file (a mapped file being filled would count into
    resident memory as it grows)."""

    def __init__(self, file, offset: int, row_bytes: int):
        self.file, self.offset, self.row_bytes = file, offset, row_bytes

    def __setitem__(self, i: int, photo: np.ndarray) -> None:
        self.file.seek(self.offset + i * self.row_bytes)
        self.file.write(np.ascontiguousarray(photo, dtype=np.uint8).tobytes())


def cached_images(paths: Sequence[str], framing: FaceFraming, cache_dir: Path,
                  log: Callable[[str], None] = print) -> tuple[CachedImages, list[Problem]]:
    """(the prepared photos, N x H x W x 3, unreadable files). Rows of unreadable files are zeros."""
    cache_dir = Path(cache_dir)
    key = cache_key(paths, framing)
    array_path, meta_path = cache_dir / f"images-{key}.npy", cache_dir / f"images-{key}.json"
    if array_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        # by row: the same files reached by another spelling (a relative path, say) share the cache, and each
        # caller gets its problems under its own paths
        return CachedImages(array_path), [Problem(paths[row], message) for row, message in meta["unreadable"]]
    h, w = framing.size
    tmp = array_path.with_name(f".{array_path.name}.{os.getpid()}.tmp")
    try:
        with errors_named(array_path):  # a full disk or a refused folder: said for the cache file
            cache_dir.mkdir(parents=True, exist_ok=True)
            log(f"caching {len(paths)} photos at {h}x{w} into {array_path}")
            header = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), h, w, 3))
            offset = header.offset
            del header  # the file exists at its full size (zeros); its rows are written, not mapped
            with open(tmp, "r+b") as f:
                problems = frame_all(paths, framing, RowWriter(f, offset, h * w * 3))
            os.replace(tmp, array_path)
    finally:
        tmp.unlink(missing_ok=True)
    rows = {str(p): i for i, p in enumerate(paths)}
    atomic_write_text(meta_path, json.dumps({"unreadable": [[rows[str(p.path)], p.message] for p in problems],
                                             "count": len(paths)}))
    return CachedImages(array_path), problems


class PhotoDataset(Dataset):
    """(image tensor, per-head integer targets; -1 = no label) for rows of the table.

    ``images`` is the cache (indexed by ``rows``); without it each photo is prepared from ``paths`` on access.
    With ``soft`` (float rows: the soft targets of the loss's terms, ``MultiHeadLoss.soft_terms``) an item is
    (image, targets, its soft targets)."""

    def __init__(self, paths: Sequence[str], targets: np.ndarray, transform, framing: FaceFraming,
                 images: Optional[np.ndarray] = None, rows: Optional[np.ndarray] = None,
                 soft: Optional[np.ndarray] = None):
        self.paths = list(paths)
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.int64).reshape(len(self.paths), -1))
        self.transform, self.framing = transform, framing
        self.images, self.rows = images, rows
        self.soft = None if soft is None else torch.as_tensor(np.asarray(soft, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> np.ndarray:
        """The prepared (not yet augmented) photo."""
        if self.images is not None:
            return self.images[self.rows[i]]
        return self.framing(self.paths[i])

    def __getitem__(self, i: int):
        image = self.transform(image=self.image(i))["image"]
        return (image, self.targets[i]) if self.soft is None else (image, self.targets[i], self.soft[i])


class ArrayDataset(Dataset):
    """(image tensor, per-head targets) for photos already prepared (N x H x W x 3 uint8: an array or
    ``CachedImages``), e.g. the photos to predict or an extra validation set; ``targets`` default to -1."""

    def __init__(self, images: np.ndarray, transform, targets: Optional[np.ndarray] = None):
        self.images, self.transform = images, transform
        targets = np.full((len(images), 1), -1) if targets is None else targets
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.int64).reshape(len(images), -1))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(image=self.images[i])["image"], self.targets[i]

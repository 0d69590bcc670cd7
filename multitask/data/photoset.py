"""ONE way from (config, table of photo paths) to photos ready for the network.

Training, the extra validation sets, predict, explain and the benchmark all go through ``photo_set``: under
``data.face_crop=detector`` the faces are found (once, cached beside the image cache), every photo is framed
(decoded, face region, resized: ``FaceFraming``) into the image cache, and the files that cannot be read are
listed. What to do about those is the caller's: training follows ``data.on_bad_file``, predict skips and lists them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from multitask.config import Config
from multitask.data.dataset import cached_images, frame_all
from multitask.data.sources import Problem
from multitask.data.transforms import DETECTED, Preprocessing

Log = Callable[[str], None]


@dataclass
class PhotoSet:
    """``table``: every row, with ``_row`` (its row in ``images``) and, under the detector, ``face_found``;
    ``images``: every photo framed, N x H x W x 3 uint8 (rows of unreadable files are zeros; None when
    ``data.cache`` is off and photos are framed as they are read); ``pre``: the preprocessing that framed them (with
    the face boxes), whose ``train()`` / ``eval()`` transforms turn a framed photo into the network's input."""

    table: pd.DataFrame
    images: Optional[np.ndarray]
    pre: Preprocessing
    unreadable: List[Problem]

    def readable(self) -> pd.DataFrame:
        """The rows of the files that could be read."""
        bad = {p.path for p in self.unreadable}
        return self.table[~self.table["path"].isin(bad)] if bad else self.table

    def selected(self, rows: pd.DataFrame) -> np.ndarray:
        """The framed photos of these rows of ``table`` (a selection of the cache: read when used)."""
        return self.images[rows["_row"].to_numpy()]


def preprocessing_for(cfg: Config, paths: Sequence[str], log: Log = print,
                      typical: Optional[Mapping[tuple[int, int], tuple]] = None
                      ) -> tuple[Preprocessing, Optional[np.ndarray]]:
    """The run's ``Preprocessing`` for these photos and, under ``face_crop=detector|aligned``, whether each photo's face
    was found (None for the other face crops). ``typical``: a trained run's typical face boxes by photo size,
    which take precedence over these photos'."""
    pre = Preprocessing.from_config(cfg).with_typical(typical or {})
    if cfg.data.face_crop not in DETECTED:
        return pre, None
    from multitask.data import faces

    found = faces.find_faces(paths, Path(cfg.data.cache_dir), log)
    return pre.with_faces(found), found["found"].to_numpy(dtype=bool)


def photo_set(cfg: Config, table: pd.DataFrame, log: Log = print,
              typical: Optional[Mapping[tuple[int, int], tuple]] = None, cache: Optional[bool] = None,
              timed: Callable[[str], ContextManager] = lambda step: contextlib.nullcontext()) -> PhotoSet:
    """The photos of ``table`` (its ``path`` column) found, framed and cached as ``cfg`` says. ``cache``: None
    follows ``data.cache``; ``timed(step)`` wraps the two steps, "faces" and "framing" (predict's pace line)."""
    paths = table["path"].tolist()
    with timed("faces"):
        pre, found = preprocessing_for(cfg, paths, log, typical)
    if found is not None:
        table = table.assign(face_found=found)
    table = table.assign(_row=np.arange(len(table)))
    with timed("framing"):
        if cfg.data.cache if cache is None else cache:
            images, unreadable = cached_images(paths, pre.framing, Path(cfg.data.cache_dir), log)
        else:
            images, unreadable = None, frame_all(paths, pre.framing)
    return PhotoSet(table, images, pre, unreadable)

"""What every step of a fold's training shares: the run, its data and device (``Context``), and the time left."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np
import pandas as pd

from multitask.config import Config
from multitask.data.dataset import PhotoDataset
from multitask.data.transforms import Preprocessing
from multitask.distributed import World
from multitask.engine import Runtime
from multitask.run import RunDir

Log = Callable[[str], None]


@dataclass
class Context:
    cfg: Config
    run: RunDir
    table: pd.DataFrame  # with fold and _row (row in the image cache)
    images: Optional[np.ndarray]
    pre: Preprocessing
    rt: Runtime
    log: Log
    clock: Clock
    world: World
    teacher: Dict[int, pd.DataFrame]  # per fold to train, its training rows' teacher targets (fold_teacher_targets)


def dataset(ctx: Context, rows: pd.DataFrame, targets: np.ndarray, transform,
            soft: Optional[np.ndarray] = None) -> PhotoDataset:
    return PhotoDataset(rows["path"].tolist(), targets, transform, ctx.pre.framing, ctx.images,
                        rows["_row"].to_numpy() if ctx.images is not None else None, soft)


def epoch_seed(cfg: Config, fold: int, stage: int, epoch: int) -> int:
    return int(np.random.default_rng([cfg.train.seed, fold, stage, epoch]).integers(2**31))


class Clock:
    """Time left for the run, from the photos (training + validation passes) still to go and the pace so far."""

    def __init__(self, planned: int):
        self.planned, self.done, self.start = planned, 0, time.perf_counter()

    def tick(self, photos: int) -> str:
        self.done += photos
        pace = (time.perf_counter() - self.start) / max(self.done, 1)
        return f"~{max(self.planned - self.done, 0) * pace / 60:.1f} min left"

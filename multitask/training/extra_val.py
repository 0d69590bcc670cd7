"""Extra validation sets (``data.extra_val``): scored by every fold model, never trained on."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pandas as pd

from multitask.config import Config, extra_val_names
from multitask.data.photoset import photo_set
from multitask.data.sources import age_thresholds
from multitask.data.table import apply_policy, eval_targets, load_labeled
from multitask.engine import predict_views
from multitask.io import atomic_to_csv
from multitask.model import MultiHeadNet
from multitask.training.context import Context, Log
from multitask.training.evaluate import oof_frame


def load_extra_val(cfg: Config, log: Log, typical: Optional[Dict[tuple, tuple]] = None
                   ) -> Dict[str, tuple[pd.DataFrame, np.ndarray]]:
    """name -> (table, prepared images) of each extra validation set, framed like the training photos (the
    training set's ``typical`` face boxes); unreadable files follow data.on_bad_file."""
    sets = {}
    for name, root in zip(extra_val_names(cfg.data), cfg.data.extra_val):
        table, problems = load_labeled(Path(root), age_thresholds(cfg.heads))
        photos = photo_set(cfg, table, log, typical, cache=True)
        apply_policy(problems + photos.unreadable, cfg.data.on_bad_file, f"data.extra_val {root}")
        rows = photos.readable()
        sets[name] = (rows.drop(columns="_row").reset_index(drop=True), photos.selected(rows))
        log(f"extra validation set {name}: {len(rows)} photos from {root}")
    return sets


def score_extra_val(ctx: Context, fold: int, model: MultiHeadNet, sets) -> None:
    """fold<k>/extra_val/<name>.csv: the fold model's probabilities on each extra validation set, with the
    run's test-time views (predict.tta_flip, tta_scales; their number in ``views``), so the report's ensemble row
    is what predict gives."""
    cfg = ctx.cfg
    views = cfg.predict.views()
    for name, (table, images) in sets.items():
        targets = eval_targets(cfg, table)
        probs, values = predict_views(model, images, ctx.pre, views, ctx.rt, cfg.data.batch_size * 2)
        frame = oof_frame(cfg, table.assign(fold=fold), targets, probs, values).assign(views=len(views))
        atomic_to_csv(frame, ctx.run.extra_val(fold, name))

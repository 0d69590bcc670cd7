"""Validation passes (every process its share under torchrun, gathered in order) and the out-of-fold tables."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DistributedSampler

from multitask.config import Config
from multitask.distributed import gather_rows
from multitask.engine import head_outputs, make_loader, predict_logits
from multitask.io import atomic_to_csv
from multitask.model import MultiHeadNet
from multitask.run import prediction_frame, subgroup_columns
from multitask.training.context import Context, dataset


def validation_loader(ctx: Context, rows: pd.DataFrame, targets: np.ndarray, transform, workers: int):
    """The photos of ``rows`` in order; under torchrun each process loads its share (``validation_outputs`` gathers)."""
    ds = dataset(ctx, rows, targets, transform)
    sampler = DistributedSampler(ds, ctx.world.size, ctx.world.rank, shuffle=False) if ctx.world.active else None
    return make_loader(ds, ctx.cfg.data.batch_size * 2, workers, ctx.rt.device, sampler=sampler)


def gathered_logits(ctx: Context, model: MultiHeadNet, loader) -> torch.Tensor:
    """The model's outputs for a loader's photos, in order; under torchrun each process predicts its share and
    every process gets all rows."""
    logits = predict_logits(model, loader, ctx.rt)
    if ctx.world.active:
        logits = gather_rows(ctx.world, torch.as_tensor(list(loader.sampler)), logits, len(loader.dataset))
    return logits


def validation_outputs(ctx: Context, model: MultiHeadNet, loader
                       ) -> tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """Class probabilities (and values, for heads that predict them) per head for a loader's photos, in order."""
    return head_outputs(model, gathered_logits(ctx, model, loader))


def oof_frame(cfg: Config, rows: pd.DataFrame, targets: np.ndarray, probs: Dict[str, np.ndarray],
              values: Optional[Dict[str, np.ndarray]] = None) -> pd.DataFrame:
    """The prediction table of validation rows: identity, true labels, probabilities, predictions, values."""
    keep = [c for c in ("path", "person_id", "fold", "age", "face_found", *subgroup_columns(cfg)) if c in rows]
    return prediction_frame(cfg.heads, rows[keep], probs, targets={h.name: targets[:, i] for i, h in
                                                                   enumerate(cfg.heads)}, values=values)


def write_fold_oof(ctx: Context, fold: int, rows, targets, probs, values, views: int) -> None:
    """fold<k>/oof.csv, with the number of test-time views its probabilities are the mean of."""
    atomic_to_csv(oof_frame(ctx.cfg, rows, targets, probs, values).assign(views=views), ctx.run.fold_oof(fold))

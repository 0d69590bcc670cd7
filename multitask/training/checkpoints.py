"""A stage's files (best.pt, last.pt, metrics.csv) and what a resume restores from them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import pandas as pd
import torch
from torch import nn

from multitask.engine import Runtime
from multitask.io import atomic_to_csv, atomic_torch_save
from multitask.model import load_checkpoint
from multitask.run import RunDir, read_table


@dataclass
class StageCheckpoints:
    """The files of one stage of one fold: best.pt (the weights validated best, in ``dtype``), last.pt (all a
    resume needs, rewritten every epoch) and metrics.csv (one row per epoch)."""

    run: RunDir
    fold: int
    stage_no: int
    dtype: str
    config: dict  # the run's config as it started: a resume checks it

    def resume(self) -> Optional[dict]:
        last = self.run.last(self.fold, self.stage_no)
        return load_checkpoint(last) if last.exists() else None

    def history(self, epochs: int) -> List[dict]:
        return read_table(self.run.metrics(self.fold, self.stage_no), ["epoch"]).to_dict("records")[:epochs]

    def save(self, state: dict, history: List[dict], best: Optional[nn.Module]) -> None:
        """``state``: the epoch's model, ema, optimizer, epoch, best_score and best_epoch; ``best``: the weights to
        keep when the epoch scored best."""
        if best is not None:
            atomic_torch_save({"model": saved_weights(best, self.dtype), "epoch": state["epoch"],
                               "score": state["best_score"]}, self.run.best(self.fold, self.stage_no))
        atomic_to_csv(pd.DataFrame(history), self.run.metrics(self.fold, self.stage_no))
        atomic_torch_save({**state, "config": self.config, "rng": torch.get_rng_state()},
                          self.run.last(self.fold, self.stage_no))


def saved_weights(model: nn.Module, dtype: str) -> Dict[str, torch.Tensor]:
    """The state_dict to keep in best.pt: floating tensors in fp16 halve every run's size (the weights move by
    at most 1e-3 of their value; loading casts them back)."""
    state = model.state_dict()
    if dtype == "fp32":
        return state
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def grad_scaler(rt: Runtime, ckpt: Optional[dict]) -> Optional[torch.amp.GradScaler]:
    """fp16's loss scale (None in other precisions), carried over a resume as the optimizer's state is: a scale
    started over costs the first steps after a resume (skipped while it falls back to a workable value)."""
    if rt.dtype != torch.float16:
        return None
    scaler = torch.amp.GradScaler(rt.device.type)
    if ckpt is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return scaler

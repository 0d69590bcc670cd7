"""Soft targets: what a stage's terms beyond the labels learn (``loss.person_consistency``: the previous stage's
predictions on a person's unmasked photos; ``teacher=``: the teacher runs' out-of-fold predictions)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

import numpy as np
import pandas as pd

from multitask.config import Config, ConfigError, HeadConfig
from multitask.folds import person_constant_heads
from multitask.heads import kind
from multitask.losses import PersonConsistency, TeacherAgreement, person_targets
from multitask.model import MultiHeadNet
from multitask.teacher import load_teachers, target_columns, taught_heads, teacher_targets
from multitask.training.context import Context
from multitask.training.evaluate import gathered_logits, validation_loader

if TYPE_CHECKING:
    from multitask.training.stage import StageData


def person_consistency(cfg: Config, table: pd.DataFrame, active: List[HeadConfig]) -> Optional[PersonConsistency]:
    """loss.person_consistency over the stage's heads that are the same on all of a person's photos and output
    one distribution (gender; age under ce or dldl); None when off or there are none."""
    if cfg.loss.person_consistency <= 0:
        return None
    constant = {h.name for h in person_constant_heads(table, cfg.heads)}
    heads = [h for h in active if h.name in constant and kind(h).softmax_outputs]
    widths = np.cumsum([0] + [kind(h).outputs(len(h.classes)) for h in heads])
    columns = {h.name: slice(int(a), int(b)) for h, a, b in zip(heads, widths[:-1], widths[1:])}
    return PersonConsistency(columns, cfg.loss.person_consistency, cfg.loss.consistency_temperature) if heads else None


def teacher_agreement(cfg: Config, active: List[HeadConfig]) -> Optional[TeacherAgreement]:
    """The term that learns the ``teacher`` runs' predictions over the stage's ``taught_heads``; None without
    teachers."""
    heads = taught_heads(active)
    return TeacherAgreement(heads, cfg.loss.teacher_weight) if cfg.teacher and heads else None


def stage_soft_targets(ctx: Context, fold: int, model: MultiHeadNet, data: StageData, name: str
                       ) -> Optional[np.ndarray]:
    """The training rows' soft targets: a block per term of the stage's loss, in its order; None without terms."""
    blocks = []
    for term in data.loss_fn.soft_terms:
        if isinstance(term, PersonConsistency):
            blocks.append(stage_person_targets(ctx, model, data, term))
        else:
            blocks.append(ctx.teacher[fold].loc[data.train_rows.index, target_columns(term.heads)].to_numpy())
            have = int((~np.isnan(blocks[-1][:, 0])).sum())
            ctx.log(f"{name}: teacher predictions for {have} of {len(data.train_rows)} training photos")
    return np.concatenate(blocks, axis=1) if blocks else None


def stage_person_targets(ctx: Context, model: MultiHeadNet, data: StageData, consistency: PersonConsistency
                         ) -> np.ndarray:
    """The training rows' person targets: ``model`` (the previous stage's) on each person's photos of the absent
    class (unmasked), softened by the temperature and averaged per person (``person_targets``)."""
    head = next(h for h in ctx.cfg.heads if h.absent is not None)
    rows = data.train_rows
    source = (rows[head.column] == head.classes.index(head.absent)).to_numpy()
    loader = validation_loader(ctx, rows[source], data.y_train[source], ctx.pre.eval(size=data.stage.size),
                               data.workers)
    parts = model.split(gathered_logits(ctx, model, loader))
    t = consistency.temperature
    probs = np.concatenate([(parts[name] / t).softmax(1).numpy() for name in consistency.columns], axis=1)
    return person_targets(rows["person_id"].to_numpy(), source, probs)


def fold_teacher_targets(cfg: Config, run_dir: Path, table: pd.DataFrame, folds: List[int]
                         ) -> Dict[int, pd.DataFrame]:
    """Each fold's teacher targets for its training rows (``teacher_targets``), read before any fold trains: a fold
    that no teacher model can teach without having trained on its validation people is refused at the start."""
    if not cfg.teacher:
        return {}
    teachers = load_teachers(cfg.teacher, taught_heads(cfg.heads), run_dir)
    targets = {}
    for k in folds:
        targets[k] = teacher_targets(teachers, table[table["fold"] != k], table[table["fold"] == k])
        if targets[k].isna().all(axis=None):
            raise ConfigError(f"teacher={list(cfg.teacher)}: no teacher model predicted fold {k}'s training photos "
                              f"without having trained on its validation people; fold {k}'s teachers are runs made "
                              f"with cv.leave_out={k} (same data, cv.folds and cv.seed)")
    return targets

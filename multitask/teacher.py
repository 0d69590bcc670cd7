"""Teacher runs' out-of-fold predictions as soft targets (``teacher=[RUN, ...]``): distilling an ensemble into
one model.

A teacher's prediction for a photo comes from its fold model that held the photo's person out (the run's
``fold<k>/oof.csv``), never from one that trained on the person, so a student learns nothing from a teacher that
its own labels could not have taught it. The teachers' fold models did train on other folds' people, the
student's validation people among them; that influence reaches the student only through predictions on other
people's photos.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pandas as pd

from multitask.config import ConfigError, HeadConfig
from multitask.run import RunDir, prob_columns, read_table


def taught_heads(heads: Sequence[HeadConfig]) -> list[HeadConfig]:
    """The heads a teacher teaches: those whose probabilities are the network's own (prior balanced; a training
    prior shifts the teacher's after the fact, and the student's training outputs are not shifted)."""
    return [h for h in heads if h.prior == "balanced"]


def target_columns(heads: Sequence[HeadConfig]) -> list[str]:
    """The teacher targets' columns: each head's class probabilities, in the heads' order (``TeacherAgreement``'s
    layout)."""
    return [c for h in heads for c in prob_columns(h)]


def teacher_predictions(run: RunDir, heads: Sequence[HeadConfig]) -> pd.DataFrame:
    """``key`` (the photo's real path) and the heads' class probabilities, one row per photo a fold of ``run``
    held out and predicted."""
    if not run.is_run():
        raise ConfigError(f"teacher={run.root}: not a run directory (no config.yaml)")
    own = {h.name: h for h in run.load_config().heads}
    for h in heads:
        theirs = own.get(h.name)
        if theirs is None or (list(theirs.classes), list(theirs.thresholds), theirs.prior) != \
                (list(h.classes), list(h.thresholds), h.prior):
            raise ConfigError(f"teacher={run.root}: its head {h.name} is not this run's ({list(h.classes)}, "
                              f"thresholds {list(h.thresholds)}, prior {h.prior}); a teacher must predict the same "
                              "classes")
    folds = run.fold_oofs()
    if not folds:
        raise ConfigError(f"teacher={run.root}: no fold has finished (no fold<k>/oof.csv)")
    columns = target_columns(heads)
    held_out = pd.concat([read_table(path, ["path"] + columns) for path in folds.values()], ignore_index=True)
    return held_out.assign(key=[os.path.realpath(p) for p in held_out["path"]])[["key"] + columns] \
        .drop_duplicates("key")


def teacher_targets(runs: Sequence[str], rows: pd.DataFrame, heads: Sequence[HeadConfig]) -> pd.DataFrame:
    """Per row of ``rows`` (same index), the mean over the teacher ``runs`` of their held-out class probabilities
    for its photo, the ``heads``' probability columns; NaN where no teacher predicted the photo. Read once per run:
    a stage takes its rows and heads from it."""
    columns = target_columns(heads)
    photos = pd.DataFrame({"key": [os.path.realpath(p) for p in rows["path"]]})
    total, count = np.zeros((len(rows), len(columns))), np.zeros(len(rows))
    for run in runs:
        found = photos.merge(teacher_predictions(RunDir(run), heads), on="key", how="left")[columns].to_numpy()
        have = ~np.isnan(found).any(axis=1)
        total[have] += found[have]
        count[have] += 1
    with np.errstate(invalid="ignore"):  # 0/0: NaN, no teacher has the photo
        return pd.DataFrame((total / count[:, None]).astype(np.float32), index=rows.index, columns=columns)

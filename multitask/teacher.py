"""Teacher runs' out-of-fold predictions as soft targets (``teacher=[RUN, ...]``): distilling an ensemble into
one model.

A teacher's prediction for a photo comes from its fold model that held the photo's person out (the run's
``fold<k>/oof.csv``), never from one that trained on the person, so a student learns nothing from a teacher that
its own labels could not have taught it. Nor does a student fold learn from a teacher fold model that trained on
that fold's validation people: what such a model learned from them would reach the student through its
predictions on other people's photos and flatter the validation score. A run's own fold split cannot give both
(each fold model but one trained on every other fold's people), so the teachers of a student's fold k are runs
made without fold k's people (``cv.leave_out=k``, same data, ``cv.folds`` and ``cv.seed``). Photos are matched
between runs by their real paths.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

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


def real_paths(paths) -> List[str]:
    return [os.path.realpath(p) for p in paths]


@dataclass
class Teacher:
    """One teacher run: its fold models' predictions on the photos they held out, and every photo it used."""

    root: str
    predictions: pd.DataFrame  # key (the photo's real path), fold (the model that predicted it), probabilities
    held_out_by: Dict[str, int]  # key -> the fold that held the photo out; -1: every fold model trained on it

    def blind_folds(self, keys: Sequence[str]) -> set:
        """The fold models that trained on none of the photos ``keys``: all of them when the run never used those
        photos, the one fold that held them out when only one did, none otherwise."""
        used = {self.held_out_by[k] for k in keys if k in self.held_out_by}
        models = set(self.predictions["fold"].unique())
        return models if not used else models & used if len(used) == 1 else set()


def load_teacher(run: RunDir, heads: Sequence[HeadConfig]) -> Teacher:
    if not run.is_run():
        raise ConfigError(f"teacher={run.root}: not a run directory (no config.yaml), nor a folder of runs")
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
    held_out = pd.concat([read_table(path, ["path"] + columns).assign(fold=k) for k, path in folds.items()],
                         ignore_index=True)
    used = read_table(run.data, ["path", "fold"])
    return Teacher(str(run.root), held_out.assign(key=real_paths(held_out["path"]))[["key", "fold"] + columns],
                   dict(zip(real_paths(used["path"]), used["fold"].astype(int))))


def load_teachers(runs: Sequence[str], heads: Sequence[HeadConfig], student: Optional[Path] = None) -> List[Teacher]:
    """Every teacher run: each entry is a run directory or a folder of them (an ``out_dir``, which may hold the
    ``student`` run itself: never its own teacher)."""
    own = Path(student).resolve() if student is not None else None
    found = []
    for entry in map(RunDir, runs):
        if entry.root.resolve() == own:
            raise ConfigError(f"teacher={entry.root}: the run itself; a run cannot teach itself")
        inside = [] if entry.is_run() or not entry.root.is_dir() else \
            [RunDir(p) for p in sorted(entry.root.iterdir())
             if RunDir(p).is_run() and p.resolve() != own]
        found += inside or [entry]
    return [load_teacher(run, heads) for run in found]


def teacher_targets(teachers: Sequence[Teacher], rows: pd.DataFrame, validation: pd.DataFrame) -> pd.DataFrame:
    """Per row of ``rows`` (same index), the mean over the ``teachers`` of their held-out class probabilities for
    its photo, from the fold models that trained on none of the ``validation`` photos; NaN where none predicted
    the photo."""
    columns = [c for c in teachers[0].predictions.columns if c not in ("key", "fold")]
    photos = pd.DataFrame({"key": real_paths(rows["path"])})
    unseen = real_paths(validation["path"])
    total, count = np.zeros((len(rows), len(columns))), np.zeros(len(rows))
    for teacher in teachers:
        usable = teacher.predictions[teacher.predictions["fold"].isin(teacher.blind_folds(unseen))]
        found = photos.merge(usable.drop_duplicates("key"), on="key", how="left")[columns].to_numpy()
        have = ~np.isnan(found).any(axis=1)
        total[have] += found[have]
        count[have] += 1
    with np.errstate(invalid="ignore"):  # 0/0: NaN, no teacher has the photo
        return pd.DataFrame((total / count[:, None]).astype(np.float32), index=rows.index, columns=columns)

"""Person-grouped folds, and which rows each stage of a fold trains and validates on."""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from multitask.config import Config, HeadConfig, StageConfig, stage
from multitask.data.sources import DataError, Problem


def person_constant_heads(table: pd.DataFrame, heads: List[HeadConfig]) -> List[HeadConfig]:
    """Heads whose label is the same on every photo of a person (gender, age; not mask)."""
    return [h for h in heads if table.groupby("person_id")[h.column].nunique().max() <= 1]


def make_folds(table: pd.DataFrame, heads: List[HeadConfig], n_folds: int, seed: int) -> pd.DataFrame:
    """person_id -> fold, by StratifiedGroupKFold: grouped by person, stratified on the person's labels that do
    not vary between their photos (gender x age for faces). Extra stage-1 sources get no fold (-1)."""
    main = table[~table["extra"]]
    strat_heads = person_constant_heads(main, heads)
    strat = np.zeros(len(main), dtype=np.int64)
    for h in strat_heads:
        strat = strat * len(h.classes) + main[h.column].to_numpy()
    n_people = main["person_id"].nunique()
    if n_people < n_folds:
        raise DataError([Problem("data", f"{n_people} persons cannot make {n_folds} folds")])
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = {}
    for k, (_, val) in enumerate(splitter.split(main, strat, groups=main["person_id"])):
        for pid in main["person_id"].iloc[val].unique():
            fold[pid] = k
    folds = pd.DataFrame({"person_id": list(fold), "fold": list(fold.values())})
    extra = table.loc[table["extra"], "person_id"].unique()
    return pd.concat([folds, pd.DataFrame({"person_id": extra, "fold": -1})], ignore_index=True)


def attach_folds(table: pd.DataFrame, folds: pd.DataFrame, source: Path) -> pd.DataFrame:
    number = pd.to_numeric(folds["fold"], errors="coerce")
    if number.isna().any() or (number % 1 != 0).any():
        raise DataError([Problem(str(source), "column fold holds values that are not fold numbers")])
    if folds["person_id"].duplicated().any():
        raise DataError([Problem(str(source), "a person is listed twice: "
                                              f"{folds['person_id'][folds['person_id'].duplicated()].iloc[0]}")])
    merged = table.merge(folds.astype({"person_id": str}), on="person_id", how="left")
    missing = merged.loc[merged["fold"].isna(), "person_id"].unique()
    if len(missing):
        raise DataError([Problem(str(source), f"persons not in the run's folds (did the data change?): "
                                               f"{list(missing[:10])}")])
    return merged.astype({"fold": int})


def stage_rows(table: pd.DataFrame, stage: StageConfig, heads: List[HeadConfig]) -> pd.Series:
    keep = pd.Series(True, index=table.index)
    by_name = {h.name: h for h in heads}
    for name, cls in stage.only.items():
        h = by_name[name]
        keep &= table[h.column] == h.classes.index(cls)
    return keep


def draw_weights(persons: np.ndarray, per_person: int) -> np.ndarray:
    """Each row's chance of being in an epoch that draws ``per_person`` photos of every person (0: all rows)."""
    if per_person <= 0:
        return np.ones(len(persons))
    _, person, counts = np.unique(persons, return_inverse=True, return_counts=True)
    return np.minimum(per_person, counts[person]) / counts[person]


def draw_per_person(persons: np.ndarray, per_person: int, seed: int) -> np.ndarray:
    """Row indices of one epoch: ``per_person`` photos of every person (all of a person who has fewer), drawn
    afresh from the epoch's seed, in row order; 0: every row."""
    if per_person <= 0:
        return np.arange(len(persons))
    order = np.random.default_rng(seed).permutation(len(persons))
    place = pd.Series(order).groupby(persons[order]).cumcount().to_numpy()  # place in the person's shuffled queue
    return np.sort(order[place < per_person])


def stage_split(cfg: Config, t: pd.DataFrame, fold: int, stage_no: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows, validation rows) of one stage of one fold."""
    keep = stage_rows(t, stage(cfg, stage_no), cfg.heads)
    train_rows = t[keep & (t["fold"] != fold) & (~t["stage1_only"] | (stage_no == 1))]
    if cfg.data.drop_train_ages and "age" in t:
        train_rows = train_rows[~train_rows["age"].isin(cfg.data.drop_train_ages)]
    return train_rows, t[keep & (t["fold"] == fold)]

"""Config -> the table of photos a run trains on, with every problem found, and the bad-file policy."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import pandas as pd

from multitask.config import Config, ConfigError, HeadConfig
from multitask.data.sources import (SOURCES, DataError, Problem, age_thresholds, detect_source, imagefolder_classes,
                                    load_source)
from multitask.data.synth import ensure_synthetic, ensure_synthetic_unmasked
from multitask.heads import kind
from multitask.tasks import FACE_AGE_THRESHOLDS, cut


def with_found_classes(cfg: Config) -> Config:
    """The config a run trains and saves: an image-folder head declared without classes gets the folder names
    (a copy; ``cfg`` itself is not changed)."""
    if cfg.data.source != "imagefolder" or len(cfg.heads) != 1 or cfg.heads[0].classes:
        return cfg
    out = copy.deepcopy(cfg)
    out.heads[0].classes = imagefolder_classes(resolve_root(cfg))
    return out


def synthetic_wh(cfg: Config) -> tuple[int, int]:
    """The generator's portrait size (width, height) from data.synthetic.size (height x width, like data.size)."""
    h, w = cfg.data.synthetic.size
    return w, h


def resolve_root(cfg: Config) -> Path:
    if cfg.data.source == "synthetic":
        if cfg.data.root:
            return Path(cfg.data.root)
        return ensure_synthetic(cfg.data.cache_dir, cfg.data.synthetic.people, synthetic_wh(cfg),
                                cfg.data.synthetic.seed, cfg.data.synthetic.anywhere)
    if not cfg.data.root:
        raise ConfigError(f"data.root is required for data.source={cfg.data.source}")
    if not Path(cfg.data.root).exists():
        raise DataError([Problem(str(cfg.data.root), "data.root does not exist")])
    return Path(cfg.data.root)


def load_table(cfg: Config) -> Tuple[pd.DataFrame, List[Problem]]:
    """The run's table (``extra`` marks stage-1-only rows) and every structural problem found (image folders: the
    head's classes must be the folders', see ``with_found_classes``)."""
    root = resolve_root(cfg)
    source = "competition" if cfg.data.source == "synthetic" else cfg.data.source
    table, problems, classes = load_source(source, root, age_thresholds(cfg.heads))
    if source == "imagefolder":
        table = table[table["split"] == "train"].reset_index(drop=True)
        if len(cfg.heads) != 1:
            raise ConfigError("data.source=imagefolder trains one head: use experiment=imagefolder")
        if list(cfg.heads[0].classes) != classes:
            raise ConfigError(f"heads[0].classes {cfg.heads[0].classes} differ from the folders {classes} in {root}")
    # extra: never validated (no fold); stage1_only: unmasked extras, kept out of the all-heads stage
    table = table.assign(extra=False, stage1_only=False)
    unmasked = list(cfg.data.extra_unmasked)
    if cfg.data.source == "synthetic" and not cfg.data.root and cfg.data.synthetic.unmasked > 0:
        unmasked.append(ensure_synthetic_unmasked(cfg.data.cache_dir, cfg.data.synthetic.unmasked,
                                                  synthetic_wh(cfg), cfg.data.synthetic.seed))
    extras = [(f, load_labeled, cfg.data.extra_unmasked_people, True) for f in unmasked]
    extras += [(f, load_labeled, cfg.data.extra_train_people, False) for f in cfg.data.extra_train]
    for i, (folder, load, people, stage1_only) in enumerate(extras):
        extra, extra_problems = load(Path(folder), age_thresholds(cfg.heads))
        problems += extra_problems
        extra = balanced_people(extra, people, cfg.cv.seed)
        extra = extra.assign(person_id=f"extra{i}:" + extra["person_id"].astype(str), extra=True,
                             stage1_only=stage1_only)
        table = pd.concat([table, extra], ignore_index=True)
    table = with_value_classes(table, cfg.heads, root)
    for i, h in enumerate(cfg.heads):  # a head that learns the value, or cuts its training classes from it
        if (kind(h).value is not None or h.train_thresholds) and h.value_column not in table.columns:
            raise ConfigError(f"heads.{i}.value_column={h.value_column}: not a column of the data of data.source="
                              f"{cfg.data.source} (its columns: {', '.join(map(str, table.columns))})")
    missing = [h.column for h in cfg.heads if h.column not in table.columns]
    if missing:
        raise ConfigError(f"heads read column(s) {missing}, which data.source={cfg.data.source} does not provide")
    absent = [c for c in cfg.report.subgroups if c not in table.columns]
    if absent:
        raise ConfigError(f"report.subgroups: column(s) {absent} are not in the data of data.source="
                          f"{cfg.data.source} (its columns: {', '.join(map(str, table.columns))})")
    for h in cfg.heads:
        if not pd.api.types.is_numeric_dtype(table[h.column]):  # a head of the user's own, e.g. a manifest column
            table[h.column] = class_indices(table[h.column], h.classes, f"{root}: column {h.column}")
    if table.empty:
        raise DataError(problems or [Problem(str(root), "no photos found")], str(root))
    return table, problems


def with_value_classes(table: pd.DataFrame, heads: Sequence[HeadConfig], root: Path) -> pd.DataFrame:
    """A head's value column (e.g. a manifest's own) as numbers, and the head's classes cut from it at its
    thresholds where the data has no class column for it; an empty value is unknown (class -1)."""
    for h in heads:
        if not h.value_column or h.value_column not in table:
            continue
        values = table[h.value_column]
        if not pd.api.types.is_numeric_dtype(values):
            text = values.astype("string").str.strip().fillna("")
            values = pd.to_numeric(text.replace("", None), errors="coerce")
            bad = sorted(text[values.isna() & (text != "")].unique())
            if bad:
                raise DataError([Problem(f"{root}: column {h.value_column}", f"values {bad[:10]} are not numbers")])
            table = table.assign(**{h.value_column: values.round().astype("Int64")})
        if h.column not in table and h.thresholds:
            table[h.column] = np.where(values.notna(), cut(values.fillna(0), h.thresholds), -1).astype(np.int64)
    return table


def class_indices(values: pd.Series, classes: Sequence[str], what: str) -> pd.Series:
    """Class names or indices (as text) -> indices; -1 (or empty) stays -1 (no label)."""
    index = {c.lower(): i for i, c in enumerate(classes)} | {str(i): i for i in range(len(classes))}
    index |= {"-1": -1, "": -1}
    out = values.astype(str).str.strip().str.lower().map(index)
    bad = sorted(values[out.isna()].astype(str).unique())
    if bad:
        raise DataError([Problem(what, f"values {bad[:10]} are not classes {list(classes)} or their indices")])
    return out.astype(np.int64)


def load_labeled(root: Path, thresholds=FACE_AGE_THRESHOLDS) -> Tuple[pd.DataFrame, List[Problem]]:
    """A labeled face set for extra training or validation (any source with mask labels: the competition
    layout, a labeled manifest, a folder per mask class, UTKFace-style names)."""
    root = Path(root)
    return load_source(labeled_source(root), root, thresholds)[:2]


def labeled_source(root: Path) -> str:
    """The layout of a labeled face set, or a DataError naming the folder."""
    if not root.exists():
        raise DataError([Problem(str(root), "does not exist")])
    source = detect_source(root)
    if "mask" not in SOURCES[source].labels:
        raise DataError([Problem(str(root), "not a labeled face set: expected the competition layout "
                                            "(train.csv), a manifest CSV, folders named by mask class or "
                                            "UTKFace-style names")])
    return source


def apply_policy(problems: List[Problem], policy: str, what: str) -> None:
    """``error``: raise with every problem listed; ``skip``: carry on (the caller records what was skipped)."""
    if problems and policy == "error":
        raise DataError(problems, f"{what} (data.on_bad_file=skip leaves these files out instead)")


def balanced_people(table: pd.DataFrame, people: int, seed: int, by: Sequence[str] = ("gender", "age_group")
                    ) -> pd.DataFrame:
    """All photos of ``people`` persons drawn evenly across the cells of ``by`` (gender x age group): cells
    take turns, so a small cell gives all it has and the others fill in. 0 or more than there are: everyone."""
    persons = table.drop_duplicates("person_id")[["person_id", *by]]
    if people <= 0 or people >= len(persons):
        return table
    rng = np.random.default_rng(seed)
    persons = persons.iloc[rng.permutation(len(persons))]
    turn = persons.groupby(list(by)).cumcount()  # the person's place in their cell's queue
    chosen = persons.assign(_turn=turn.to_numpy()).sort_values("_turn", kind="stable").head(people)
    return table[table["person_id"].isin(chosen["person_id"])]


def training_targets(cfg: Config, rows: pd.DataFrame) -> np.ndarray:
    """Per-head targets for training: the value (e.g. the age in years; -1 where unknown) for heads whose kind
    learns one; otherwise the class, cut from the value at the head's training thresholds where it has them
    (e.g. 58+ learned as 60+)."""
    cols = []
    for h in cfg.heads:
        values = rows[h.column].to_numpy(dtype=np.int64)
        if kind(h).value is not None:
            values = rows[h.value_column].astype("Int64").fillna(-1).to_numpy(dtype=np.int64)
        elif h.train_thresholds:
            values = cut(rows[h.value_column].to_numpy(dtype=np.int64), h.train_thresholds)
        cols.append(values)
    return np.stack(cols, axis=1)


def eval_targets(cfg: Config, rows: pd.DataFrame) -> np.ndarray:
    return np.stack([rows[h.column].to_numpy(dtype=np.int64) for h in cfg.heads], axis=1)

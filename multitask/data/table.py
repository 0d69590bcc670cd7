"""Config -> the table of photos a run trains on, with every problem found, and the bad-file policy."""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import pandas as pd

from multitask.config import Config, ConfigError
from multitask.data.sources import (DataError, Problem, load_competition, load_imagefolder, load_manifest,
                                    load_utkface)
from multitask.data.synth import ensure_synthetic


def detect_source(root: Path) -> str:
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".csv":
        return "manifest"
    if (root / "train.csv").is_file():
        return "competition"
    if root.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        return "imagefolder"
    return "utkface"


def load_source(source: str, root: Path, thresholds) -> Tuple[pd.DataFrame, List[Problem], List[str]]:
    """(table, problems, discovered class names: image folders only)."""
    if source == "competition":
        return (*load_competition(root, thresholds), [])
    if source == "manifest":
        return (*load_manifest(root, thresholds), [])
    if source == "utkface":
        return (*load_utkface(root, thresholds), [])
    if source == "imagefolder":
        return load_imagefolder(root)
    raise ConfigError(f"data.source={source!r}: unknown source")


def resolve_root(cfg: Config) -> Path:
    if cfg.data.source == "synthetic":
        if cfg.data.root:
            return Path(cfg.data.root)
        return ensure_synthetic(cfg.data.cache_dir, cfg.data.synthetic_people, cfg.data.synthetic_size,
                                cfg.data.synthetic_seed)
    if not cfg.data.root:
        raise ConfigError(f"data.root is required for data.source={cfg.data.source}")
    return Path(cfg.data.root)


def load_table(cfg: Config) -> Tuple[pd.DataFrame, List[Problem]]:
    """The run's table (``extra`` marks stage-1-only rows) and every structural problem found.

    Image folders fill in the class names of a single head declared without classes."""
    root = resolve_root(cfg)
    source = "competition" if cfg.data.source == "synthetic" else cfg.data.source
    table, problems, classes = load_source(source, root, cfg.data.age_thresholds)
    if source == "imagefolder":
        table = table[table["split"] == "train"].reset_index(drop=True)
        if len(cfg.heads) != 1:
            raise ConfigError("data.source=imagefolder trains one head: use experiment=imagefolder")
        if not cfg.heads[0].classes:
            cfg.heads[0].classes = classes
        elif list(cfg.heads[0].classes) != classes:
            raise ConfigError(f"heads[0].classes {cfg.heads[0].classes} differ from the folders {classes} in {root}")
    table = table.assign(extra=False)
    for folder in cfg.data.extra_unmasked:
        extra, extra_problems = load_utkface(Path(folder), cfg.data.age_thresholds)
        problems += extra_problems
        table = pd.concat([table, extra.assign(extra=True)], ignore_index=True)
    missing = [h.column for h in cfg.heads if h.column not in table.columns]
    if missing:
        raise ConfigError(f"heads read column(s) {missing}, which data.source={cfg.data.source} does not provide")
    if table.empty:
        raise DataError(problems or [Problem(str(root), "no photos found")], str(root))
    return table, problems


def apply_policy(problems: List[Problem], policy: str, what: str) -> None:
    """``error``: raise with every problem listed; ``skip``: carry on (the caller records what was skipped)."""
    if problems and policy == "error":
        raise DataError(problems, f"{what} (data.on_bad_file=skip leaves these files out instead)")

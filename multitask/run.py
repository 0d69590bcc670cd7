"""The run directory: what training writes and what report, predict, explain, bench and the dashboard read.

The one module that spells its files and the columns of its prediction tables:

    config.yaml  run.json  folds.csv  data.csv  skipped.csv
    fold<k>/stage<s>/  best.pt  metrics.csv  done.json  (last.pt while the stage trains)
    fold<k>/oof.csv  fold<k>/done.json  fold<k>/lock  fold<k>/extra_val/<set>.csv
    oof.csv  report.md  report.json  MODEL_CARD.md  plots/  tb/

Prediction tables (oof.csv, extra_val/*.csv, predict's predictions.csv) hold, per head, ``true_<head>`` (when
known), ``p_<head>_<class>`` per class, ``pred_<head>`` and, for heads that predict a value (the age, in years),
``value_<head>``.
"""
from __future__ import annotations

import re
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from multitask.config import Config, ConfigError, HeadConfig, config_dict, final_stage, load_config

if TYPE_CHECKING:  # the torch side is imported where models are loaded, so report and the dashboard start fast
    from multitask.data.transforms import Preprocessing
    from multitask.model import MultiHeadNet


def read_json(path: Path) -> dict:
    """A JSON object file of a run; anything else is one ConfigError line naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); was it cut short or edited?") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_table(path: Path, columns: Sequence[str] = ()) -> pd.DataFrame:
    """A CSV table of a run with at least ``columns``; anything else is one ConfigError line naming the file."""
    try:
        df = pd.read_csv(path, dtype={"person_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"{path}: not a table this project wrote ({type(e).__name__}: {first})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ConfigError(f"{path}: missing column(s) {missing}; was it written by another version or edited?")
    return df


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    # --- files of the whole run ---
    config = property(lambda self: self.root / "config.yaml")
    recorded_file = property(lambda self: self.root / "run.json")
    folds = property(lambda self: self.root / "folds.csv")
    data = property(lambda self: self.root / "data.csv")
    skipped = property(lambda self: self.root / "skipped.csv")
    oof = property(lambda self: self.root / "oof.csv")
    report_md = property(lambda self: self.root / "report.md")
    model_card = property(lambda self: self.root / "MODEL_CARD.md")
    report_json = property(lambda self: self.root / "report.json")
    plots = property(lambda self: self.root / "plots")
    tensorboard = property(lambda self: self.root / "tb")

    # --- files of one fold and stage ---
    def fold(self, k: int) -> Path:
        return self.root / f"fold{k}"

    def stage(self, k: int, s: int) -> Path:
        return self.fold(k) / f"stage{s}"

    def best(self, k: int, s: int) -> Path:
        return self.stage(k, s) / "best.pt"

    def last(self, k: int, s: int) -> Path:
        return self.stage(k, s) / "last.pt"

    def metrics(self, k: int, s: int) -> Path:
        return self.stage(k, s) / "metrics.csv"

    def stage_done(self, k: int, s: int) -> Path:
        return self.stage(k, s) / "done.json"

    def fold_oof(self, k: int) -> Path:
        return self.fold(k) / "oof.csv"

    def fold_done(self, k: int) -> Path:
        return self.fold(k) / "done.json"

    def lock(self, k: int) -> Path:
        return self.fold(k) / "lock"

    def extra_val(self, k: int, name: str) -> Path:
        return self.fold(k) / "extra_val" / f"{name}.csv"

    # --- what exists ---
    def is_run(self) -> bool:
        return self.config.exists()

    def is_damaged_run(self) -> bool:
        """A folder with a run's files but no config.yaml, the file every tool reads a run by."""
        return not self.is_run() and self.root.is_dir() and any(
            p.exists() for p in (self.recorded_file, self.folds, self.data, self.fold(0)))

    def load_config(self) -> Config:
        if not self.is_run():
            raise ConfigError(f"{self.root}: no config.yaml; not a run directory")
        try:
            text = self.config.read_text()
        except UnicodeDecodeError:
            raise ConfigError(f"{self.config}: not a text file") from None
        if not text.strip() or text.lstrip()[:1] in "[-" or ":" not in text:
            raise ConfigError(f"{self.config}: not a run's config (a run's config.yaml holds its whole resolved "
                              "config, as training wrote it)")
        if re.search(r"^  age_thresholds:", text, re.MULTILINE):
            raise ConfigError(f"{self.config}: a run of multitask 0.1 (age thresholds under data:, not on the age "
                              "head); read it with multitask 0.1.0 or train it again")
        return load_config(base=self.config)

    def recorded(self) -> dict:
        """What training recorded (run.json): learning rates used, weights loaded, devices, data root, typical
        face boxes."""
        return read_json(self.recorded_file) if self.recorded_file.exists() else {}

    def check_unedited(self, cfg: Config) -> None:
        """A resume continues the run as it started: config.yaml edited since (outside the predict and report
        sections, which only say how to use the models) is refused, naming the keys."""
        started = self.recorded().get("config")
        if not started:
            return
        now = flatten(config_dict(cfg))
        free = ("predict.", "report.", "train.progress", "cv.run_folds")
        changed = [(k, v, now.get(k)) for k, v in flatten(started).items() if not k.startswith(free) and now.get(k) != v]
        if changed:
            edits = "; ".join(f"{k}: {old} -> {new}" for k, old, new in changed[:5])
            raise ConfigError(f"{self.config}: edited since the run started ({edits}); --resume continues a run as "
                              "it started: undo the edit, or start a new run")

    def typical_face_boxes(self) -> Dict[tuple, tuple]:
        """(width, height) -> the median face of the run's photos of that size (``face_crop=detector|aligned``): how
        predict, explain and the dashboard crop a photo whose face is not found, as training did."""
        recorded = self.recorded().get("typical_face_boxes", {})
        return {tuple(int(v) for v in size.split("x")): tuple(box) for size, box in recorded.items()}

    def record_start(self, cfg: Config, *, weights_loaded: bool, learning_rates: tuple[float, float], processes: int,
                     device: str, precision: str, data_root: Path, typical: Dict[tuple, tuple], allocator: dict
                     ) -> None:
        """run.json, written once, when the run's first fold starts: what the run used, as ``recorded`` reads it.
        ``typical``: (width, height) -> the typical face box (then the five landmarks under ``aligned``)."""
        from multitask.io import atomic_write_text

        if self.recorded_file.exists():
            return
        atomic_write_text(self.recorded_file, json.dumps({
            "weights_loaded": weights_loaded, "lr_trunk": learning_rates[0], "lr_heads": learning_rates[1],
            "processes": processes, "batch_per_process": cfg.data.batch_size,
            "effective_batch": cfg.data.batch_size * processes, "lr_scaling": cfg.train.lr_scaling,
            "device": device, "precision": precision, "data_root": str(data_root),
            "typical_face_boxes": {f"{w}x{h}": list(box) for (w, h), box in typical.items()},
            "config": config_dict(cfg),  # as the run started: a resume checks config.yaml against it
            "allocator": allocator,
        }, indent=1))

    def preprocessing(self, cfg: Config):
        """The run's ``Preprocessing``: from its config, with its typical face boxes."""
        from multitask.data.transforms import Preprocessing

        return Preprocessing.from_config(cfg).with_typical(self.typical_face_boxes())

    def _per_fold(self, path_of) -> Dict[int, Path]:
        folds = sorted(int(p.name[4:]) for p in self.root.glob("fold*") if p.name[4:].isdigit())
        return {k: path_of(k) for k in folds if path_of(k).exists()}

    def fold_oofs(self) -> Dict[int, Path]:
        """fold -> oof.csv of every fold that has one."""
        return self._per_fold(self.fold_oof)

    def extra_vals(self, name: str) -> Dict[int, Path]:
        """fold -> that fold model's predictions on the extra validation set ``name``."""
        return self._per_fold(lambda k: self.extra_val(k, name))

    def fold_seconds(self) -> Dict[int, Optional[float]]:
        """fold -> training time of every finished fold."""
        return {k: read_json(p).get("seconds") for k, p in self._per_fold(self.fold_done).items()}

    def stage_metrics(self) -> Dict[tuple, Path]:
        """(fold, stage) -> metrics.csv of every stage that has trained an epoch, however many stages the run has."""
        stages = {int(p.name[5:]) for p in self.root.glob("fold*/stage*") if p.name[5:].isdigit()}
        return dict(sorted((((k, s), p) for s in stages
                            for k, p in self._per_fold(lambda k: self.metrics(k, s)).items())))

    def trained_folds(self, cfg: Config) -> List[int]:
        """Folds with a model: the best.pt of the final stage."""
        return sorted(self._per_fold(lambda k: self.best(k, final_stage(cfg))))

    def load_models(self, cfg: Config, folds: Optional[Sequence[int]] = None, device=None) -> dict:
        """fold -> the final stage's best model, in eval mode on ``device``."""
        import torch

        from multitask.model import WeightsError, build_model

        have = self.trained_folds(cfg)
        folds = list(folds) if folds else have
        missing = [k for k in folds if k not in have]
        if not have or missing:
            raise WeightsError(f"{self.root}: no trained checkpoint for fold(s) {missing or 'any'} (have {have})")
        model_cfg = type(cfg.model)(arch=cfg.model.arch, pretrained="none", dropout=cfg.model.dropout)
        models = {}
        for k in folds:
            model, _ = build_model(model_cfg, cfg.heads)
            load_weights(model, self.best(k, final_stage(cfg)), self.config)
            models[k] = model.to(device or torch.device("cpu")).eval()
        return models


@dataclass
class Member:
    """One run's part of a prediction: its config, fold models, preprocessing and test-time views."""

    run: RunDir
    cfg: Config
    models: Dict[int, "MultiHeadNet"]
    pre: "Preprocessing"
    views: List[tuple]

    def describe(self) -> str:
        """Which models predict, e.g. "faces-...: folds [0, 1, 2] x 2 view(s)"."""
        return f"{self.run.root.name}: folds {sorted(self.models)} x {len(self.views)} view(s)"


def load_weights(model, path: Path, config: Path) -> None:
    """A checkpoint's weights into a model built from the run's config; a file of another shape or kind is one
    WeightsError line naming it."""
    from multitask.model import WeightsError, check_finite, load_checkpoint

    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise WeightsError(f"{path}: not a checkpoint of this project (expected a dict with the model's weights)")
    check_finite(checkpoint["model"], path)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))[:200]
        raise WeightsError(f"{path}: does not fit the model {config} describes (was config.yaml edited, e.g. "
                           f"model.arch or heads?): {detail}") from None


def final_heads(cfg: Config) -> List[HeadConfig]:
    """The heads the final stage trained: the ones a run's models predict."""
    stage = cfg.stages[final_stage(cfg) - 1]
    return [h for h in cfg.heads if not stage.heads or h.name in stage.heads]


def check_same_classes(runs: Sequence[RunDir], cfgs: Sequence[Config]) -> None:
    """Runs whose predictions are averaged must predict the same heads, classes and age groups."""
    def classes(cfg: Config) -> list:
        return [(h.name, list(h.classes), list(h.thresholds)) for h in final_heads(cfg)]

    for run, cfg in zip(runs[1:], cfgs[1:]):
        if classes(cfg) != classes(cfgs[0]):
            raise ConfigError(f"{run.root}: its heads, classes or thresholds differ from {runs[0].root}'s; "
                              "runs averaged together must predict the same classes")


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are values."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --- prediction tables ---------------------------------------------------------------------------------


def subgroup_columns(cfg: Config) -> List[str]:
    """Columns of the data that out-of-fold tables keep for the report's subgroup scores."""
    return list(dict.fromkeys(["race", *cfg.report.subgroups]))


def prob_columns(head: HeadConfig) -> List[str]:
    return [f"p_{head.name}_{c}" for c in head.classes]


def true_column(head: HeadConfig) -> str:
    return f"true_{head.name}"


def pred_column(head: HeadConfig) -> str:
    return f"pred_{head.name}"


def value_prediction_column(head: HeadConfig) -> str:
    return f"value_{head.name}"


def prediction_frame(heads: Sequence[HeadConfig], base: pd.DataFrame, probs: Dict[str, np.ndarray],
                     preds: Optional[Dict[str, np.ndarray]] = None, targets: Optional[Dict[str, np.ndarray]] = None,
                     values: Optional[Dict[str, np.ndarray]] = None) -> pd.DataFrame:
    """``base`` (one row per photo) with, for each head in ``probs``: its true class (where ``targets`` has
    it), class probabilities, predicted class (``preds``, else the most probable) and predicted values."""
    df = base.reset_index(drop=True).copy()
    for h in heads:
        if h.name not in probs:
            continue
        if targets is not None and h.name in targets:
            df[true_column(h)] = targets[h.name]
        for col, p in zip(prob_columns(h), probs[h.name].T):
            df[col] = p
        df[pred_column(h)] = preds[h.name] if preds else probs[h.name].argmax(1)
        if values and h.name in values:
            df[value_prediction_column(h)] = np.round(values[h.name], 2)
    return df


def frame_arrays(heads: Sequence[HeadConfig], df: pd.DataFrame):
    """(targets, probabilities) per head from a prediction table."""
    targets = {h.name: df[true_column(h)].to_numpy(dtype=np.int64) for h in heads}
    probs = {h.name: df[prob_columns(h)].to_numpy(dtype=np.float64) for h in heads}
    return targets, probs


def mean_frame(frames: Sequence[pd.DataFrame], heads: Sequence[HeadConfig]) -> pd.DataFrame:
    """The first table with each head's probabilities (and predicted values, where any table has them)
    averaged over ``frames``, which hold the same photos in the same order, and the predicted class redone."""
    mean = frames[0].copy()
    for h in heads:
        mean[prob_columns(h)] = np.mean([f[prob_columns(h)].to_numpy() for f in frames], axis=0)
        mean[pred_column(h)] = mean[prob_columns(h)].to_numpy().argmax(1)
        values = [f[value_prediction_column(h)].to_numpy() for f in frames if value_prediction_column(h) in f]
        if values:
            mean[value_prediction_column(h)] = np.mean(values, axis=0)
    return mean


def labeled_heads(heads: Sequence[HeadConfig], df: pd.DataFrame) -> List[HeadConfig]:
    """The heads a prediction table has true classes for (a folder per mask class labels the mask only)."""
    return [h for h in heads if true_column(h) in df and (df[true_column(h)] >= 0).any()]

"""``python -m multitask.predict --run RUN_DIR INPUT --out OUT_DIR``: fold ensemble + TTA on new photos.

``--run`` may be given several times: the runs' ensembles are averaged, each run counting once (runs of
different trunks or recipes make different mistakes; each run keeps its own preprocessing). They must predict
the same heads and classes.

INPUT: an image, a folder of images (recursively), a manifest CSV (``path`` column, labels optional), the
competition's train layout (labeled) or its evaluation layout (``info.csv`` with ``ImageID,ans`` + ``images/``).
Writes ``predictions.csv``; ``submission.csv`` for the evaluation layout; ``report.md``/``report.json`` and
confusion matrices when the input has labels. Preprocessing is the run's validation transform, read from the
run's saved config.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from multitask.config import PRIORS  # torch-free: --help and usage errors stay fast


def parse_folds(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--folds {text!r}: expected e.g. 0,2") from None


def parse_prior(text: str) -> tuple[str, str]:
    head, _, prior = text.partition("=")
    if not head or prior not in PRIORS:
        raise argparse.ArgumentTypeError(f"--prior {text!r}: expected HEAD=" + " or HEAD=".join(PRIORS))
    return head, prior


def cli() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m multitask.predict", description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True, action="append",
                   help="run directory of python -m multitask.train; repeat to average several runs")
    p.add_argument("input", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--folds", type=parse_folds, help="e.g. 0,2 (default: every trained fold; of every run)")
    p.add_argument("--ensemble", choices=["mean", "vote"], help="default: the run's predict.ensemble")
    p.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="average with mirrored photos (default: the run's predict.tta_flip)")
    p.add_argument("--prior", type=parse_prior, action="append", default=[], metavar="HEAD=PRIOR",
                   help="the class frequencies a head's probabilities assume, instead of the run's heads[i].prior: "
                        "balanced (as its class weights taught) or training (as in the training photos); "
                        "repeatable, e.g. --prior mask=balanced")
    p.add_argument("--batch-size", type=int, default=128)
    return p


if __name__ == "__main__":
    cli().parse_args()  # --help and usage errors answer before torch, pandas and the rest are imported

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from multitask.config import Config, ConfigError, check_ranges  # noqa: E402
from multitask.data.dataset import cached_images, preprocessing  # noqa: E402
from multitask.data.images import is_image_name  # noqa: E402
from multitask.data.sources import (DataError, Problem, detect_source, image_files, load_manifest,  # noqa: E402
                                    load_source, read_csv_or_fail)
from multitask.data.transforms import Preprocessing  # noqa: E402
from multitask.engine import (Runtime, configure_threads, loader_workers, predict_views,  # noqa: E402
                              resolve_device, tta_views)
from multitask.io import atomic_to_csv, atomic_write_text  # noqa: E402
from multitask.metrics import joint_name  # noqa: E402
from multitask.model import MultiHeadNet, WeightsError  # noqa: E402
from multitask.report import labeled_scores, per_class_table, write_confusions  # noqa: E402
from multitask.run import RunDir, check_same_classes, final_heads, prediction_frame, true_column  # noqa: E402
from multitask.tasks import joint_class_names, joint_label  # noqa: E402


def predict_arrays(models: Dict[int, MultiHeadNet], images: np.ndarray, cfg: Config, device: torch.device,
                   views: Sequence[tuple], batch_size: int = 128, progress: bool = False
                   ) -> Dict[int, tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]]:
    """Per fold: (per head the class probabilities, per head that predicts them the years) of prepared photos
    (N x H x W x 3 uint8), averaged over views."""
    rt, pre = Runtime.on(device, cfg.train), Preprocessing.from_config(cfg)
    workers = loader_workers(cfg.data.workers, device, True)
    return {k: predict_views(model, images, pre, views, rt, batch_size, workers, progress, desc=f"fold {k}")
            for k, model in models.items()}


def ensemble(per_run: Sequence[Dict[int, Dict[str, np.ndarray]]], how: str = "mean") -> tuple[dict, dict]:
    """(probabilities per head, predicted class per head) of runs' fold predictions (one dict fold -> head ->
    probabilities per run). Probabilities: ``mean_of_runs``. ``vote``: the majority of every fold model's class,
    ties broken by those probabilities."""
    probs = mean_of_runs(per_run)
    if how == "mean":
        return probs, {h: p.argmax(1) for h, p in probs.items()}
    preds = {}
    for h, p in probs.items():
        votes = sum(np.eye(p.shape[1])[f[h].argmax(1)] for folds in per_run for f in folds.values())
        preds[h] = (votes + p * 1e-3).argmax(1)
    return probs, preds


def mean_of_runs(per_run: Sequence[Dict[int, Dict[str, np.ndarray]]]) -> Dict[str, np.ndarray]:
    """Per head: the mean of the runs' fold means, over the runs that have that head (class probabilities: every
    run; predicted years: the runs whose head predicts them), so each run counts once however many folds it has."""
    means = [{h: np.mean([f[h] for f in folds.values()], axis=0) for h in next(iter(folds.values()))}
             for folds in per_run]
    return {h: np.mean([m[h] for m in means if h in m], axis=0) for h in dict.fromkeys(h for m in means for h in m)}


# --- inputs ----------------------------------------------------------------------------------------------


def read_input(path: Path, cfg: Config) -> tuple[pd.DataFrame, str, List[Problem]]:
    """(table with a ``path`` column and labels when known, kind, structural problems)."""
    path = Path(path)
    if not path.exists():
        raise DataError([Problem(str(path), "input does not exist")])
    if path.is_file() and path.suffix.lower() == ".csv":
        table, problems = load_manifest(path, cfg.data.age_thresholds, require_labels=False)
        return table, "manifest", problems
    if path.is_file():
        if not is_image_name(path):
            raise DataError([Problem(str(path), "not an image file")])
        return pd.DataFrame({"path": [str(path.resolve())]}), "image", []
    if (path / "info.csv").is_file():
        info = read_csv_or_fail(path / "info.csv", "missing")
        if "ImageID" not in info.columns:
            raise DataError([Problem(str(path / "info.csv"), "missing column ImageID (expected ImageID,ans)")])
        table = info.assign(path=[str((path / "images" / i).resolve()) for i in info["ImageID"]])
        problems = [Problem(p, "listed in info.csv but does not exist") for p in table["path"]
                    if not Path(p).is_file()]
        return table, "evaluation", problems
    source = detect_source(path)
    if source in ("competition", "mask_folders"):  # labeled: scored (a folder per mask class: the mask head)
        table, problems, _ = load_source(source, path, cfg.data.age_thresholds)
        return table, source, problems
    files = image_files(path)
    if not files:
        raise DataError([Problem(str(path), "no image files found")])
    return pd.DataFrame({"path": [str(p.resolve()) for p in files]}), "folder", []


def predictions_frame(cfg: Config, table: pd.DataFrame, probs: dict, preds: dict, years: dict) -> pd.DataFrame:
    """predictions.csv: the input's rows, the run's prediction columns (true classes where the input has
    labels; years where a head predicts them), each head's class name, and the joint label (the competition's
    18-class ``ans``)."""
    heads = [h for h in cfg.heads if h.name in probs]
    targets = {h.name: table[h.column].astype(np.int64).to_numpy() for h in heads if h.column in table.columns
               and table[h.column].notna().all() and (table[h.column].astype(np.int64) >= 0).all()}
    df = prediction_frame(heads, table, probs, preds, targets, years)
    for h in heads:
        df[h.name + "_class"] = [h.classes[i] for i in preds[h.name]]
    df["label"] = joint_label(heads, preds)
    df["label_name"] = [joint_class_names(heads)[i] for i in df["label"]]
    df["label_prob"] = np.prod([probs[h.name][np.arange(len(df)), preds[h.name]] for h in heads], axis=0)
    return df


def write_labeled_report(cfg: Config, heads, df: pd.DataFrame, out: Path) -> dict:
    """Scores of the labeled heads (all of them, or only the mask for a folder per mask class)."""
    scores = labeled_scores(heads, df)
    acc = scores.get("mask", {}).get("mask_on_accuracy")
    extra = [] if acc is None else ["", f"Mask on the face (worn or incorrectly) vs not worn: accuracy {acc:.4f}"]
    plots = write_confusions(scores, heads, out / "plots")
    keys = list(scores)
    name = lambda k: joint_name(heads) if k == "joint" else k  # noqa: E731
    lines = [f"# Prediction report: {len(df)} labeled photos", "",
             "| | " + " | ".join(name(k) for k in keys) + " |", "|---" * (len(keys) + 1) + "|",
             "| macro-F1 | " + " | ".join(f"{scores[k]['f1_macro']:.4f}" for k in keys) + " |",
             "| accuracy | " + " | ".join(f"{scores[k]['accuracy']:.4f}" for k in keys) + " |"]
    lines += extra + per_class_table(scores, heads) + [""] + [f"![{p}](plots/{p})" for p in plots]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "report.json", json.dumps(scores, indent=1))
    return scores


def with_priors(cfg: Config, priors: Sequence[tuple[str, str]], run: RunDir) -> Config:
    names = [h.name for h in cfg.heads]
    for head, prior in priors:
        if head not in names:
            raise ConfigError(f"--prior {head}={prior}: {run.root} has no head {head!r} (heads: {', '.join(names)})")
        cfg.heads[names.index(head)].prior = prior
    check_ranges(cfg)  # e.g. training on a head without class weights
    return cfg


def prepared_photos(run: RunDir, cfg: Config, paths: List[str]) -> tuple:
    """(prepared photos, unreadable ones, face found per photo or None): the photos as ``run`` prepares them."""
    if not paths:
        return None, [], None
    pre, face_found = preprocessing(cfg, paths, lambda s: None, run.typical_face_boxes())
    images, unreadable = cached_images(paths, pre.prepare, Path(cfg.data.cache_dir), log=lambda s: None)
    return images, unreadable, face_found


def predict(run_dirs: Union[Path, Sequence[Path]], input_path: Path, out: Path,
            folds: Optional[Sequence[int]] = None, how: Optional[str] = None, flip: Optional[bool] = None,
            batch_size: int = 128, progress: bool = True, log=print,
            priors: Sequence[tuple[str, str]] = ()) -> pd.DataFrame:
    """``priors``: (head, balanced | training) pairs that replace the runs' ``heads[i].prior``."""
    runs = [RunDir(r) for r in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    cfgs = [with_priors(run.load_config(), priors, run) for run in runs]
    check_same_classes(runs, cfgs)
    cfg = cfgs[0]
    how = how or cfg.predict.ensemble
    if how not in ("mean", "vote"):
        raise ConfigError(f"ensemble {how!r}: must be mean or vote")
    device = resolve_device(cfg.train.device)
    table, kind, problems = read_input(input_path, cfg)
    models = [run.load_models(c, folds, device) for run, c in zip(runs, cfgs)]
    for run, c, fold_models in zip(runs, cfgs, models):
        unweighted = [h.name for h in c.heads if h.prior == "training" and h.name in dict(priors)
                      and all((m.heads[h.name].class_weights == 1).all() for m in fold_models.values())]
        if unweighted:
            log(f"note: {run.root.name}: {', '.join(unweighted)} trained with class weights of 1 (or by a version "
                "that did not keep them): prior training changes nothing there")
    missing = {p.path for p in problems}
    todo = table[~table["path"].isin(missing)].reset_index(drop=True)
    prepared = [prepared_photos(run, c, todo["path"].tolist()) for run, c in zip(runs, cfgs)]
    face_found = next((found for _, _, found in prepared if found is not None), None)
    if face_found is not None:
        todo = todo.assign(face_found=face_found)  # False: no face found; the typical box or the centre crop
    unreadable = list({p.path: p for _, bad, _ in prepared for p in bad}.values())
    problems = problems + unreadable
    if problems and kind == "evaluation":
        raise DataError(problems, f"{input_path} (the submission needs every image)")
    keep = ~todo["path"].isin({p.path for p in unreadable}).to_numpy()
    todo = todo[keep].reset_index(drop=True)
    out.mkdir(parents=True, exist_ok=True)
    if problems:
        atomic_to_csv(pd.DataFrame([p.__dict__ for p in problems]).rename(columns={"message": "reason"}),
                      out / "skipped.csv")
    if todo.empty:
        raise DataError(problems, f"{input_path}: no photo could be predicted (reasons in {out / 'skipped.csv'})")
    views = [tta_views(c.predict, flip) for c in cfgs]
    per_run = [predict_arrays(m, np.asarray(images)[keep], c, device, v, batch_size, progress)
               for m, (images, _, _), c, v in zip(models, prepared, cfgs, views)]
    probs, preds = ensemble([{k: p for k, (p, _) in folds.items()} for folds in per_run], how)
    years = mean_of_runs([{k: y for k, (_, y) in folds.items()} for folds in per_run])
    df = predictions_frame(cfg, todo, probs, preds, years)
    atomic_to_csv(df, out / "predictions.csv")
    if kind == "evaluation":
        atomic_to_csv(pd.DataFrame({"ImageID": todo["ImageID"], "ans": df["label"]}), out / "submission.csv")
    labeled = [h for h in final_heads(cfg) if true_column(h) in df.columns]
    if labeled:
        scores = write_labeled_report(cfg, labeled, df, out)
        log("macro-F1: " + ", ".join(f"{k} {v['f1_macro']:.4f}" for k, v in scores.items()))
    used = "; ".join(f"{run.root.name}: folds {sorted(m)} x {len(v)} view(s)"
                     for run, m, v in zip(runs, models, views))
    log(f"{len(df)} photos predicted ({how}) by {used}; {len(problems)} skipped"
        + (f" (see {out / 'skipped.csv'})" if problems else "") + f"; wrote {out}")
    return df


def main(argv=None) -> int:
    p = cli()
    a = p.parse_args(argv)
    try:
        configure_threads(RunDir(a.run[0]).load_config().train)
        predict(a.run, a.input, a.out, a.folds, a.ensemble, a.tta_flip, a.batch_size, progress=sys.stderr.isatty(),
                priors=a.prior)
    except (ConfigError, DataError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

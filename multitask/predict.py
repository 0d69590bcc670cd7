"""``multitask predict --run RUN_DIR INPUT --out OUT_DIR``: fold ensemble + TTA on new photos.

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
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from multitask.cli import guarded, parse_folds, positive
from multitask.config import ENSEMBLES, PRIORS  # torch-free: --help and usage errors stay fast


def parse_prior(text: str) -> tuple[str, str]:
    head, _, prior = text.partition("=")
    if not head or prior not in PRIORS:
        raise argparse.ArgumentTypeError(f"--prior {text!r}: expected HEAD=" + " or HEAD=".join(PRIORS))
    return head, prior


def cli() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="multitask predict", description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True, action="append",
                   help="run directory of multitask train; repeat to average several runs")
    p.add_argument("input", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--folds", type=parse_folds, help="e.g. 0,2 (default: every trained fold; of every run)")
    p.add_argument("--ensemble", choices=ENSEMBLES, help="default: the run's predict.ensemble")
    p.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="average with mirrored photos (default: the run's predict.tta_flip)")
    p.add_argument("--prior", type=parse_prior, action="append", default=[], metavar="HEAD=PRIOR",
                   help="the class frequencies a head's probabilities assume, instead of the run's heads[i].prior: "
                        "balanced (as its class weights taught) or training (as in the training photos); "
                        "repeatable, e.g. --prior mask=balanced")
    p.add_argument("--batch-size", type=positive, default=128)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier prediction in --out (its files "
                   "only; other files stay)")
    return p


if __name__ == "__main__":
    cli().parse_args()  # --help and usage errors answer before torch, pandas and the rest are imported

import pandas as pd  # noqa: E402

from multitask.api import Predictor, load_run  # noqa: E402
from multitask.config import Config  # noqa: E402
from multitask.data.images import is_image_name, not_an_image  # noqa: E402
from multitask.data.sources import (DataError, Problem, age_thresholds, detect_source, image_files,  # noqa: E402
                                    inside, load_manifest, load_source, read_csv_or_fail)
from multitask.engine import configure_threads  # noqa: E402
from multitask.io import atomic_to_csv, atomic_write_text, staged_output  # noqa: E402
from multitask.metrics import label  # noqa: E402
from multitask.plots import write_confusions  # noqa: E402
from multitask.report import labeled_scores, per_class_table  # noqa: E402
from multitask.run import RunDir, true_column  # noqa: E402


# --- inputs ----------------------------------------------------------------------------------------------


def read_input(path: Path, cfg: Config) -> tuple[pd.DataFrame, str, List[Problem]]:
    """(table with a ``path`` column and labels when known, kind, structural problems)."""
    path = Path(path)
    if not path.exists():
        raise DataError([Problem(str(path), "input does not exist")])
    if path.name == "train.csv" and (path.parent / "images").is_dir():
        path = path.parent  # the competition layout's table: its folder is the layout
    if path.is_file() and path.suffix.lower() == ".csv":
        table, problems = load_manifest(path, age_thresholds(cfg.heads), require_labels=False)
        return table, "manifest", problems
    if path.is_file():
        if not is_image_name(path):
            raise DataError([Problem(str(path), not_an_image())])
        return pd.DataFrame({"path": [os.path.abspath(path)]}), "image", []
    if (path / "info.csv").is_file():
        info = read_csv_or_fail(path / "info.csv", "missing")
        if "ImageID" not in info.columns:
            raise DataError([Problem(str(path / "info.csv"), "missing column ImageID (expected ImageID,ans)")])
        outside = [f"line {n + 2}: ImageID {i!r}" for n, i in enumerate(info["ImageID"])
                   if inside(path / "images", i) is None]
        if outside:
            raise DataError([Problem(str(path / "info.csv"), f"{where} leads outside {path / 'images'}")
                             for where in outside])
        table = info.assign(path=[str((path / "images" / i).resolve()) for i in info["ImageID"]])
        problems = [Problem(p, "listed in info.csv but does not exist") for p in table["path"]
                    if not Path(p).is_file()]
        return table, "evaluation", problems
    source = detect_source(path)
    if source in ("competition", "mask_folders"):  # labeled: scored (a folder per mask class: the mask head)
        table, problems, _ = load_source(source, path, age_thresholds(cfg.heads))
        return table, source, problems
    files = image_files(path)
    if not files:
        raise DataError([Problem(str(path), "no image files found")])
    # absolute, links not followed: a photo is named as the user's folder names it (a broken link too)
    return pd.DataFrame({"path": [os.path.abspath(p) for p in files]}), "folder", []


def write_labeled_report(cfg: Config, heads, df: pd.DataFrame, out: Path) -> dict:
    """Scores of the labeled heads (all of them, or only the mask for a folder per mask class)."""
    scores = labeled_scores(heads, df)
    extra = [f"{h.name}: any other class vs {h.absent}: accuracy {scores[h.name]['on_accuracy']:.4f}"
             for h in heads if "on_accuracy" in scores.get(h.name, {})]
    extra = ["", *extra] if extra else []
    plots = write_confusions(scores, heads, out / "plots")
    keys = list(scores)
    lines = [f"# Prediction report: {len(df)} labeled photos", "",
             "| | " + " | ".join(label(k, heads) for k in keys) + " |", "|---" * (len(keys) + 1) + "|",
             "| macro-F1 | " + " | ".join(f"{scores[k]['f1_macro']:.4f}" for k in keys) + " |",
             "| accuracy | " + " | ".join(f"{scores[k]['accuracy']:.4f}" for k in keys) + " |"]
    lines += extra + per_class_table(scores, heads) + [""] + [f"![{p}](plots/{p})" for p in plots]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "report.json", json.dumps(scores, indent=1))
    return scores


def unweighted_priors(predictor: Predictor, priors: Sequence[tuple[str, str]]) -> List[str]:
    """Notes for --prior HEAD=training on heads that trained without class weights: nothing to take out."""
    notes = []
    for m in predictor.members:
        unweighted = [h.name for h in m.cfg.heads if h.prior == "training" and h.name in dict(priors)
                      and all((model.heads[h.name].class_weights == 1).all() for model in m.models.values())]
        if unweighted:
            notes.append(f"note: {m.run.root.name}: {', '.join(unweighted)} trained with class weights of 1 (or by a "
                         "version that did not keep them): prior training changes nothing there")
    return notes


def pace(seconds: Dict[str, float], photos: int) -> str:
    """One line: photos/s over the steps timed, and each step's seconds (cached faces and framings cost ~0)."""
    total = sum(seconds.values())
    steps = ", ".join(f"{step} {s:.1f} s" for step, s in seconds.items())
    return f"{photos / max(total, 1e-9):.1f} photos/s ({steps})"


def predict_into(predictor: Predictor, input_path: Path, out: Path, progress: bool, log
                 ) -> tuple[pd.DataFrame, List[Problem]]:
    """Every output of one prediction written into the (staged) folder ``out``: (predictions, skipped photos)."""
    table, kind, problems = read_input(input_path, predictor.cfg)
    missing = {p.path for p in problems}
    todo = table[~table["path"].isin(missing)].reset_index(drop=True)
    prepared = predictor.frame_files(todo["path"].tolist())
    if prepared.face_found is not None:
        todo = todo.assign(face_found=prepared.face_found)  # False: no face found; the typical box or centre crop
    problems = problems + prepared.unreadable
    if problems and kind == "evaluation":
        raise DataError(problems, f"{input_path} (the submission needs every image)")
    keep = ~todo["path"].isin({p.path for p in prepared.unreadable}).to_numpy()
    todo = todo[keep].reset_index(drop=True)
    if todo.empty:
        raise DataError(problems, f"{input_path}: no photo could be predicted")
    if problems:
        atomic_to_csv(pd.DataFrame([p.__dict__ for p in problems]).rename(columns={"message": "reason"}),
                      out / "skipped.csv")
    df = predictor.predict_framed([images[keep] for images in prepared.images], todo, progress)
    atomic_to_csv(df, out / "predictions.csv")
    if kind == "evaluation":
        atomic_to_csv(pd.DataFrame({"ImageID": todo["ImageID"], "ans": df["label"]}), out / "submission.csv")
    labeled = [h for h in predictor.heads if true_column(h) in df.columns]
    if labeled:
        scores = write_labeled_report(predictor.cfg, labeled, df, out)
        log("macro-F1: " + ", ".join(f"{k} {v['f1_macro']:.4f}" for k, v in scores.items()))
    return df, problems


PREDICT_OUTPUTS = ["predictions.csv", "submission.csv", "skipped.csv", "report.md", "report.json", "plots"]


def predict(run_dirs: Union[Path, Sequence[Path]], input_path: Path, out: Path,
            folds: Optional[Sequence[int]] = None, how: Optional[str] = None, flip: Optional[bool] = None,
            batch_size: int = 128, progress: bool = True, log=print,
            priors: Sequence[tuple[str, str]] = (), overwrite: bool = False) -> pd.DataFrame:
    """``priors``: (head, balanced | training) pairs that replace the runs' ``heads[i].prior``. ``out`` must be
    new or empty, unless ``overwrite``: two predictions never mix their files, and a failed one leaves ``out`` as it
    was (``io.staged_output``)."""
    predictor = load_run(run_dirs, folds, ensemble=how, tta_flip=flip, priors=priors, batch_size=batch_size)
    for note in unweighted_priors(predictor, priors):
        log(note)
    with staged_output(out, PREDICT_OUTPUTS, overwrite, "predict") as staging:
        df, problems = predict_into(predictor, input_path, staging, progress, log)
    log(f"{len(df)} photos predicted ({predictor.how}) by {predictor.describe()}; {len(problems)} skipped"
        + (f" (see {out / 'skipped.csv'})" if problems else "") + f"; wrote {out}")
    log(pace(predictor.seconds, len(df)))
    return df


@guarded
def main(argv=None) -> int:
    p = cli()
    a = p.parse_args(argv)
    configure_threads(RunDir(a.run[0]).load_config().train)
    predict(a.run, a.input, a.out, a.folds, a.ensemble, a.tta_flip, a.batch_size, progress=sys.stderr.isatty(),
            priors=a.prior, overwrite=a.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())

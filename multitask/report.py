"""Fold results -> report.md, report.json and PNG plots (confusion matrices, learning curves).

Reads the run directory only, so a report can be rebuilt at any time: ``multitask report RUN_DIR``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from multitask.cli import guarded


def cli() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="multitask report",
                                description="Rebuild a run's report, or score several runs' average (--out).")
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", type=Path, help="with several runs: where the report of their average goes")
    return p


if __name__ == "__main__":
    cli().parse_args()  # --help and usage errors answer before matplotlib, pandas and the rest are imported

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from multitask.config import Config, ConfigError, HeadConfig, extra_val_names  # noqa: E402
from multitask.heads import kind  # noqa: E402
from multitask.io import atomic_to_csv, atomic_write_text  # noqa: E402
from multitask.metrics import JOINT, joint_name, label, score  # noqa: E402
from multitask.model_card import model_card  # noqa: E402
from multitask.run import (RunDir, check_same_classes, final_heads, frame_arrays, labeled_heads,  # noqa: E402
                           mean_frame, pred_column, prob_columns, read_table, true_column,
                           value_prediction_column)
from multitask.plots import plot_curves, write_confusions  # noqa: E402
from multitask.subgroups import subgroup_lines, subgroup_results  # noqa: E402


def collect_oof(run: RunDir, heads: Sequence[HeadConfig]) -> pd.DataFrame:
    columns = ["path", "person_id", "fold", "views"] + [c for h in heads for c in (true_column(h), *prob_columns(h))]
    parts = [read_table(p, columns) for p in run.fold_oofs().values()]
    if not parts:
        raise ConfigError(f"{run.root}: no fold*/oof.csv yet; has a fold finished?")
    return pd.concat(parts, ignore_index=True)


def per_class_table(scores: dict, heads) -> List[str]:
    lines = []
    for key, s in scores.items():
        lines += [f"\n**{label(key, heads)}**\n", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        lines += [f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
                  for c, v in s["per_class"].items()]
    return lines


def summarize(cfg: Config, heads: Sequence[HeadConfig], oof: pd.DataFrame) -> dict:
    folds = {}
    for k, part in oof.groupby("fold"):
        folds[int(k)] = score(heads, *frame_arrays(heads, part))
    keys = list(next(iter(folds.values())))
    mean = {k: {m: float(np.mean([f[k][m] for f in folds.values()])) for m in ("f1_macro", "accuracy")} for k in keys}
    std = {k: {m: float(np.std([f[k][m] for f in folds.values()])) for m in ("f1_macro", "accuracy")} for k in keys}
    pooled = score(heads, *frame_arrays(heads, oof))
    return {"folds": folds, "mean": mean, "std": std, "pooled": pooled}


def on_accuracy(true: np.ndarray, pred: np.ndarray, absent: int) -> float:
    """Accuracy of "present (any other class)" against "absent" (for the mask head: a mask on the face, worn or
    incorrect, against not worn: the mistake that matters most)."""
    return float(np.mean((true == absent) == (pred == absent))) if len(true) else float("nan")


def head_on_accuracy(head: HeadConfig, true: np.ndarray, df: pd.DataFrame) -> Optional[float]:
    if head.absent is None:
        return None
    known = true >= 0
    return on_accuracy(true[known], df[pred_column(head)].to_numpy()[known], head.classes.index(head.absent))


def value_errors(head: HeadConfig, df: pd.DataFrame) -> Optional[pd.Series]:
    """|predicted - true value| of the rows whose value is known; None where the table lacks either column."""
    if head.value_column not in df or value_prediction_column(head) not in df:
        return None
    known = df[head.value_column].notna()
    return (df.loc[known, value_prediction_column(head)] - df.loc[known, head.value_column].astype(float)).abs()


def head_value_mae(head: HeadConfig, true: np.ndarray, df: pd.DataFrame) -> Optional[float]:
    err = value_errors(head, df)
    return None if err is None or err.empty else float(err.mean())


# The extra scores a head kind declares (heads.HeadKind.metrics): (head, true classes, prediction table) -> score,
# None where the head or the table lacks what the score needs
HEAD_METRICS = {"on_accuracy": head_on_accuracy, "value_mae": head_value_mae}


def labeled_scores(heads: Sequence[HeadConfig], df: pd.DataFrame) -> dict:
    """Scores of a prediction table's labeled heads, with the extra scores their kinds declare (from its
    ``pred_<head>`` classes: a vote ensemble's, where predict wrote one)."""
    targets, probs = frame_arrays(heads, df)
    s = score(heads, targets, probs)
    for h in heads:
        for metric in kind(h).metrics:
            value = HEAD_METRICS[metric](h, targets[h.name], df)
            if value is not None:
                s[h.name][metric] = value
    return s


def extra_val_frames(run: RunDir, cfg: Config) -> Dict[str, Dict[int, pd.DataFrame]]:
    """Extra validation set -> fold -> that fold model's predictions on it."""
    sets = {name: run.extra_vals(name) for name in extra_val_names(cfg.data)}
    return {name: {k: read_table(p, ["path", "views"]) for k, p in paths.items()}
            for name, paths in sets.items() if paths}


def extra_val_scores(sets: Dict[str, Dict[object, pd.DataFrame]], heads: Sequence[HeadConfig]) -> dict:
    """name -> {"folds": {member: scores}, "ensemble": scores of the members' mean} for each extra validation
    set (members: a run's folds, or runs), on its labeled heads (a folder per mask class labels the mask only);
    mask scores add ``mask_on_accuracy``."""
    out = {}
    for name, frames in sets.items():
        first = next(iter(frames.values()))
        labeled = labeled_heads(heads, first)
        if not labeled:
            continue
        out[name] = {"photos": len(first), "heads": [h.name for h in labeled],
                     "folds": {k: labeled_scores(labeled, f) for k, f in frames.items()},
                     "ensemble": labeled_scores(labeled, mean_frame(list(frames.values()), labeled))}
    return out


def views_used(sets: Dict[str, Dict[object, pd.DataFrame]]) -> set:
    """The test-time views per photo the folds scored the sets with."""
    return {int(f["views"].iloc[0]) for frames in sets.values() for f in frames.values()}


def views_text(used: set) -> str:
    return " or ".join(str(v) for v in sorted(used))


def oof_views(oof: pd.DataFrame) -> set:
    """The test-time views per photo of out-of-fold predictions."""
    return set(oof["views"].astype(int))


def views_sentence(used: set, predict_views: int, so: str) -> str:
    if used == {predict_views}:
        return (f"with the test-time views predict uses ({predict_views} per photo: predict.tta_flip, tta_scales), so "
                f"{so}.")
    return (f"with test-time views per photo: {views_text(used)}, where predict uses {predict_views} "
            "(predict.tta_flip, tta_scales): predict's scores on the same photos may differ a little.")


def runs_views_sentence(views: Sequence[tuple], so: str) -> str:
    """``views``: (run name, views its predictions used, views its predict uses) per run."""
    if all(used == {predicts} for _, used, predicts in views):
        return f"every run with the test-time views its predict uses, so {so}."
    return ("with these test-time views per photo (each run's predict uses, in brackets): " + ", ".join(
        f"`{name}` {views_text(used)} ({predicts})" for name, used, predicts in views)
        + "; predict's scores on the same photos may differ a little.")


def extra_val_lines(results: dict, heads: Sequence[HeadConfig], member=lambda k: f"fold {k}") -> List[str]:
    """A table per extra set: each head's F1; for a head with an absent class, its recall per class and the
    present vs absent accuracy."""
    by_name = {h.name: h for h in heads}
    lines = []
    for name, r in results.items():
        cols = []
        for h in r["heads"]:
            cols.append((f"{h} F1", lambda s, h=h: s[h]["f1_macro"]))
            if by_name[h].absent is not None:
                classes = list(r["ensemble"][h]["per_class"])
                cols += [(f"{c} recall", lambda s, c=c, h=h: s[h]["per_class"][c]["recall"]) for c in classes]
                cols.append((f"{h} on vs {by_name[h].absent} acc", lambda s, h=h: s[h]["on_accuracy"]))
        lines += ["", f"### {name} ({r['photos']} photos, never trained on)", "",
                  "| model | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        rows = [(member(k), s) for k, s in r["folds"].items()] + [("**ensemble**", r["ensemble"])]
        lines += [f"| {who} | " + " | ".join(f"{get(s):.4f}" for _, get in cols) + " |" for who, s in rows]
    return lines


AGE_BANDS = [0, 18, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 200]


def age_results(oof: pd.DataFrame, heads: Sequence[HeadConfig], plots: Path) -> tuple[dict, List[str]]:
    """Where the exact age is known: the age head's predicted group by true age band (where do 30-59 errors
    come from?), and for heads that predict years the mean absolute error per fold and a predicted-vs-true plot."""
    head = next((h for h in heads if h.value_column == "age"), None)
    if head is None or "age" not in oof or oof["age"].isna().all():
        return {}, []
    known = oof[oof["age"].notna()]
    band = pd.cut(known["age"].astype(float), AGE_BANDS, right=False,
                  labels=[f"{a}-{b - 1}" if b < 200 else f"{a}+" for a, b in zip(AGE_BANDS[:-1], AGE_BANDS[1:])])
    table = pd.crosstab(band, known[pred_column(head)].map(dict(enumerate(head.classes))), normalize="index")
    table = table.reindex(columns=head.classes, fill_value=0.0)
    counts = band.value_counts()
    result = {"by_year": {str(b): {**{c: float(table.loc[b, c]) for c in head.classes}, "photos": int(counts[b])}
                          for b in table.index if counts[b]}}
    lines = ["", "## Age by year (all out-of-fold photos with a known age)", "",
             "Share of each true-age band predicted as each group.", "",
             "| true age | photos | " + " | ".join(head.classes) + " |", "|---" * (len(head.classes) + 2) + "|"]
    lines += [f"| {b} | {v['photos']} | " + " | ".join(f"{v[c]:.2f}" for c in head.classes) + " |"
              for b, v in result["by_year"].items()]
    value_col = value_prediction_column(head)
    err = value_errors(head, known)
    if err is not None:
        result["mae_years"] = {int(k): float(e.mean()) for k, e in err.groupby(known["fold"])}
        result["mae_years_pooled"] = float(err.mean())
        lines += ["", "Mean absolute error of the predicted age: " + ", ".join(
            f"fold {k} {v:.1f}" for k, v in result["mae_years"].items()) + f"; all {err.mean():.1f} years.", "",
            "![age](plots/age_predicted_vs_true.png)"]
        fig, ax = plt.subplots(figsize=(4.5, 4.2))
        for k, part in known.groupby("fold"):
            ax.scatter(part["age"], part[value_col], s=4, alpha=0.4, label=f"fold {k}")
        ax.plot([0, 100], [0, 100], color="grey", lw=1)
        ax.set_xlabel("true age")
        ax.set_ylabel("predicted age")
        ax.legend(fontsize=7, markerscale=3)
        fig.tight_layout()
        fig.savefig(plots / "age_predicted_vs_true.png", dpi=100)
        plt.close(fig)
    return result, lines


def recipe(cfg: Config, run: RunDir) -> str:
    """The training settings in one sentence, for the report's header: what the run recorded (run.json) where
    it did, else what the config implies."""
    ran = run.recorded()
    o = cfg.optim
    lrs = (ran["lr_trunk"], ran["lr_heads"]) if ran else o.learning_rates(cfg.model.pretrained != "none")
    sgd = f", SGD after epoch {o.sgd_after}" if o.sgd_after is not None else ""
    batch = f"batch {cfg.data.batch_size}"
    if ran.get("processes", 1) > 1:
        batch = (f"batch {ran['batch_per_process']} x {ran['processes']} processes = {ran['effective_batch']} "
                 f"(learning rate scaling: {ran['lr_scaling']})")
    where = f", {ran['device']} {ran['precision']}" if ran else ""
    trained_prior = [h.name for h in cfg.heads if h.prior == "training"]
    prior = f" (taken back out of {', '.join(trained_prior)} when predicting: prior training)" if trained_prior else ""
    return (f"{o.optimizer} (lr trunk {lrs[0]:g}, heads {lrs[1]:g}, weight decay {o.weight_decay:g}{sgd}), "
            f"{o.scheduler} schedule, label smoothing {cfg.loss.label_smoothing:g}, class weights "
            f"{'on' if cfg.loss.class_weights else 'off'}{prior}, mix {cfg.augment.mix}, {batch}, seed "
            f"{cfg.train.seed}{where}.")


def write_report(run_dir: Path) -> dict:
    run = RunDir(run_dir)
    cfg = run.load_config()
    heads = final_heads(cfg)
    oof = collect_oof(run, heads)
    atomic_to_csv(oof, run.oof)
    s = summarize(cfg, heads, oof)
    predict_views = len(cfg.predict.views())
    plots = run.plots
    confusions = write_confusions(s["pooled"], heads, plots)
    curves = []
    for (fold, stage), metrics_path in run.stage_metrics().items():
        name = f"curves_fold{fold}_stage{stage}.png"
        plot_curves(read_table(metrics_path, ["epoch", "loss"]), f"fold{fold} stage{stage}", plots / name)
        curves.append(name)
    seconds = {f"fold{k}": v for k, v in run.fold_seconds().items()}

    keys = list(s["mean"])
    head_line = "| fold | " + " | ".join(f"{label(k, heads)} F1 | {label(k, heads)} acc" for k in keys) + " |"
    lines = [f"# Report: {run.root.name}", "",
             f"{cfg.model.arch} (pretrained: {cfg.model.pretrained}), {cfg.data.size[0]}x{cfg.data.size[1]} px, "
             f"data: {cfg.data.source} {cfg.data.root or ''}; {len(oof)} out-of-fold photos of "
             f"{oof['person_id'].nunique()} persons, {len(s['folds'])} of {cfg.cv.folds} folds (grouped by person"
             f"{f'; fold {cfg.cv.leave_out} left out' if cfg.cv.leave_out is not None else ''}). "
             + ", ".join(f"{'Stage' if n == 1 else 'stage'} {n}: {s.epochs if s.enabled else 0} epochs"
                         for n, s in enumerate(cfg.stages, 1)) + ". Macro-F1 per fold on the fold's held-out "
             f"persons (best epoch by {label(JOINT if len(heads) > 1 else heads[0].name, heads)} macro-F1 on the "
             "plain photo), scored " + views_sentence(oof_views(oof), predict_views, "predict reproduces them") + " "
             + recipe(cfg, run), "",
             "## Macro-F1 and accuracy per fold", "", head_line, "|---" * (1 + 2 * len(keys)) + "|"]
    for k, f in s["folds"].items():
        lines.append(f"| {k} | " + " | ".join(f"{f[x]['f1_macro']:.4f} | {f[x]['accuracy']:.4f}" for x in keys) + " |")
    lines.append("| **mean ± std** | " + " | ".join(
        f"**{s['mean'][x]['f1_macro']:.4f} ± {s['std'][x]['f1_macro']:.4f}** | "
        f"{s['mean'][x]['accuracy']:.4f} ± {s['std'][x]['accuracy']:.4f}" for x in keys) + " |")
    if seconds:
        lines += ["", "Training time per fold: " + ", ".join(
            f"{k} {v / 60:.1f} min" for k, v in sorted(seconds.items()) if v is not None)]
    frames = extra_val_frames(run, cfg)
    extra = extra_val_scores(frames, heads)
    if extra:
        lines += ["", "## Extra validation sets (data.extra_val)", "",
                  "Scored by each fold's model and by their ensemble (mean probabilities), "
                  + views_sentence(views_used(frames), predict_views, "the ensemble row is what predict gives")
                  + " \"On vs\" a head's absent class (mask on vs not_worn): any other class against it."]
        lines += extra_val_lines(extra, heads)
    age, age_lines = age_results(oof, heads, plots)
    lines += age_lines
    subgroups = subgroup_results(oof, heads, cfg)
    lines += subgroup_lines(subgroups, heads)
    lines += ["", "## Per-class precision / recall / F1 (all out-of-fold photos)"] + per_class_table(s["pooled"], heads)
    lines += ["", "## Confusion matrices", ""] + [f"![{c}](plots/{c})" for c in confusions]
    lines += ["", "## Learning curves", ""] + [f"![{c}](plots/{c})" for c in curves]
    atomic_write_text(run.report_md, "\n".join(lines) + "\n")
    result = {"run": run.root.name, "joint_name": joint_name(heads), **s, "fold_seconds": seconds,
              "extra_val": extra, "age": age, "subgroups": subgroups}
    atomic_write_text(run.report_json, json.dumps(result, indent=1))
    atomic_write_text(run.model_card, model_card(cfg, run, heads, oof, result, recipe(cfg, run)))
    return result


def by_path(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("path", kind="stable").reset_index(drop=True)


def write_ensemble_report(run_dirs: Sequence[Path], out: Path) -> dict:
    """Runs trained on the same folds, averaged with each run counting once (what ``predict --run A --run B``
    does): macro-F1 per fold of the average of their out-of-fold predictions beside each run's, and the extra
    validation sets they share. Writes report.md, report.json, oof.csv and plots/ to ``out``."""
    runs = [RunDir(r) for r in run_dirs]
    if RunDir(out).is_run():
        raise ConfigError(f"{out}: is a run directory; give the average's report its own --out")
    cfgs = [run.load_config() for run in runs]
    check_same_classes(runs, cfgs)
    heads = final_heads(cfgs[0])
    oofs = [by_path(collect_oof(run, heads)) for run in runs]
    for run, oof in zip(runs[1:], oofs[1:]):
        if not (oof["path"].equals(oofs[0]["path"]) and oof["fold"].equals(oofs[0]["fold"])):
            raise ConfigError(f"{run.root}: its out-of-fold photos or folds differ from {runs[0].root}'s; only runs "
                              "on the same folds (same data, cv.folds and cv.seed) can be averaged")
    oof = mean_frame(oofs, heads)
    s = summarize(cfgs[0], heads, oof)
    each = {run.root.name: summarize(cfg, heads, o) for run, cfg, o in zip(runs, cfgs, oofs)}
    keys = list(s["mean"])
    row = lambda who, r: (f"| {who} | " + " | ".join(  # noqa: E731
        f"{r['mean'][k]['f1_macro']:.4f} ± {r['std'][k]['f1_macro']:.4f}" for k in keys) + " |")
    names = ", ".join(f"`{run.root}`" for run in runs)
    lines = [f"# Average of {len(runs)} runs", "",
             f"Runs: {names}, each counting once (what `multitask predict` gives with a `--run` for "
             f"each). {len(oof)} out-of-fold photos of {oof['person_id'].nunique()} persons, the same "
             f"{len(s['folds'])} folds in every run, scored " + runs_views_sentence(
                 [(run.root.name, oof_views(o), len(cfg.predict.views())) for run, cfg, o in zip(runs, cfgs, oofs)],
                 "the average is what predict gives"), "",
             "## Macro-F1 (mean ± std over folds)", "",
             "| | " + " | ".join(label(k, heads) for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [row(name, r) for name, r in each.items()] + [row("**average**", s)]
    lines += ["", "## The average, per fold", "", "| fold | " + " | ".join(label(k, heads) for k in keys) + " |",
              "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(f"{f[x]['f1_macro']:.4f}" for x in keys) + " |" for k, f in s["folds"].items()]
    sets: Dict[str, Dict[str, pd.DataFrame]] = {}
    views = []  # (run, views its folds used on the extra sets, views its predict uses)
    for run, cfg in zip(runs, cfgs):
        run_sets = extra_val_frames(run, cfg)
        for name, frames in run_sets.items():
            sets.setdefault(name, {})[run.root.name] = by_path(mean_frame(list(frames.values()), heads))
        views.append((run.root.name, views_used(run_sets), len(cfg.predict.views())))
    sets = {name: members for name, members in sets.items() if len(members) == len(runs)}  # the sets all scored
    extra = extra_val_scores(sets, heads)
    if extra:
        lines += ["", "## Extra validation sets", "", "Each run's fold ensemble, and their average, scored "
                  + runs_views_sentence(views, "the average row is what predict gives")]
        lines += extra_val_lines(extra, heads, member=str)
    plots = Path(out) / "plots"
    confusions = write_confusions(s["pooled"], heads, plots)
    age, age_lines = age_results(oof, heads, plots)
    lines += age_lines + ["", "## Confusion matrices (all out-of-fold photos)", ""]
    lines += [f"![{c}](plots/{c})" for c in confusions]
    atomic_to_csv(oof, Path(out) / "oof.csv")
    atomic_write_text(Path(out) / "report.md", "\n".join(lines) + "\n")
    result = {"runs": [str(run.root) for run in runs], "joint_name": joint_name(heads), **s,
              "runs_mean": {name: r["mean"] for name, r in each.items()}, "extra_val": extra, "age": age}
    atomic_write_text(Path(out) / "report.json", json.dumps(result, indent=1))
    return result


@guarded
def main(argv=None) -> int:
    p = cli()
    a = p.parse_args(argv)
    if len(a.run_dirs) > 1 and a.out is None:
        p.error("several runs: give --out DIR for the report of their average")
    if len(a.run_dirs) == 1:
        write_report(a.run_dirs[0])
        print(RunDir(a.run_dirs[0]).report_md.read_text())
    else:
        write_ensemble_report(a.run_dirs, a.out)
        print((a.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

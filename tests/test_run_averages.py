"""Averaging runs trained on the same folds (different trunks or recipes make different mistakes): predict with
several --run, and the cross-validated score of their average (python -m multitask.report RUN RUN --out DIR)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from multitask.predict import main as predict_main, predict
from multitask.report import main as report_main, write_ensemble_report

from conftest import probs_of

pytestmark = pytest.mark.slow
QUIET = dict(progress=False, log=lambda s: None)
AGE = ["p_age_<30", "p_age_30-59", "p_age_60+"]


def copy_run(run: Path, to: Path) -> Path:
    return Path(shutil.copytree(run, to, ignore=shutil.ignore_patterns("lock")))


def edit_config(run: Path, old: str, new: str) -> None:
    config = run / "config.yaml"
    assert old in config.read_text()
    config.write_text(config.read_text().replace(old, new))


def test_several_runs_average_their_ensembles_each_with_its_own_preprocessing(trained_run, faces_root, tmp_path):
    person = next((faces_root / "images").iterdir())
    other = copy_run(trained_run, tmp_path / "other")
    for k in (1, 2):
        shutil.rmtree(other / f"fold{k}")  # one fold model: it still counts as much as the 3-fold run
    edit_config(other, "size:\n  - 48\n  - 40", "size:\n  - 64\n  - 52")
    alone = [probs_of(predict(run, person, tmp_path / f"alone{i}", **QUIET)) for i, run in enumerate([trained_run, other])]
    both = probs_of(predict([trained_run, other], person, tmp_path / "both", **QUIET))
    assert not np.allclose(alone[0], alone[1], atol=1e-3)
    np.testing.assert_allclose(both, np.mean(alone, axis=0), atol=1e-6)


def test_runs_that_predict_different_classes_cannot_be_averaged(trained_run, faces_root, tmp_path, capsys):
    other = copy_run(trained_run, tmp_path / "other")
    edit_config(other, "thresholds:\n  - 30\n  - 60", "thresholds:\n  - 25\n  - 60")
    code = predict_main(["--run", str(trained_run), "--run", str(other), str(faces_root), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {other}: its heads, classes or thresholds differ")
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_the_report_of_two_runs_scores_the_average_of_their_out_of_fold_predictions(trained_run, tmp_path):
    other = copy_run(trained_run, tmp_path / "other")
    for oof in other.glob("fold*/oof.csv"):  # a second "run": other age probabilities on the same folds
        df = pd.read_csv(oof)
        df[AGE] = np.random.default_rng(0).dirichlet([1, 1, 1], len(df))
        df.to_csv(oof, index=False)
    report = write_ensemble_report([trained_run, other], tmp_path / "avg")
    mine = pd.read_csv(trained_run / "oof.csv").sort_values("path")
    theirs = pd.concat(pd.read_csv(p) for p in sorted(other.glob("fold*/oof.csv"))).sort_values("path")
    mean = (mine[AGE].to_numpy() + theirs[AGE].to_numpy()) / 2
    for k in sorted(mine["fold"].unique()):
        m = (mine["fold"] == k).to_numpy()
        expected = f1_score(mine["true_age"][m], mean[m].argmax(1), average="macro")
        assert report["folds"][k]["age"]["f1_macro"] == pytest.approx(expected)
        alone = json.loads((trained_run / "report.json").read_text())["folds"][str(k)]
        assert report["folds"][k]["mask"]["f1_macro"] == pytest.approx(alone["mask"]["f1_macro"])  # equal in both
    assert set(report["extra_val"]) == {"masked"}  # the extra validation set both runs scored
    assert "every run with the test-time views its predict uses" in (tmp_path / "avg" / "report.md").read_text()


def test_the_report_of_two_runs_says_which_one_predicts_with_other_views(trained_run, tmp_path):
    other = copy_run(trained_run, tmp_path / "other")
    edit_config(other, "tta_flip: true", "tta_flip: false")  # its predict now uses 1 view; it was scored with 2
    write_ensemble_report([trained_run, other], tmp_path / "avg")
    text = (tmp_path / "avg" / "report.md").read_text()
    assert f"`{trained_run.name}` 2 (2), `other` 2 (1)" in text
    assert "predict's scores on the same photos may differ a little" in text


def test_runs_on_other_folds_cannot_be_averaged(trained_run, tmp_path, capsys):
    other = copy_run(trained_run, tmp_path / "other")
    oof = pd.read_csv(other / "fold0" / "oof.csv")
    oof.loc[:3, "fold"] = 1
    oof.to_csv(other / "fold0" / "oof.csv", index=False)
    code = report_main([str(trained_run), str(other), "--out", str(tmp_path / "avg")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {other}: its out-of-fold photos or folds differ")
    assert err.count("\n") == 1 and not (tmp_path / "avg" / "report.md").exists()

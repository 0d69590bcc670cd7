"""Seeing domain shift before it bites: extra validation sets, extra training sets, balanced draws, and the
augmentation aimed at the gap between painted and real photos."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from multitask.config import load_config
from multitask.folds import make_folds
from multitask.data.sources import load_competition, load_mask_folders
from multitask.data.table import balanced_people, load_labeled, load_table
from multitask.data.transforms import train_transform
from multitask.report import on_accuracy, recipe
from multitask.run import RunDir

from conftest import tiny_overrides


def test_a_folder_per_mask_class_is_a_labeled_set_for_the_mask_head(mask_folders_root):
    table, problems = load_mask_folders(mask_folders_root)
    assert problems == [] and len(table) == 24 * 4
    assert table["mask"].value_counts().to_dict() == {0: 48, 1: 24, 2: 24}
    assert (table[["gender", "age_group"]] == -1).all().all()  # unknown, never scored
    same, _ = load_labeled(mask_folders_root)
    assert same["path"].tolist() == table["path"].tolist()


def test_on_accuracy_counts_masks_called_not_worn_as_errors():
    # classes: 0 worn, 1 incorrect, 2 not_worn
    true = np.array([0, 0, 1, 2, 2])
    pred = np.array([1, 2, 0, 2, 0])  # worn->incorrect is right here (a mask is on); worn->not_worn is not
    assert on_accuracy(true, pred, absent=2) == pytest.approx(3 / 5)


def test_balanced_people_draws_evenly_from_every_gender_and_age_cell(faces_root):
    table, _ = load_competition(faces_root)
    cells = table.drop_duplicates("person_id").groupby(["gender", "age_group"]).size()
    n = 2 * len(cells)
    subset = balanced_people(table, n, seed=0)
    persons = subset.drop_duplicates("person_id")
    assert len(persons) == n and len(subset) == 7 * n  # every photo of a chosen person
    counts = persons.groupby(["gender", "age_group"]).size().reindex(cells.index, fill_value=0)
    for a in cells.index:  # a cell has at most one more than another, unless the other has given everyone
        for b in cells.index:
            assert counts[a] <= counts[b] + 1 or counts[b] == cells[b], (a, b)
    assert balanced_people(table, 0, seed=0) is table
    assert balanced_people(table, n, seed=0).equals(subset)  # reproducible


def test_extra_training_sets_are_trained_on_in_every_fold_and_never_validated(faces_root, tmp_path):
    cfg = load_config(tiny_overrides(faces_root, tmp_path) + [f"data.extra_train=[{faces_root}]",
                                                              "data.extra_train_people=6"])
    table, problems = load_table(cfg)
    extra = table[table["extra"]]
    assert problems == [] and extra["person_id"].nunique() == 6 and not extra["stage1_only"].any()
    assert extra["person_id"].str.startswith("extra0:").all()  # never confused with the main set's persons
    folds = make_folds(table, cfg.heads, 3, seed=0)
    assert set(folds.loc[folds["fold"] == -1, "person_id"]) == set(extra["person_id"])


def test_augmentation_for_real_photos_changes_the_training_photos():
    off = ["data.size=[64,48]", "augment.hflip=0", "augment.brightness_contrast=0", "augment.degrade=0",
           "augment.color=0", "augment.affine=0"]
    cfg = load_config(off)
    rng = np.random.default_rng(0)
    photo = (rng.random((72, 54, 3)) * 255).astype(np.uint8)
    plain = train_transform(cfg.data, cfg.augment)
    for knob in ("degrade", "color", "affine"):
        on = load_config(off + [f"augment.{knob}=1"])
        tf = train_transform(on.data, on.augment)
        plain.set_random_seed(1)
        tf.set_random_seed(1)
        differs = [not np.allclose(plain(image=photo)["image"], tf(image=photo)["image"]) for _ in range(5)]
        assert any(differs), knob


@pytest.mark.slow
def test_every_fold_and_the_ensemble_are_scored_on_the_extra_validation_set(trained_run):
    report = json.loads((trained_run / "report.json").read_text())
    masked = report["extra_val"]["masked"]
    assert masked["heads"] == ["mask"] and masked["photos"] == 96 and sorted(masked["folds"]) == ["0", "1", "2"]
    frames = [pd.read_csv(trained_run / f"fold{k}" / "extra_val" / "masked.csv") for k in range(3)]
    mean = np.mean([f[["p_mask_worn", "p_mask_incorrect", "p_mask_not_worn"]].to_numpy() for f in frames], 0)
    true = frames[0]["true_mask"].to_numpy()
    assert masked["ensemble"]["mask"]["on_accuracy"] == pytest.approx(on_accuracy(true, mean.argmax(1), 2))
    fold1 = frames[1][["p_mask_worn", "p_mask_incorrect", "p_mask_not_worn"]].to_numpy().argmax(1)
    recall = (fold1[true == 0] == 0).mean()
    assert masked["folds"]["1"]["mask"]["per_class"]["worn"]["recall"] == pytest.approx(recall)
    text = (trained_run / "report.md").read_text()
    assert "### masked (96 photos, never trained on)" in text and "mask on vs not_worn acc" in text
    assert "with the test-time views predict uses (2 per photo" in text


@pytest.mark.slow
def test_a_run_without_its_views_count_is_named_not_guessed(trained_run, tmp_path, capsys):
    from multitask.report import main as report_main
    from test_bad_inputs import no_traceback, run_main

    run = Path(shutil.copytree(trained_run, tmp_path / "old", ignore=shutil.ignore_patterns("lock")))
    oof = run / "fold0" / "oof.csv"
    pd.read_csv(oof).drop(columns="views").to_csv(oof, index=False)
    out = run_main(report_main, capsys, run)
    no_traceback(out)
    assert out.returncode == 2 and f"{oof}: missing column(s) ['views']" in out.stderr, out.stderr


@pytest.mark.slow
def test_predict_scores_a_folder_per_mask_class(trained_run, mask_folders_root, tmp_path):
    from multitask.predict import predict

    df = predict(trained_run, mask_folders_root, tmp_path / "out", progress=False, log=lambda s: None)
    assert "true_mask" in df and "true_gender" not in df and len(df) == 96
    scores = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(scores) == ["mask"] and "on_accuracy" in scores["mask"]
    # the report's ensemble row on the same set is this prediction: every fold, the run's test-time views
    probs = ["p_mask_worn", "p_mask_incorrect", "p_mask_not_worn"]
    folds = [pd.read_csv(trained_run / f"fold{k}" / "extra_val" / "masked.csv").set_index("path")[probs]
             for k in range(3)]
    mean = sum(folds) / 3
    got = df.assign(path=df["path"].astype(str)).set_index("path")[probs]
    np.testing.assert_allclose(got.loc[mean.index].to_numpy(), mean.to_numpy(), atol=1e-4)


def test_the_report_says_which_heads_predict_with_the_training_prior(tmp_path):
    assert "class weights on, mix" in recipe(load_config(), RunDir(tmp_path))
    sentence = recipe(load_config(["experiment=real_faces"]), RunDir(tmp_path))
    assert "class weights on (taken back out of mask when predicting: prior training), mix" in sentence

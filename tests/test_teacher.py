"""teacher=[RUN, ...]: a run learns, besides its labels, the teacher runs' out-of-fold predictions."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from multitask.api import predict_arrays
from multitask.config import ConfigError, load_config, to_yaml
from multitask.data.photoset import photo_set
from multitask.data.sources import load_competition
from multitask.run import RunDir
from multitask.teacher import teacher_targets


def fake_teacher(root, cfg, folds: dict):
    """A run directory holding only what a teacher is read from: config.yaml and fold<k>/oof.csv."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(to_yaml(cfg))
    for k, oof in folds.items():
        (root / f"fold{k}").mkdir()
        oof.to_csv(root / f"fold{k}" / "oof.csv", index=False)
    return root


def probabilities(paths, gender_female):
    return pd.DataFrame({"path": paths, "p_gender_male": [1 - p for p in gender_female],
                         "p_gender_female": gender_female})


def test_targets_are_the_teachers_mean_held_out_probabilities_by_photo(tmp_path):
    cfg = load_config([])
    gender = [h for h in cfg.heads if h.name == "gender"]
    photos = [str(tmp_path / f"{name}.jpg") for name in "abcd"]
    one = fake_teacher(tmp_path / "one", cfg, {0: probabilities(photos[:2], [0.2, 0.4]),
                                               1: probabilities(photos[2:3], [0.6])})
    two = fake_teacher(tmp_path / "two", cfg, {0: probabilities([photos[0]], [0.6])})
    (tmp_path / "link").symlink_to(tmp_path)  # the same photo by another path
    rows = pd.DataFrame({"path": [str(tmp_path / "link" / "a.jpg"), photos[1], photos[2], photos[3]]})
    got = teacher_targets([str(one), str(two)], rows, gender).to_numpy()
    np.testing.assert_allclose(got[:3], [[0.6, 0.4], [0.6, 0.4], [0.4, 0.6]], rtol=1e-6)  # a: mean of two runs
    assert np.isnan(got[3]).all()  # no teacher held d out


def test_a_teacher_that_cannot_teach_is_one_line(tmp_path):
    cfg = load_config([])
    age = [h for h in cfg.heads if h.name == "age"]
    other = load_config([])
    other.heads[2].thresholds = [25, 60]
    wrong = fake_teacher(tmp_path / "wrong", other, {0: pd.DataFrame({"path": ["a.jpg"]})})
    with pytest.raises(ConfigError, match=r"teacher=.*wrong: its head age is not this run's"):
        teacher_targets([str(wrong)], pd.DataFrame({"path": ["a.jpg"]}), age)
    with pytest.raises(ConfigError, match="not a run directory"):
        teacher_targets([str(tmp_path)], pd.DataFrame({"path": ["a.jpg"]}), age)
    unfinished = fake_teacher(tmp_path / "unfinished", cfg, {})
    with pytest.raises(ConfigError, match="no fold has finished"):
        teacher_targets([str(unfinished)], pd.DataFrame({"path": ["a.jpg"]}), age)
    with pytest.raises(ConfigError, match="teacher with augment.mix=mixup"):
        load_config(["teacher=[somewhere]", "augment.mix=mixup"])


def test_the_student_never_learns_a_prediction_of_a_model_that_trained_on_the_photos_person(trained_run):
    """Each photo's target is what the teacher's fold model that held the photo's person out predicted, not what
    any of its fold models that trained on the person predict."""
    cfg = load_config(base=trained_run / "config.yaml")
    table, _ = load_competition(cfg.data.root)
    targets = teacher_targets([str(trained_run)], table, cfg.heads).to_numpy()
    assert not np.isnan(targets).any()  # every fold ran: every photo was held out once
    held_out = table["person_id"].map(pd.read_csv(trained_run / "folds.csv", dtype={"person_id": str})
                                      .set_index("person_id")["fold"]).to_numpy()
    photos = photo_set(cfg, table[["path"]], lambda s: None, RunDir(trained_run).typical_face_boxes(), cache=True)
    models = RunDir(trained_run).load_models(cfg)
    predicted = predict_arrays(models, np.asarray(photos.images), cfg, torch.device("cpu"), cfg.predict.views())
    by_fold = {k: np.concatenate([probs[h.name] for h in cfg.heads], axis=1) for k, (probs, _) in predicted.items()}
    distance = np.stack([np.abs(by_fold[k] - targets).max(axis=1) for k in sorted(by_fold)], axis=1)
    assert (distance.argmin(axis=1) == held_out).all()
    assert distance.min(axis=1).max() < 0.01  # the held-out fold's prediction, up to the saved weights' rounding
    assert np.median(np.sort(distance, axis=1)[:, 1]) > 0.02  # a model that trained on the person says otherwise


@pytest.mark.slow
def test_a_student_learns_from_its_teacher_in_every_stage(trained_run, tiny_config, tmp_path):
    from multitask.trainer import run_cv

    cfg = tiny_config("cv.run_folds=[0]", f"teacher=[{trained_run}]")
    logs = []
    run_cv(cfg, tmp_path / "student", log=logs.append)
    for stage in (1, 2):
        metrics = pd.read_csv(tmp_path / "student" / "fold0" / f"stage{stage}" / "metrics.csv")
        assert (metrics["loss_teacher"] > 0).all(), stage
    assert any("stage 2: teacher predictions for" in line for line in logs)

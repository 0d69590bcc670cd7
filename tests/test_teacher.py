"""teacher=[RUN, ...]: a run learns, besides its labels, the teacher runs' out-of-fold predictions, from teacher
models that trained neither on the photo's person nor on the fold's validation people."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from multitask.api import predict_arrays
from multitask.cli import EXIT_BAD_INPUT
from multitask.config import ConfigError, load_config, to_yaml
from multitask.data.photoset import photo_set
from multitask.data.sources import load_competition
from multitask.run import RunDir
from multitask.teacher import load_teachers, teacher_targets
from multitask.train import main as train_main


def fake_teacher(root, cfg, folds: dict, trained_on=()):
    """A run directory holding only what a teacher is read from: config.yaml, fold<k>/oof.csv and data.csv (the
    held-out photos with their fold, and ``trained_on``: photos every fold model trained on)."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(to_yaml(cfg))
    for k, oof in folds.items():
        (root / f"fold{k}").mkdir()
        oof.to_csv(root / f"fold{k}" / "oof.csv", index=False)
    used = [(p, k) for k, oof in folds.items() for p in oof["path"]] + [(p, -1) for p in trained_on]
    pd.DataFrame(used, columns=["path", "fold"]).to_csv(root / "data.csv", index=False)
    return root


def no_photos():
    return pd.DataFrame({"path": []})


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
    got = teacher_targets(load_teachers([str(one), str(two)], gender), rows, no_photos()).to_numpy()
    np.testing.assert_allclose(got[:3], [[0.6, 0.4], [0.6, 0.4], [0.4, 0.6]], rtol=1e-6)  # a: mean of two runs
    assert np.isnan(got[3]).all()  # no teacher held d out


def test_a_fold_learns_only_from_teacher_models_that_never_trained_on_its_validation_people(tmp_path):
    cfg = load_config([])
    gender = [h for h in cfg.heads if h.name == "gender"]
    a, b, c, d, e, f, x = (str(tmp_path / f"{name}.jpg") for name in "abcdefx")
    run = fake_teacher(tmp_path / "run", cfg, {0: probabilities([a, b], [0.1, 0.2]),
                                               1: probabilities([c, d], [0.3, 0.4]),
                                               2: probabilities([e, f], [0.5, 0.6])}, trained_on=[x])
    teachers = load_teachers([str(run)], gender)
    rows = pd.DataFrame({"path": [a, b, c, d, e, f]})

    def female(validation):
        return teacher_targets(teachers, rows, pd.DataFrame({"path": validation}))["p_gender_female"].tolist()

    # validating on a: only fold 0's model never trained on a; it predicted b (and a, which is not trained on)
    np.testing.assert_allclose(female([a]), [0.1, 0.2] + [np.nan] * 4, rtol=1e-6)
    np.testing.assert_allclose(female([c, d]), [np.nan] * 2 + [0.3, 0.4] + [np.nan] * 2, rtol=1e-6)
    assert np.isnan(female([a, c])).all()  # every model trained on a or on c
    assert np.isnan(female([x])).all()  # x was trained on by every model
    np.testing.assert_allclose(female([str(tmp_path / "never-used.jpg")]), [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                               rtol=1e-6)  # a teacher run without the validation people: all its models teach


def test_a_teacher_that_cannot_teach_is_one_line(tmp_path):
    cfg = load_config([])
    age = [h for h in cfg.heads if h.name == "age"]
    other = load_config([])
    other.heads[2].thresholds = [25, 60]
    wrong = fake_teacher(tmp_path / "wrong", other, {0: pd.DataFrame({"path": ["a.jpg"]})})
    with pytest.raises(ConfigError, match=r"teacher=.*wrong: its head age is not this run's"):
        load_teachers([str(wrong)], age)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a run directory .*, nor a folder of runs"):
        load_teachers([str(tmp_path / "empty")], age)
    unfinished = fake_teacher(tmp_path / "unfinished", cfg, {})
    with pytest.raises(ConfigError, match="no fold has finished"):
        load_teachers([str(unfinished)], age)
    with pytest.raises(ConfigError, match="teacher with augment.mix=mixup"):
        load_config(["teacher=[somewhere]", "augment.mix=mixup"])
    with pytest.raises(ConfigError, match=r"cv.leave_out=5: one of folds 0..4"):
        load_config(["cv.leave_out=5"])
    with pytest.raises(ConfigError, match=r"cv.run_folds=\[1, 2\]: fold 2 is left out"):
        load_config(["cv.leave_out=2", "cv.run_folds=[1,2]"])


def test_a_teacher_that_trained_on_the_folds_validation_people_is_refused_before_training(trained_run, tmp_path):
    """The session's 3-fold run teaches no fold of a student on the same people: each of its fold models but
    one trained on any fold's people, and that one predicted only them."""
    from multitask.training.soft_targets import fold_teacher_targets

    cfg = load_config(base=trained_run / "config.yaml")
    cfg.teacher = [str(trained_run)]
    table = pd.read_csv(trained_run / "data.csv")
    with pytest.raises(ConfigError, match=r"fold 1's training photos without having trained on its validation "
                                          r"people; fold 1's teachers are runs made with cv.leave_out=1"):
        fold_teacher_targets(cfg, tmp_path / "student", table, [1])


def test_the_student_never_learns_a_prediction_of_a_model_that_trained_on_the_photos_person(trained_run):
    """Each photo's target is what the teacher's fold model that held the photo's person out predicted, not what
    any of its fold models that trained on the person predict."""
    cfg = load_config(base=trained_run / "config.yaml")
    table, _ = load_competition(cfg.data.root)
    targets = teacher_targets(load_teachers([str(trained_run)], cfg.heads), table, no_photos()).to_numpy()
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
def test_a_student_learns_in_every_stage_from_a_teacher_made_without_its_validation_people(
        tiny_config, tmp_path, capsys):
    from multitask.report import write_report
    from multitask.training.cv import run_cv

    teacher = tmp_path / "teachers" / "without-fold-0"
    run_cv(tiny_config("cv.leave_out=0"), teacher, log=lambda s: None)
    write_report(teacher)
    folds, used = pd.read_csv(teacher / "folds.csv"), pd.read_csv(teacher / "data.csv")
    assert set(used["fold"]) == {1, 2} and (folds["fold"] == 0).any()  # the split kept; fold 0's people not read
    assert sorted(RunDir(teacher).fold_oofs()) == [1, 2]
    assert "fold 0 left out" in (teacher / "report.md").read_text()
    assert train_main(["--resume", str(teacher), "--folds", "0"]) == EXIT_BAD_INPUT
    assert "--folds [0]: the run has folds 0..2 but 0 (cv.leave_out)" in capsys.readouterr().err

    logs = []  # teacher=: a folder of runs
    run_cv(tiny_config("cv.run_folds=[0]", f"teacher=[{tmp_path / 'teachers'}]"), tmp_path / "student",
           log=logs.append)
    for stage in (1, 2):
        metrics = pd.read_csv(tmp_path / "student" / "fold0" / f"stage{stage}" / "metrics.csv")
        assert (metrics["loss_teacher"] > 0).all(), stage
    assert any("stage 2: teacher predictions for" in line for line in logs)

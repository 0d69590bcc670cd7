"""Head kinds: every kind gives class probabilities that sum to 1 and agree with its outputs, trains, and the
report shows where age errors come from (and the error in years where the head predicts years)."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from multitask import heads
from multitask.config import ConfigError, load_config
from multitask.heads import KINDS
from multitask.tasks import MASK_CLASSES
from multitask.training.cv import run_cv
from multitask.data.sources import DataError, load_competition
from multitask.data.table import load_table, training_targets
from multitask.model import build_model
from multitask.predict import predict
from multitask.report import write_report

from conftest import manifest_csv, tiny_overrides

THRESHOLDS = [30, 60]


@pytest.mark.parametrize("loss", KINDS)
def test_group_probabilities_sum_to_one_for_every_kind(loss):
    logits = torch.randn(64, KINDS[loss].outputs(3), generator=torch.Generator().manual_seed(0)) * 3
    p = KINDS[loss].probabilities(logits, THRESHOLDS)
    assert p.shape == (64, 3) and (p >= -1e-6).all()
    assert torch.allclose(p.sum(1), torch.ones(64), atol=1e-5)


def test_dldl_groups_are_the_year_probabilities_summed_within_the_bins():
    logits = torch.randn(4, heads.YEARS, generator=torch.Generator().manual_seed(1))
    years = logits.softmax(1)
    p = KINDS["dldl"].probabilities(logits, THRESHOLDS)
    assert torch.allclose(p[:, 0], years[:, :30].sum(1)) and torch.allclose(p[:, 2], years[:, 60:].sum(1))


def test_regression_picks_the_group_of_the_predicted_age():
    ages = torch.tensor([18.0, 29.4, 29.6, 45.0, 59.4, 59.6, 80.0])
    logits = ((ages - 40) / heads.DECADE)[:, None]
    assert torch.allclose(KINDS["regression"].value(logits), ages)
    groups = KINDS["regression"].probabilities(logits, THRESHOLDS).argmax(1)
    assert groups.tolist() == np.digitize(np.round(ages.numpy()), THRESHOLDS).tolist() == [0, 0, 1, 1, 1, 2, 2]


def test_ordinal_follows_the_thresholds_passed():
    # P(group > 0), P(group > 1): confident "older than 30, not older than 60" is the middle group
    p = KINDS["ordinal"].probabilities(torch.tensor([[4.0, -4.0], [-4.0, -4.0], [4.0, 4.0]]), THRESHOLDS)
    assert p.argmax(1).tolist() == [1, 0, 2]


@pytest.mark.parametrize("loss", ["ordinal", "dldl", "regression"])
def test_the_losses_fall_when_the_prediction_moves_to_the_truth(loss):
    if loss == "ordinal":
        target, good, bad = torch.tensor([1]), torch.tensor([[5.0, -5.0]]), torch.tensor([[-5.0, 5.0]])
    elif loss == "dldl":
        target = torch.tensor([35])
        good = torch.full((1, heads.YEARS), -5.0)
        good[0, 33:38] = 5.0
        bad = torch.full((1, heads.YEARS), -5.0)
        bad[0, 70:75] = 5.0
    else:
        target, good, bad = torch.tensor([35]), torch.tensor([[-0.5]]), torch.tensor([[3.0]])
    assert KINDS[loss].loss(good, target).item() < KINDS[loss].loss(bad, target).item()


def test_years_losses_train_on_the_exact_age(faces_root):
    table, _ = load_competition(faces_root)
    for loss, expected in (("dldl", table["age"]), ("regression", table["age"]), ("ordinal", table["age_group"])):
        cfg = load_config([f"heads.2.kind={loss}"])
        assert training_targets(cfg, table)[:, 2].tolist() == expected.astype(int).tolist()


def test_training_thresholds_with_a_value_kind_are_an_error_not_ignored():
    for loss in ("dldl", "regression"):  # they learn the years: training groups would change nothing
        with pytest.raises(ConfigError, match=re.escape("heads.2.train_thresholds=[30, 58]: heads.2.kind="
                                                        f"{loss} learns the value")):
            load_config([f"heads.2.kind={loss}", "heads.2.train_thresholds=[30,58]"])
    cfg = load_config(["heads.2.kind=ordinal", "heads.2.train_thresholds=[30,58]"])
    assert cfg.heads[2].train_thresholds == [30, 58]


@pytest.mark.parametrize("overrides, message", [
    (["heads.1.kind=dldl"], "heads.1.kind=dldl learns a value: it needs heads.1.value_column and heads.1.thresholds"),
    (["heads.2.thresholds=[30]"], "heads.2.thresholds=[30]: one cut between each two classes (2 for"),
    (["heads.2.thresholds=[60,30]"], "heads.2.thresholds=[60, 30]: each above the one before"),
    (["heads.2.kind=dldl", "heads.2.thresholds=[30,160]"], "heads.2.thresholds=[30, 160]: kind=dldl cuts values 0..99"),
    (["heads.0.absent=none"], "heads.0.absent='none': not one of its classes"),
    (["heads.2.kind=softmax"], "heads.2.kind='softmax': must be one of ce, ordinal, dldl, regression"),
    (["heads.1.train_thresholds=[1,2]"], "heads.1.train_thresholds: needs heads.1.value_column"),
])
def test_a_head_that_its_kind_cannot_serve_is_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides)


def test_the_model_outputs_what_each_loss_needs():
    for loss, size in (("ce", 3), ("ordinal", 2), ("dldl", heads.YEARS), ("regression", 1)):
        cfg = load_config([f"heads.2.kind={loss}", "model.arch=mobilenet_v3_small"])
        model, _ = build_model(cfg.model, cfg.heads)
        out = model.eval()(torch.randn(2, 3, 64, 64))
        assert out.shape == (2, 3 + 2 + size)
        probs = model.probabilities(out)
        assert all(torch.allclose(p.sum(1), torch.ones(2), atol=1e-5) for p in probs.values())
        assert set(model.predicted_values(out)) == ({"age"} if KINDS[loss].value is not None else set())


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ordinal", "dldl", "regression"])
def test_each_age_loss_trains_and_the_report_shows_age_by_year(faces_root, tmp_path, loss):
    cfg = load_config(tiny_overrides(faces_root, tmp_path) + [f"heads.2.kind={loss}", "cv.folds=2",
                                                              "cv.run_folds=[0]", "stage2.epochs=2"])
    run = tmp_path / "run"
    run_cv(cfg, run, log=lambda s: None)
    report = write_report(run)
    oof = pd.read_csv(run / "oof.csv")
    p = oof[["p_age_<30", "p_age_30-59", "p_age_60+"]].to_numpy()
    assert np.allclose(p.sum(1), 1, atol=1e-4) and (oof["pred_age"] == p.argmax(1)).all()
    assert report["age"]["by_year"] and "## Age by year" in (run / "report.md").read_text()
    if KINDS[loss].value is not None:
        expected = (oof["value_age"] - oof["age"]).abs().mean()
        assert report["age"]["mae_years"][0] == pytest.approx(expected)
        assert (run / "plots" / "age_predicted_vs_true.png").exists()
        photos = manifest_csv(oof[["path"]], faces_root, f"photos-{tmp_path.name}")  # predict gives the same years
        again = predict(run, photos, tmp_path / "p", progress=False, log=lambda s: None)
        np.testing.assert_allclose(again["value_age"], oof["value_age"], atol=0.05)
    else:
        assert "mae_years" not in report["age"]
    assert json.loads((run / "report.json").read_text())["age"]["by_year"]


def test_a_head_on_a_manifest_column_of_values_gets_its_classes_cut_and_learns_the_values(faces_root, tmp_path):
    """A new value head is config only: a numeric column, thresholds, and a kind that learns values."""
    table, _ = load_competition(faces_root)
    rng = np.random.default_rng(0)
    pose = rng.integers(10, 90, len(table)).astype(str)
    pose[0] = ""  # unknown
    manifest = table[["path", "person_id", "gender", "age", "mask"]].assign(
        gender=table["gender"].map({0: "male", 1: "female"}), mask=table["mask"].map(dict(enumerate(MASK_CLASSES))),
        head_pose=pose)
    csv = manifest_csv(manifest, faces_root, f"m-{tmp_path.name}")
    heads_yaml = tmp_path / "heads.yaml"
    heads_yaml.write_text(
        "heads:\n  - {name: mask, column: mask, classes: [worn, incorrect, not_worn], absent: not_worn}\n"
        "  - {name: pose, column: pose, classes: [left, frontal, right], value_column: head_pose,\n"
        "     thresholds: [40, 60], kind: regression}\n"
        "stage1:\n  heads: [pose]\n")
    cfg = load_config([f"data.root={csv}", "data.source=manifest", str(heads_yaml)])
    loaded, _ = load_table(cfg)
    values = pd.to_numeric(pd.Series(pose).replace("", None))
    assert loaded["pose"].tolist() == [-1] + np.digitize(values[1:], [40, 60]).tolist()
    assert training_targets(cfg, loaded)[:, 1].tolist() == [-1] + values[1:].astype(int).tolist()
    manifest_csv(manifest.assign(head_pose=["left"] + list(pose[1:])), faces_root, f"m-{tmp_path.name}")
    with pytest.raises(DataError, match=re.escape("column head_pose: values ['left'] are not numbers")):
        load_table(cfg)

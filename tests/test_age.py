"""Age from years: every age loss gives group probabilities that sum to 1 and agree with the bins, trains, and
the report shows where age errors come from (and the error in years where the head predicts years)."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from multitask import age
from multitask.config import LOSSES, ConfigError, load_config
from multitask.trainer import run_cv
from multitask.data.table import training_targets
from multitask.data.sources import load_competition
from multitask.model import build_model
from multitask.predict import predict
from multitask.report import write_report

from conftest import tiny_overrides

THRESHOLDS = [30, 60]


@pytest.mark.parametrize("loss", LOSSES)
def test_group_probabilities_sum_to_one_for_every_loss(loss):
    logits = torch.randn(64, age.output_size(loss, 3), generator=torch.Generator().manual_seed(0)) * 3
    p = age.class_probabilities(loss, logits, THRESHOLDS)
    assert p.shape == (64, 3) and (p >= -1e-6).all()
    assert torch.allclose(p.sum(1), torch.ones(64), atol=1e-5)


def test_dldl_groups_are_the_year_probabilities_summed_within_the_bins():
    logits = torch.randn(4, age.YEARS, generator=torch.Generator().manual_seed(1))
    years = logits.softmax(1)
    p = age.class_probabilities("dldl", logits, THRESHOLDS)
    assert torch.allclose(p[:, 0], years[:, :30].sum(1)) and torch.allclose(p[:, 2], years[:, 60:].sum(1))


def test_regression_picks_the_group_of_the_predicted_age():
    ages = torch.tensor([18.0, 29.4, 29.6, 45.0, 59.4, 59.6, 80.0])
    logits = ((ages - 40) / age.DECADE)[:, None]
    assert torch.allclose(age.expected_years("regression", logits), ages)
    groups = age.class_probabilities("regression", logits, THRESHOLDS).argmax(1)
    assert groups.tolist() == np.digitize(np.round(ages.numpy()), THRESHOLDS).tolist() == [0, 0, 1, 1, 1, 2, 2]


def test_ordinal_follows_the_thresholds_passed():
    # P(group > 0), P(group > 1): confident "older than 30, not older than 60" is the middle group
    p = age.class_probabilities("ordinal", torch.tensor([[4.0, -4.0], [-4.0, -4.0], [4.0, 4.0]]), THRESHOLDS)
    assert p.argmax(1).tolist() == [1, 0, 2]


@pytest.mark.parametrize("loss", ["ordinal", "dldl", "regression"])
def test_the_losses_fall_when_the_prediction_moves_to_the_truth(loss):
    if loss == "ordinal":
        target, good, bad = torch.tensor([1]), torch.tensor([[5.0, -5.0]]), torch.tensor([[-5.0, 5.0]])
    elif loss == "dldl":
        target = torch.tensor([35])
        good = torch.full((1, age.YEARS), -5.0)
        good[0, 33:38] = 5.0
        bad = torch.full((1, age.YEARS), -5.0)
        bad[0, 70:75] = 5.0
    else:
        target, good, bad = torch.tensor([35]), torch.tensor([[-0.5]]), torch.tensor([[3.0]])
    assert age.age_loss(loss, good, target).item() < age.age_loss(loss, bad, target).item()


def test_years_losses_train_on_the_exact_age(faces_root):
    table, _ = load_competition(faces_root)
    for loss, expected in (("dldl", table["age"]), ("regression", table["age"]), ("ordinal", table["age_group"])):
        cfg = load_config([f"heads.2.loss={loss}"])
        assert training_targets(cfg, table)[:, 2].tolist() == expected.astype(int).tolist()


def test_training_age_groups_with_a_years_loss_are_an_error_not_ignored():
    for loss in ("dldl", "regression"):  # they learn the years: training groups would change nothing
        with pytest.raises(ConfigError, match=re.escape(f"data.train_age_thresholds=[30, 58]: heads[2].loss={loss} "
                                                        "learns the years")):
            load_config([f"heads.2.loss={loss}", "data.train_age_thresholds=[30,58]"])
    cfg = load_config(["heads.2.loss=ordinal", "data.train_age_thresholds=[30,58]"])
    assert cfg.data.train_age_thresholds == [30, 58]


def test_the_model_outputs_what_each_loss_needs():
    for loss, size in (("ce", 3), ("ordinal", 2), ("dldl", age.YEARS), ("regression", 1)):
        cfg = load_config([f"heads.2.loss={loss}", "model.arch=mobilenet_v3_small"])
        model, _ = build_model(cfg.model, cfg.heads)
        out = model.eval()(torch.randn(2, 3, 64, 64))
        assert out.shape == (2, 3 + 2 + size)
        probs = model.probabilities(out)
        assert all(torch.allclose(p.sum(1), torch.ones(2), atol=1e-5) for p in probs.values())
        assert set(model.years(out)) == ({"age"} if age.uses_years(loss) else set())


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ordinal", "dldl", "regression"])
def test_each_age_loss_trains_and_the_report_shows_age_by_year(faces_root, tmp_path, loss):
    cfg = load_config(tiny_overrides(faces_root, tmp_path) + [f"heads.2.loss={loss}", "cv.folds=2",
                                                              "cv.run_folds=[0]", "stage2.epochs=2"])
    run = tmp_path / "run"
    run_cv(cfg, run, log=lambda s: None)
    report = write_report(run)
    oof = pd.read_csv(run / "oof.csv")
    p = oof[["p_age_<30", "p_age_30-59", "p_age_60+"]].to_numpy()
    assert np.allclose(p.sum(1), 1, atol=1e-4) and (oof["pred_age"] == p.argmax(1)).all()
    assert report["age"]["by_year"] and "## Age by year" in (run / "report.md").read_text()
    if age.uses_years(loss):
        expected = (oof["years_age"] - oof["age"]).abs().mean()
        assert report["age"]["mae_years"][0] == pytest.approx(expected)
        assert (run / "plots" / "age_predicted_vs_true.png").exists()
        oof[["path"]].to_csv(tmp_path / "photos.csv", index=False)  # predict gives the same years
        again = predict(run, tmp_path / "photos.csv", tmp_path / "p", progress=False, log=lambda s: None)
        np.testing.assert_allclose(again["years_age"], oof["years_age"], atol=0.05)
    else:
        assert "mae_years" not in report["age"]
    assert json.loads((run / "report.json").read_text())["age"]["by_year"]

"""The learning rate is a pure function of (epoch, config): warmup, step, cosine, an Adam -> SGD switch and a
resume in the middle all give the rate the formula says, epoch by epoch."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from multitask.config import load_config
from multitask.optim import learning_rates_at
from multitask.training.cv import run_cv

from conftest import tiny_overrides

BASE = (1e-3, 2e-3)


def rates(*overrides, epochs=8):
    cfg = load_config(list(overrides))
    return [learning_rates_at(cfg.optim, BASE, e, epochs) for e in range(epochs)]


def test_step_schedule_halves_every_step():
    got = rates("optim.scheduler=step", "optim.step_every=3", "optim.step_gamma=0.5")
    assert [r[1] for r in got] == pytest.approx([2e-3] * 3 + [1e-3] * 3 + [5e-4] * 2)
    assert all(t == pytest.approx(h / 2) for t, h in got)  # trunk and heads keep their ratio


def test_cosine_with_warmup():
    got = rates("optim.scheduler=cosine", "optim.warmup_epochs=2")
    assert got[0][0] == pytest.approx(1e-3 / 3) and got[1][0] == pytest.approx(2e-3 / 3)
    span = 6
    for e in range(2, 8):
        expected = 1e-3 * (0.5 * (1 + math.cos(math.pi * (e - 2) / span)) * 0.99 + 0.01)
        assert got[e][0] == pytest.approx(expected)


def test_the_sgd_switch_scales_the_scheduled_rate_once():
    adam = rates("optim.scheduler=cosine")
    switched = rates("optim.scheduler=cosine", "optim.sgd_after=4", "optim.sgd_lr_scale=10")
    assert switched[:4] == adam[:4]
    for e in range(4, 8):  # the cosine value of that epoch, times the SGD scale: not decayed twice
        assert switched[e][0] == pytest.approx(adam[e][0] * 10)


@pytest.mark.slow
def test_rates_in_the_metrics_follow_the_formula_across_a_switch_and_a_resume(faces_root, tmp_path, monkeypatch):
    import multitask.training.stage as stage_module

    overrides = tiny_overrides(faces_root, tmp_path) + [
        "cv.run_folds=[0]", "stage1.enabled=false", "stage2.epochs=6", "optim.sgd_after=2", "optim.sgd_lr_scale=5"]
    cfg = load_config(overrides)
    run = tmp_path / "run"
    original, calls = stage_module.train_one_epoch, []

    def stop_after_four(*args, **kw):  # a crash in the middle of epoch 5, after the switch
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(*args, **kw)

    monkeypatch.setattr(stage_module, "train_one_epoch", stop_after_four)
    with pytest.raises(KeyboardInterrupt):
        run_cv(cfg, run, log=lambda s: None)
    monkeypatch.setattr(stage_module, "train_one_epoch", original)
    run_cv(cfg, run, log=lambda s: None)  # resume: same directory, continues at epoch 5
    metrics = pd.read_csv(run / "fold0" / "stage2" / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2, 3, 4, 5, 6]
    # cosine over 6 epochs from lr_scratch, times sgd_lr_scale from epoch 2 (0-based) on, written out by hand
    cosine = [1e-3 * (0.5 * (1 + math.cos(math.pi * e / 6)) * 0.99 + 0.01) for e in range(6)]
    expected = [rate * (5 if e >= 2 else 1) for e, rate in enumerate(cosine)]
    assert metrics["lr_trunk"].tolist() == pytest.approx(expected)
    assert metrics["lr_heads"].tolist() == pytest.approx(expected)

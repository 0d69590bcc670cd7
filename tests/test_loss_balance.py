"""loss.balance=uncertainty: each head's loss learns its own weight (Kendall et al.), trained with the model."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from multitask.config import ConfigError, face_heads, load_config
from multitask.losses import MultiHeadLoss
from multitask.model import MultiHeadNet
from multitask.optim import make_optimizer, optimizer_for_epoch


def balanced_loss(*overrides) -> MultiHeadLoss:
    return MultiHeadLoss(["gender", "age"], [1.0, 1.0], load_config(["loss.balance=uncertainty", *overrides]).loss)


def test_fixed_balance_is_the_weighted_sum_and_learns_nothing():
    loss_fn = MultiHeadLoss(["gender", "age"], [1.0, 2.0], load_config([]).loss)
    logits = {"gender": torch.tensor([[2.0, -1.0]]), "age": torch.tensor([[0.0, 1.0, 0.0]])}
    total, parts = loss_fn(logits, torch.tensor([[1, 2]]))
    assert torch.isclose(total, parts["gender"] + 2 * parts["age"])
    assert list(loss_fn.parameters()) == [] and loss_fn.balance() == {}


def test_each_head_learns_the_weight_its_loss_calls_for():
    """With one head's loss high and the other's low, exp(-s) goes to 1 / loss: the head that stays uncertain
    counts less."""
    loss_fn = balanced_loss()
    logits = {"gender": torch.tensor([[0.0, 3.0]] * 8), "age": torch.tensor([[0.0, 0.0, 0.0]] * 8)}
    targets = torch.tensor([[1, 0]] * 8)  # gender is easy (low loss), age a coin toss of three (high)
    optimizer = torch.optim.SGD(loss_fn.parameters(), lr=0.1)
    for _ in range(300):
        total, parts = loss_fn(logits, targets)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    weights = loss_fn.balance()
    assert weights["balance_gender"] > 2 * weights["balance_age"]
    for head in ("gender", "age"):
        assert weights[f"balance_{head}"] == pytest.approx(1 / parts[head].item(), rel=0.05)


def test_the_optimizer_learns_the_balance_at_the_heads_rate_without_weight_decay():
    model = MultiHeadNet(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)), 4, face_heads())
    loss_fn = balanced_loss()
    o = load_config(["optim.weight_decay=0.05"]).optim
    optimizer = make_optimizer(o, model, (1e-4, 1e-3), False, list(loss_fn.parameters()))
    group = optimizer.param_groups[-1]
    assert group["name"] == "loss" and group["weight_decay"] == 0.0 and group["params"][0] is loss_fn.log_variances
    optimizer, rates = optimizer_for_epoch(o, model, optimizer, (1e-4, 1e-3), 3, 8, list(loss_fn.parameters()))
    assert optimizer.param_groups[-1]["lr"] == rates[1]


def test_an_unknown_balance_is_named():
    with pytest.raises(ConfigError, match="loss.balance"):
        load_config(["loss.balance=gradnorm"])


@pytest.mark.slow
def test_a_run_records_each_heads_learned_weight_every_epoch(tiny_config, tmp_path):
    from multitask.training.cv import run_cv

    run_cv(tiny_config("cv.run_folds=[0]", "loss.balance=uncertainty"), tmp_path / "run", log=lambda s: None)
    stage1 = pd.read_csv(tmp_path / "run" / "fold0" / "stage1" / "metrics.csv")
    stage2 = pd.read_csv(tmp_path / "run" / "fold0" / "stage2" / "metrics.csv")
    assert {"balance_gender", "balance_age"} <= set(stage1) and "balance_mask" not in stage1
    assert {"balance_mask", "balance_gender", "balance_age"} <= set(stage2)
    assert (stage2[["balance_mask", "balance_gender", "balance_age"]] != 1.0).all().all()  # they were learned

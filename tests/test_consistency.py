"""loss.person_consistency: a person's masked photos learn the age and gender their unmasked photos are given."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from multitask.config import ConfigError, face_heads, load_config
from multitask.losses import MultiHeadLoss, PersonConsistency, person_targets
from multitask.model import MultiHeadNet


def test_person_targets_come_from_the_same_persons_unmasked_photos_only():
    persons = np.array(["a", "a", "a", "b", "b", "c"])
    unmasked = np.array([True, False, False, True, False, False])
    probs = np.array([[0.2, 0.8], [0.6, 0.4]])  # the unmasked photos of a and b, in row order
    got = person_targets(persons, unmasked, probs)
    np.testing.assert_allclose(got[[1, 2]], [[0.2, 0.8]] * 2)  # a's masked photos: a's unmasked one
    np.testing.assert_allclose(got[4], [0.6, 0.4])  # b's masked photo: b's, never a's
    assert np.isnan(got[[0, 3, 5]]).all()  # the unmasked photos themselves, and c, who has none


def test_person_targets_average_a_persons_unmasked_photos():
    got = person_targets(np.array(["a", "a", "a"]), np.array([True, True, False]), np.array([[1.0, 0], [0, 1.0]]))
    np.testing.assert_allclose(got[2], [0.5, 0.5])


def test_the_term_pulls_a_masked_photos_age_towards_its_persons_unmasked_one():
    torch.manual_seed(0)
    heads = face_heads()
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU())
    model = MultiHeadNet(trunk, 16, heads)
    masked = torch.randn(4, 3, 8, 8)  # four masked photos of one person
    unmasked_age = np.array([[0.05, 0.15, 0.8]])  # what the person's unmasked photo was given: 60+
    person = person_targets(np.array(["p"] * 5), np.array([True] + [False] * 4), unmasked_age)[1:]
    consistency = PersonConsistency({"age": slice(0, 3)}, weight=1.0, temperature=2.0)
    # no label loss at all (weight 0, no labels): whatever moves the age is the consistency term
    loss_fn = MultiHeadLoss(["age"], [0.0], load_config([]).loss, soft_terms=[consistency])
    targets = torch.full((4, 3), -1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def p_60() -> float:
        model.eval()
        with torch.no_grad():
            return model.probabilities(model(masked))["age"][:, 2].mean().item()

    before, kl = p_60(), []
    for _ in range(40):
        model.train()
        total, parts = loss_fn(model.split(model(masked)), targets, soft=torch.as_tensor(person))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        kl.append(parts["consistency"].item())
    assert kl[-1] < kl[0] / 4
    assert before < 0.5 < p_60()  # the masked photos now read the age the unmasked one was given


def test_rows_without_a_person_target_add_nothing():
    consistency = PersonConsistency({"gender": slice(0, 2)}, weight=1.0, temperature=1.0)
    loss_fn = MultiHeadLoss(["gender"], [1.0], load_config([]).loss, soft_terms=[consistency])
    logits = {"gender": torch.randn(3, 2, requires_grad=True)}
    targets = torch.tensor([[0], [1], [0]])
    soft = torch.full((3, 2), float("nan"))
    total, parts = loss_fn(logits, targets, soft=soft)
    assert parts["consistency"].item() == 0.0 and total.item() == parts["gender"].item()
    total.backward()  # the zero keeps the graph
    soft[1] = torch.tensor([0.9, 0.1])  # one row with a target: the term is that row's KL alone
    _, parts = loss_fn(logits, targets, soft=soft)
    assert parts["consistency"].item() == pytest.approx(consistency(
        {"gender": logits["gender"][1:2]}, soft[1:2]).item())


@pytest.mark.parametrize("overrides, message", [
    (["loss.person_consistency=0.5", "augment.mix=mixup"],
     "loss.person_consistency with augment.mix=mixup: a mixed photo has no one person"),
    (["loss.person_consistency=-1"], "loss.person_consistency=-1.0: must be >= 0"),
    (["loss.consistency_temperature=0"], "loss.consistency_temperature=0.0: must be > 0"),
])
def test_a_consistency_setting_that_cannot_work_is_named(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides)


def test_consistency_needs_a_head_with_an_absent_class(tmp_path):
    heads = tmp_path / "heads.yaml"
    heads.write_text("heads:\n  - {name: mask, column: mask, classes: [worn, incorrect, not_worn]}\n"
                     "  - {name: gender, column: gender, classes: [male, female]}\n"
                     "stage1:\n  heads: [gender]\n")
    with pytest.raises(ConfigError, match="loss.person_consistency: needs a head with an absent class"):
        load_config([str(heads), "loss.person_consistency=0.5"])


@pytest.mark.slow
def test_a_run_with_the_term_trains_it_from_the_second_stage_on(tiny_config, tmp_path):
    from multitask.training.cv import run_cv

    cfg = tiny_config("cv.run_folds=[0]", "loss.person_consistency=1.0")
    run_cv(cfg, tmp_path / "run", log=lambda s: None)
    stage1 = pd.read_csv(tmp_path / "run" / "fold0" / "stage1" / "metrics.csv")
    stage2 = pd.read_csv(tmp_path / "run" / "fold0" / "stage2" / "metrics.csv")
    assert "loss_consistency" not in stage1 and (stage2["loss_consistency"] > 0).all()

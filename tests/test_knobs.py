"""Recipe knobs that could silently do nothing: each test fails if its knob is ignored."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from multitask.config import load_config
from multitask.folds import stage_split
from multitask.data.table import eval_targets, training_targets
from multitask.data.sources import load_competition
from multitask.engine import Runtime
from multitask.losses import MultiHeadLoss, mix_batch


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 16, 12, generator=g)
    y = torch.stack([torch.arange(n) % 3, torch.arange(n) % 2, (torch.arange(n) + 1) % 3], 1)
    return x, y


def test_mixup_blends_two_photos_and_their_targets():
    cfg = load_config(["augment.mix=mixup", "augment.mix_prob=1"])
    x, y = batch()
    mixed, ya, yb, lam = mix_batch(x, y, cfg.augment, np.random.default_rng(0))
    assert 0 < lam < 1 and yb is not None and not torch.equal(yb, ya)
    partner = (mixed - lam * x) / (1 - lam)  # each photo is lam of itself and 1 - lam of another
    assert any(torch.allclose(partner[0], x[j], atol=1e-5) for j in range(len(x)))


def test_cutmix_pastes_a_box_and_weights_by_its_area():
    cfg = load_config(["augment.mix=cutmix", "augment.mix_prob=1"])
    x, y = batch()
    mixed, _, yb, lam = mix_batch(x, y, cfg.augment, np.random.default_rng(3))
    changed = (mixed != x).any(1)  # pixels taken from another photo
    assert yb is not None and 0 < lam <= 1
    assert changed[0].float().mean().item() == pytest.approx(1 - lam, abs=0.15)


def test_vertical_cutmix_swaps_the_right_half():
    cfg = load_config(["augment.mix=cutmix_vertical", "augment.mix_prob=1"])
    x, y = batch()
    mixed, _, yb, lam = mix_batch(x, y, cfg.augment, np.random.default_rng(1))
    assert lam == 0.5 and torch.equal(mixed[..., :6], x[..., :6]) and not torch.equal(mixed[..., 6:], x[..., 6:])


def test_no_mix_leaves_the_batch_alone():
    x, y = batch()
    same, _, yb, lam = mix_batch(x, y, load_config().augment, np.random.default_rng(0))
    assert same is x and yb is None and lam == 1.0


def test_focal_loss_weighs_down_the_easy_examples():
    logits = {"mask": torch.tensor([[6.0, 0.0, 0.0], [0.2, 0.0, 0.1]])}  # one easy, one hard
    targets = torch.tensor([[0], [0]])
    ce = MultiHeadLoss(["mask"], [1.0], load_config(["loss.label_smoothing=0"]).loss)
    focal = MultiHeadLoss(["mask"], [1.0], load_config(["loss.label_smoothing=0", "loss.focal_gamma=2"]).loss)
    each_ce = [ce({"mask": logits["mask"][i:i + 1]}, targets[i:i + 1])[0].item() for i in range(2)]
    each_focal = [focal({"mask": logits["mask"][i:i + 1]}, targets[i:i + 1])[0].item() for i in range(2)]
    assert each_focal[0] < each_ce[0] * 0.01 and each_focal[1] > each_ce[1] * 0.3


def test_dropped_ages_leave_training_but_not_validation(faces_root):
    table, _ = load_competition(faces_root)
    table = table.assign(fold=table["person_id"].astype(int) % 3, extra=False, stage1_only=False)
    age = int(table["age"].iloc[0])
    cfg = load_config([f"data.drop_train_ages=[{age}]"])
    for fold in range(3):
        train, val = stage_split(cfg, table, fold, 2)
        assert age not in set(train["age"])
        assert set(val["person_id"]) == set(table.loc[table["fold"] == fold, "person_id"])  # validation unchanged


def test_training_age_thresholds_change_training_targets_only(faces_root):
    table, _ = load_competition(faces_root)
    cfg = load_config(["data.train_age_thresholds=[25,40]"])
    age_col = [h.name for h in cfg.heads].index("age")
    train = training_targets(cfg, table)[:, age_col]
    true = eval_targets(cfg, table)[:, age_col]
    ages = table["age"].to_numpy()
    assert (train == np.digitize(ages, [25, 40])).all() and (true == np.digitize(ages, [30, 60])).all()
    assert (train != true).any()


def test_bench_cams_work_for_a_trunk_without_layer4():
    from multitask.bench import cam_latency

    cfg = load_config(["model.arch=mobilenet_v3_small", "data.size=[64,64]"])
    grid_s, single_s = cam_latency(cfg, torch.device("cpu"))
    assert grid_s > 0 and single_s > 0


def test_bench_reports_a_compiler_that_cannot_run_here_instead_of_stopping(monkeypatch):
    from multitask import bench

    def no_compiler(model):
        raise RuntimeError("no working C compiler\ndetails")

    monkeypatch.setattr(torch, "compile", no_compiler)
    r = bench.compiled_vs_eager(load_config(["data.size=[32,32]"]), 2, Runtime(torch.device("cpu")),
                                {"img_s": 10.0, "spread": 0.1})
    assert r["error"] == "RuntimeError: no working C compiler" and "torch.compile failed here" in r["summary"]

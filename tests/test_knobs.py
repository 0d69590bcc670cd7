"""Recipe knobs that could silently do nothing: each test fails if its knob is ignored."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from multitask.config import load_config
from multitask.folds import stage_split
from multitask.data.table import eval_targets, training_targets
from multitask.data.sources import load_competition
from multitask.engine import Runtime, weight_average
from multitask.losses import MultiHeadLoss, mix_batch
from multitask.training.cv import run_cv

from conftest import tiny_overrides


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
    cfg = load_config(["heads.2.train_thresholds=[25,40]"])
    age_col = [h.name for h in cfg.heads].index("age")
    train = training_targets(cfg, table)[:, age_col]
    true = eval_targets(cfg, table)[:, age_col]
    ages = table["age"].to_numpy()
    assert (train == np.digitize(ages, [25, 40])).all() and (true == np.digitize(ages, [30, 60])).all()
    assert (train != true).any()


def test_the_bench_times_a_cam_for_every_layer_and_head_of_a_trunk_without_layer4(monkeypatch):
    from multitask import bench

    grids, real = [], bench.cam_grid
    monkeypatch.setattr(bench, "cam_grid", lambda *a, **kw: grids.append(real(*a, **kw)) or grids[-1])
    cfg = load_config(["model.arch=mobilenet_v3_small", "data.size=[64,48]"])
    grid_s, single_s = bench.cam_latency(cfg, torch.device("cpu"))
    timed = grids[-1]
    assert len(timed.layers) == 4 and timed.heads == [h.name for h in cfg.heads]
    assert all(timed.cams[layer][head].shape == (1, 64, 48) for layer in timed.layers for head in timed.heads)
    assert 0 < single_s < 60 and 0 < grid_s < 60


def test_bench_reports_a_compiler_that_cannot_run_here_instead_of_stopping(monkeypatch):
    from multitask import bench

    def no_compiler(model):
        raise RuntimeError("no working C compiler\ndetails")

    monkeypatch.setattr(torch, "compile", no_compiler)
    r = bench.compiled_vs_eager(load_config(["data.size=[32,32]"]), 2, Runtime(torch.device("cpu")),
                                {"img_s": 10.0, "spread": 0.1})
    assert r["error"] == "RuntimeError: no working C compiler" and "torch.compile failed here" in r["summary"]


def test_the_weight_average_follows_each_step_with_its_decay():
    model = torch.nn.Linear(2, 1)
    ema = weight_average(model, 0.9)
    first = model.weight.detach().clone()
    ema.update_parameters(model)  # the first step copies
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update_parameters(model)
    assert torch.allclose(ema.module.weight, 0.9 * first + 0.1 * model.weight)
    assert weight_average(model, 0.0) is None


@pytest.mark.slow
def test_with_a_weight_average_a_resumed_stage_keeps_the_same_average(faces_root, tmp_path, monkeypatch):
    """The average is part of the stage's checkpoint: a stage stopped after epoch 2 and resumed ends with the
    average of an uninterrupted run; validation and best.pt use the average, not the last weights."""
    import multitask.training.stage as stage_module
    from multitask.model import load_checkpoint

    overrides = tiny_overrides(faces_root, tmp_path) + [
        "cv.run_folds=[0]", "stage1.enabled=false", "stage2.epochs=3", "optim.ema_decay=0.9", "train.threads=1",
        "train.weights_dtype=fp32"]
    original = stage_module.train_one_epoch

    def recording(into, stop_at=None):
        def train_one_epoch(model, *args, **kw):
            if len(into) + 1 == stop_at:
                raise KeyboardInterrupt
            out = original(model, *args, **kw)
            copy = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}  # noqa: E731
            into.append((copy(model), copy(kw["ema"].module)))
            return out
        return train_one_epoch

    whole, resumed = [], []
    monkeypatch.setattr(stage_module, "train_one_epoch", recording(whole))
    run_cv(load_config(overrides), tmp_path / "whole", log=lambda s: None)
    monkeypatch.setattr(stage_module, "train_one_epoch", recording(resumed, stop_at=3))
    with pytest.raises(KeyboardInterrupt):
        run_cv(load_config(overrides), tmp_path / "resumed", log=lambda s: None)
    monkeypatch.setattr(stage_module, "train_one_epoch", recording(resumed))
    run_cv(load_config(overrides), tmp_path / "resumed", log=lambda s: None)
    assert len(whole) == len(resumed) == 3
    (raw, average), (_, resumed_average) = whole[-1], resumed[-1]
    for name, tensor in average.items():
        assert torch.allclose(tensor.float(), resumed_average[name].float(), atol=1e-6), name
    assert not torch.allclose(raw["heads.mask.1.weight"], average["heads.mask.1.weight"])
    best = load_checkpoint(tmp_path / "whole" / "fold0" / "stage2" / "best.pt")["model"]
    assert any(torch.equal(best["heads.mask.1.weight"], a["heads.mask.1.weight"]) for _, a in whole)


def test_a_stage_size_trains_and_validates_that_stage_smaller(faces_root, tmp_path, monkeypatch):
    """Progressive resizing: stage 1 at ``stage1.size`` from the same prepared photos, stage 2 at data.size."""
    import multitask.training.stage as stage_module

    seen = []
    original_train, original_validate = stage_module.train_one_epoch, stage_module.validation_outputs

    def train_one_epoch(model, loader, *args, **kw):
        seen.append(("train", tuple(next(iter(loader))[0].shape[1:])))
        return original_train(model, loader, *args, **kw)

    def validate(ctx, model, loader):
        seen.append(("val", tuple(next(iter(loader))[0].shape[1:])))
        return original_validate(ctx, model, loader)

    monkeypatch.setattr(stage_module, "train_one_epoch", train_one_epoch)
    monkeypatch.setattr(stage_module, "validation_outputs", validate)
    logged = []
    cfg = load_config(tiny_overrides(faces_root, tmp_path) + [
        "cv.run_folds=[0]", "data.size=[48,40]", "stage1.size=[40,32]", "train.threads=1", "data.workers=0"])
    run_cv(cfg, tmp_path / "run", log=logged.append)
    small, full = (3, 40, 32), (3, 48, 40)
    # stage 1: its epoch and validation; stage 2: its epoch, validation, and the kept model's out-of-fold pass
    # over predict's two views (the photo and its mirror)
    assert seen == [("train", small), ("val", small), ("train", full), ("val", full), ("val", full), ("val", full)]
    assert any("stage 1 1 epochs of" in line and "at 40x32" in line for line in logged)

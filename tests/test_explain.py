"""Grad-CAM for every stage x every head: shapes, cost, CLI output, and sanity checks that can fail."""
from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from multitask.config import load_config
from multitask.data.transforms import load_size
from multitask.data.photoset import photo_set
from multitask.explain import METHODS, cam_grid, faithfulness, main as explain_main, network_inputs
from multitask.run import RunDir

pytestmark = pytest.mark.slow


def fold0(run):
    cfg = load_config(base=run / "config.yaml")
    return cfg, RunDir(run).load_models(cfg, [0])[0]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_a_map_per_layer_and_head(trained_run, method):
    cfg, model = fold0(trained_run)
    n = 1 if method == "scorecam" else 2  # ScoreCAM runs a forward pass per channel and photo
    x = torch.randn(n, 3, *cfg.data.size)
    grid = cam_grid(model, x, method)
    assert grid.layers == ["layer1", "layer2", "layer3", "layer4"] and grid.heads == ["mask", "gender", "age"]
    for layer in grid.layers:
        for head in grid.heads:
            cam = grid.cams[layer][head]
            assert cam.shape == (n, *cfg.data.size) and np.isfinite(cam).all()
            assert cam.min() >= 0 and cam.max() <= 1 + 1e-6


def test_one_forward_and_one_backward_per_head(trained_run):
    cfg, model = fold0(trained_run)
    calls = {"forward": 0}
    model.register_forward_hook(lambda *a: calls.__setitem__("forward", calls["forward"] + 1))
    backward = []
    model.heads["mask"].register_full_backward_hook(lambda *a: backward.append("mask"))
    cam_grid(model, torch.randn(3, 3, *cfg.data.size), "gradcam")
    assert calls["forward"] == 1
    assert len(backward) == 3  # the graph is walked once per head (each passes the mask head's output node)


def test_target_class_can_be_chosen(trained_run):
    cfg, model = fold0(trained_run)
    x = torch.randn(2, 3, *cfg.data.size)
    grid = cam_grid(model, x, "gradcam", target_classes={"mask": 1})
    assert grid.targets["mask"].tolist() == [1, 1]
    assert grid.targets["gender"].tolist() == grid.probs["gender"].argmax(1).tolist()


def test_faithfulness_readout_per_head(trained_run):
    cfg, model = fold0(trained_run)
    x = torch.randn(2, 3, *cfg.data.size)
    scores = faithfulness(model, x, cam_grid(model, x))
    assert set(scores) == {"mask", "gender", "age"}
    for v in scores.values():
        assert v["confidence_change"].shape == v["road"].shape == (2,)
        assert np.isfinite(v["confidence_change"]).all() and np.isfinite(v["road"]).all()


def test_cli_writes_a_grid_per_photo_and_predictions(trained_run, faces_root, tmp_path, capsys):
    person = sorted((faces_root / "images").iterdir())[0]
    out = subprocess.run([sys.executable, "-m", "multitask.explain", "--run", str(trained_run), str(person),
                          "--out", str(tmp_path), "--method", "gradcam++", "--target", "mask=worn", "--faithfulness"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert len(list(tmp_path.glob("*_cams.png"))) == 7
    df = pd.read_csv(tmp_path / "predictions.csv")
    assert len(df) == 7 and {"p_mask_worn", "gender_class", "grid", "mask_road", "age_confidence_change"} <= set(df.columns)
    assert explain_main(["--run", str(trained_run), str(person), "--out", str(tmp_path), "--target",
                         "mask=sideways"]) == 2
    assert "mask=sideways" in capsys.readouterr().err


def to_original(cfg, u, v, width, height):
    """Network-input pixel (u, v) -> pixel of the original photo, undoing crop, resize and centre crop."""
    ch, cw = cfg.data.crop if cfg.data.crop and height >= cfg.data.crop[0] and width >= cfg.data.crop[1] \
        else (height, width)
    lh, lw = load_size(cfg.data)
    h, w = cfg.data.size
    x = (u + 0.5 + (lw - w) / 2) * cw / lw + (width - cw) / 2
    y = (v + 0.5 + (lh - h) / 2) * ch / lh + (height - ch) / 2
    return x, y


def masked_validation_photos(run):
    data = pd.read_csv(run / "data.csv")
    oof = pd.read_csv(run / "fold0" / "oof.csv")
    worn = oof[(oof["true_mask"] == 0) & (oof["pred_mask"] == 0)]
    root = run.parent.parent / "faces"
    boxes = pd.read_csv(root / "boxes.csv")
    boxes["path"] = [str((root / p).resolve()) for p in boxes["path"]]
    return worn.merge(boxes, on="path"), data


def framed(run, cfg, photos):
    """The network inputs of these photos, framed as the run frames them."""
    framed = photo_set(cfg, photos[["path"]], lambda s: None, RunDir(run).typical_face_boxes(), cache=True)
    assert not framed.unreadable
    return network_inputs(framed, framed.table)[0]


def test_mask_head_looks_at_the_mask(learned_run):
    """Sanity check (a): layer3's mask-head CAM peaks inside the mask box on >= 90% of correctly classified
    photos with a mask worn correctly.

    The peak is read at the CAM's own resolution: the argmax of a bilinear upsampling lands on a cell centre, so
    the box is grown by half a cell (in original pixels). Layer3 (16-px cells here), not layer4: layer4's grid is
    3x3, where the grown box holds about three quarters of the cell centres, so a peak inside it says little
    (the same recipe trained at 1 and at 2 threads put 72% and 99% there). At layer3 the grown box holds about
    half of the cell centres, and both models put 98-100% of the peaks inside."""
    cfg, model = fold0(learned_run)
    photos, _ = masked_validation_photos(learned_run)
    assert len(photos) >= 100
    x = framed(learned_run, cfg, photos)
    layer, cell = "layer3", 16  # its cells in network-input pixels
    half_x, half_y = (np.subtract(to_original(cfg, cell, cell, 96, 128), to_original(cfg, 0, 0, 96, 128)) / 2)
    inside = []
    for start in range(0, len(x), 64):
        cams = cam_grid(model, x[start:start + 64], "gradcam", heads=["mask"], layers=[layer])
        for i, cam in enumerate(cams.cams[layer]["mask"]):
            row = photos.iloc[start + i]
            v, u = np.unravel_index(cam.argmax(), cam.shape)
            px, py = to_original(cfg, u, v, 96, 128)
            inside.append(row.mask_x0 - half_x <= px <= row.mask_x1 + half_x
                          and row.mask_y0 - half_y <= py <= row.mask_y1 + half_y)
    assert np.mean(inside) >= 0.9, f"CAM peak inside the mask box on {np.mean(inside):.0%} of photos"


def test_cams_change_when_the_trunk_is_randomized(learned_run):
    """Sanity check (b), model randomization: CAMs of a trained model and of the same model with a random
    trunk must not agree (mean Spearman rank correlation below 0.5)."""
    cfg, model = fold0(learned_run)
    photos, _ = masked_validation_photos(learned_run)
    x = framed(learned_run, cfg, photos.iloc[:24])
    random_model = copy.deepcopy(model)
    torch.manual_seed(0)
    for m in random_model.trunk.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    trained = cam_grid(model, x, "gradcam")
    randomized = cam_grid(random_model, x, "gradcam")
    for layer in ("layer3", "layer4"):
        rhos = [spearmanr(trained.cams[layer][h][i].ravel(), randomized.cams[layer][h][i].ravel())[0]
                for h in trained.heads for i in range(len(x))]
        rho = np.nanmean(rhos)
        assert rho < 0.5, f"{layer}: rank correlation {rho:.2f} with a randomized trunk"


def test_cams_from_many_threads_on_shared_models_match_one_at_a_time(trained_run, faces_root):
    """The dashboard shares its models between sessions; overlapping CAM calls must neither fail nor mix."""
    from concurrent.futures import ThreadPoolExecutor

    from multitask.data.images import read_rgb
    from multitask.explain import explain_photo

    cfg = load_config(base=trained_run / "config.yaml")
    models = RunDir(trained_run).load_models(cfg)
    pre = RunDir(trained_run).preprocessing(cfg)
    photos = [read_rgb(p) for p in sorted((faces_root / "images").rglob("*.jpg"))[:8]]
    jobs = [(photo, {0: models[0]} if i % 2 else models, ("gradcam", "layercam")[i % 2])
            for i, photo in enumerate(photos)]
    expected = [explain_photo(m, pre, p, method)[1] for p, m, method in jobs]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda job: explain_photo(job[1], pre, job[0], job[2])[1], jobs * 3))
    for i, grid in enumerate(got):
        want = expected[i % len(jobs)]
        for layer in want.layers:
            for head in want.heads:
                np.testing.assert_allclose(grid.cams[layer][head], want.cams[layer][head], atol=1e-5)

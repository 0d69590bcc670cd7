"""A timm trunk is one setting (model.arch=timm/<name>): a ConvNet and a vision transformer each train, predict,
explain (a CAM per layer x head; the transformer's tokens put back on the patch grid) and export, with no code of
their own outside model.py."""
from __future__ import annotations

import json

import numpy as np
import pytest

from multitask import load_run
from multitask.config import load_config
from multitask.report import write_report
from multitask.training.cv import run_cv

from conftest import tiny_overrides
from test_export import network_batch, run_onnx

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch, layers, mean", [
    ("timm/resnet10t", ["layer1", "layer2", "layer3", "layer4"], 0.485),
    ("timm/vit_tiny_patch16_224", ["blocks.8", "blocks.9", "blocks.10", "blocks.11"], 0.5),
])
def test_a_timm_trunk_trains_predicts_explains_and_exports(arch, layers, mean, faces_root, tmp_path):
    cfg = load_config(tiny_overrides(faces_root, tmp_path) + [
        f"model.arch={arch}", "data.size=[32,32]", "cv.folds=2", "cv.run_folds=[0]", "train.precision=fp32"])
    run = tmp_path / "run"
    run_cv(cfg, run, log=lambda s: None)
    report = write_report(run)
    assert set(report["folds"][0]) == {"mask", "gender", "age", "joint"}

    model = load_run(run)
    photos = sorted((faces_root / "images").iterdir())[0]
    photos = sorted(photos.glob("*.jpg"))[:3]
    table = model.predict(photos)
    probs = table[[c for c in table.columns if c.startswith("p_mask_")]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)

    shown, grid = model.explain(photos[0])
    assert grid.layers == layers and grid.heads == ["mask", "gender", "age"]
    assert all(grid.cams[layer][head].shape == (1, 32, 32) for layer in layers for head in grid.heads)
    assert all(np.isfinite(grid.cams[layer][head]).all() for layer in layers for head in grid.heads)

    model.export(tmp_path / "exported")
    info = json.loads((tmp_path / "exported" / "preprocessing.json").read_text())
    assert info["input"]["mean"][0] == pytest.approx(mean)  # the trunk's own normalisation, as timm resolves it
    assert info["photo_to_input"][-1] == {"step": "normalise", "mean": info["input"]["mean"],
                                          "std": info["input"]["std"]}
    got = run_onnx(tmp_path / "exported" / "model.onnx", network_batch(run, photos))
    np.testing.assert_allclose(got["p_mask"], probs, atol=1e-4)

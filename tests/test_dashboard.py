"""The Streamlit dashboard, driven with AppTest: choose a run, upload a photo, change the CAM method."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from streamlit.testing.v1 import AppTest

from multitask.config import load_config

pytestmark = pytest.mark.slow
APP = str(Path(__file__).resolve().parent.parent / "apps" / "dashboard.py")


@pytest.fixture
def app(trained_run, monkeypatch):
    monkeypatch.setenv("MULTITASK_RUNS", str(trained_run.parent))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def jpeg_bytes(faces_root) -> bytes:
    return next((faces_root / "images").rglob("mask1.jpg")).read_bytes()


def all_text(at) -> str:
    return " ".join(str(e.value) for kind in (at.markdown, at.caption, at.info, at.error, at.warning) for e in kind)


def upload_box(at):
    at.radio[0].set_value("upload").run()
    return at.file_uploader[0]


def test_it_opens_on_the_scores_and_a_held_out_photo_explained(app, trained_run):
    assert not app.exception, app.exception
    report = json.loads((trained_run / "report.json").read_text())
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["18-class macro-F1"] == f"{report['mean']['joint']['f1_macro']:.3f}"
    assert metrics["masked: mask on vs not_worn"] == f"{report['extra_val']['masked']['ensemble']['mask']['on_accuracy']:.3f}"
    assert app.radio[0].value == "held-out photos of the run"
    text = all_text(app)
    assert "Grad-CAM grid" in text and "Explained by the ensemble of folds 0, 1, 2" in text
    assert len(app.get("image")) >= 1 + 4 * 3
    assert any(c.value.startswith("Shown: the ensemble of folds 0, 1, 2") for c in app.sidebar.caption)
    app.sidebar.selectbox[1].set_value("fold 2").run()
    assert "Explained by the model of fold 2." in all_text(app)


def test_the_report_page_shows_the_subgroup_table(app):
    assert any(s.value.startswith("Subgroups") for s in app.subheader)
    table = next(d.value for d in app.dataframe if "group" in d.value.columns)
    assert "largest gap" in table["group"].tolist() and {"mask", "gender", "age", "18-class"} <= set(table.columns)
    app.selectbox(key="report_subgroup").set_value("race").run()
    assert not app.exception, app.exception


def test_the_camera_is_offered(app):
    app.radio[0].set_value("camera").run()
    assert not app.exception, app.exception
    assert len(app.get("camera_input")) == 1


def test_choose_run_upload_and_change_method(app, trained_run, faces_root):
    assert app.sidebar.selectbox[0].value == trained_run  # the run
    app.sidebar.selectbox[1].set_value("fold 1").run()
    upload_box(app).set_value(("face.jpg", jpeg_bytes(faces_root), "image/jpeg")).run()
    assert not app.exception, app.exception
    text = all_text(app)
    assert "Grad-CAM grid" in text and "18-class top 3" in text
    assert "prior: training" not in text  # every head decides as it trained (balanced)
    n_images = len(app.get("image"))
    assert n_images >= 1 + 4 * 3  # the input + a layer x head grid
    app.selectbox(key="photo_method").set_value("layercam").run()
    assert not app.exception, app.exception
    app.slider(key="photo_opacity").set_value(0.8).run()
    app.selectbox(key="photo_t_mask").set_value("incorrect").run()
    assert not app.exception, app.exception
    assert "mask**: incorrect" in all_text(app)
    app.checkbox(key="photo_faith").check().run()
    assert not app.exception, app.exception
    faith = next(d.value for d in app.dataframe if "road" in d.value.columns)
    assert faith["head"].tolist() == ["mask", "gender", "age"] and faith[["confidence_change", "road"]].notna().all().all()


def test_bad_uploads_get_a_message_not_a_traceback(app):
    upload_box(app).set_value(("notes.png", b"this is text", "image/png")).run()
    assert not app.exception
    assert any("Could not read notes.png" in e.value for e in app.error)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, format="PNG")
    app.file_uploader[0].set_value(("cut.png", buf.getvalue()[:60], "image/png")).run()
    assert not app.exception
    assert any("Could not read cut.png" in e.value for e in app.error)


def test_pick_from_the_run_with_filters_and_pages(app, trained_run):
    app.radio[0].set_value("held-out photos of the run").run()
    assert not app.exception, app.exception
    assert "Grad-CAM grid" in all_text(app)  # the first photo of the run, explained
    app.checkbox(key="data_wrong").check().run()
    assert not app.exception, app.exception
    oof = pd.read_csv(trained_run / "oof.csv")
    mistakes = (oof[["true_mask", "true_gender", "true_age"]].to_numpy()
                != oof[["pred_mask", "pred_gender", "pred_age"]].to_numpy()).any(1).sum()
    assert f"photo ({mistakes} match)" in [s.label for s in app.selectbox]
    assert any("Macro-F1 and accuracy per fold" in s.value for s in app.subheader)
    assert any("Most confident mistakes" in s.value for s in app.subheader)


def test_a_mistake_is_explained_by_its_own_fold(app):
    text = all_text(app)
    assert "Explained by the model of fold" in text and "which never saw this photo" in text
    fold = int(text.split("Explained by the model of fold ")[1].split(",")[0])
    shown = app.selectbox(key="mistake_pick").value
    oof = pd.read_csv(Path(app.sidebar.selectbox[0].value) / "oof.csv")
    assert oof.loc[oof["path"] == shown, "fold"].iloc[0] == fold


def test_photos_of_an_extra_validation_set_can_be_picked(app):
    app.radio[0].set_value("extra validation: masked").run()
    assert not app.exception, app.exception
    app.multiselect(key="extra_true").set_value(["not_worn"]).run()
    assert not app.exception, app.exception
    assert "/without_mask/" in app.selectbox(key="extra_pick").value and "Grad-CAM grid" in all_text(app)


def moved_run(trained_run: Path, tmp_path: Path, where) -> Path:
    runs = tmp_path / "runs"
    run = Path(shutil.copytree(trained_run, runs / trained_run.name))
    for name in ("oof.csv", "data.csv"):
        df = pd.read_csv(run / name)
        df["path"] = [where(p) for p in df["path"]]
        df.to_csv(run / name, index=False)
    return run


def test_every_page_works_when_the_photos_have_moved(trained_run, tmp_path, monkeypatch):
    root = load_config(base=trained_run / "config.yaml").data.root
    moved_run(trained_run, tmp_path, lambda p: p.replace(str(Path(root).resolve()), str(Path(root).resolve() / "gone")))
    monkeypatch.setenv("MULTITASK_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception, at.exception
    at.radio[0].set_value("held-out photos of the run").run()
    assert not at.exception, at.exception
    assert any("is missing" in w.value for w in at.warning)
    assert any("Most confident mistakes" in s.value for s in at.subheader)


def test_a_crafted_table_cannot_show_other_files(trained_run, tmp_path, monkeypatch):
    secret = tmp_path / "private" / "secret.jpg"
    secret.parent.mkdir()
    Image.fromarray(np.zeros((48, 40, 3), np.uint8)).save(secret)
    moved_run(trained_run, tmp_path, lambda p: str(secret))
    monkeypatch.setenv("MULTITASK_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.radio[0].set_value("held-out photos of the run").run()
    assert not at.exception, at.exception
    assert any("outside this run's data folders" in e.value for e in at.error)
    assert "Grad-CAM grid" not in all_text(at)


def test_a_head_deciding_with_the_training_frequencies_says_so(trained_run, faces_root, tmp_path, monkeypatch):
    run = Path(shutil.copytree(trained_run, tmp_path / "runs" / "prior"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["heads"][0]["prior"] = "training"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    monkeypatch.setenv("MULTITASK_RUNS", str(run.parent))
    at = AppTest.from_file(APP, default_timeout=120).run()
    upload_box(at).set_value(("face.jpg", jpeg_bytes(faces_root), "image/jpeg")).run()
    assert not at.exception, at.exception
    assert "heads: mask (prior: training), gender, age" in [c.value for c in at.sidebar.caption][-1]
    shown = [c.value for c in at.caption].count("with the training photos' class frequencies (prior: training)")
    assert shown == 2  # under the uploaded photo's mask bars, and under those of the Mistakes tab's photo


def test_no_runs_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTITASK_RUNS", str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception and "No runs in" in at.info[0].value


def test_a_run_folder_without_its_config_is_named_not_hidden(trained_run, tmp_path, monkeypatch):
    damaged = Path(shutil.copytree(trained_run, tmp_path / "runs" / "damaged"))
    (damaged / "config.yaml").unlink()
    monkeypatch.setenv("MULTITASK_RUNS", str(damaged.parent))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert "Not shown, config.yaml missing: damaged" in at.warning[0].value
    assert "No other runs in" in at.info[0].value


def test_every_file_of_the_zoo_uploads_to_a_result_or_a_message(app):
    """The bad-input zoo (test_bad_inputs) through the upload box: no exception, ever."""
    from test_bad_inputs import READABLE, UNREADABLE

    upload_box(app)
    for name, make in READABLE.items():
        app.file_uploader[0].set_value((name, make(), "image/jpeg")).run()
        assert not app.exception, (name, app.exception)
        assert "Grad-CAM grid" in all_text(app), name
    for name, (make, _) in UNREADABLE.items():
        app.file_uploader[0].set_value((name, make(), "image/jpeg")).run()
        assert not app.exception, (name, app.exception)
        expected = "above the limit" if name == "bomb.png" else f"Could not read {name}"
        assert any(expected in e.value for e in app.error), (name, [e.value for e in app.error])


def crafted_run(trained_run, tmp_path, change_config=None, recorded=None, oof_path=None) -> Path:
    run = Path(shutil.copytree(trained_run, tmp_path / "runs" / trained_run.name))
    if change_config:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        change_config(cfg)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    if recorded:
        record = json.loads((run / "run.json").read_text())
        record.update(recorded)
        (run / "run.json").write_text(json.dumps(record))
    if oof_path:
        for name in ("oof.csv", "data.csv"):
            df = pd.read_csv(run / name)
            df["path"] = [oof_path(p) for p in df["path"]]
            df.to_csv(run / name, index=False)
    return run


def secret_photo(tmp_path) -> Path:
    secret = tmp_path / "private" / "secret.jpg"
    secret.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((48, 40, 3), np.uint8)).save(secret)
    return secret


@pytest.mark.parametrize("where", ["data_root in run.json", "cache_dir in config.yaml"])
def test_a_run_claiming_the_whole_disk_as_its_data_shows_nothing_else(where, trained_run, tmp_path, monkeypatch):
    secret = secret_photo(tmp_path)
    if where.startswith("data_root"):
        crafted_run(trained_run, tmp_path, recorded={"data_root": "/"}, oof_path=lambda p: str(secret))
    else:
        crafted_run(trained_run, tmp_path, change_config=lambda c: c["data"].update(cache_dir="/"),
                    oof_path=lambda p: str(secret))
    monkeypatch.setenv("MULTITASK_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception, at.exception
    assert any("outside this run's data folders" in e.value for e in at.error)
    assert "Grad-CAM grid" not in all_text(at)


def test_a_run_on_symlinked_person_folders_shows_its_own_photos(trained_run, faces_root, tmp_path, monkeypatch):
    subset = tmp_path / "subset"
    (subset / "images").mkdir(parents=True)
    shutil.copy(faces_root / "train.csv", subset / "train.csv")
    for person in (faces_root / "images").iterdir():
        (subset / "images" / person.name).symlink_to(person, target_is_directory=True)
    crafted_run(trained_run, tmp_path, change_config=lambda c: c["data"].update(root=str(subset)),
                recorded={"data_root": str(subset)})
    monkeypatch.setenv("MULTITASK_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception, at.exception
    assert not any("outside this run's data folders" in e.value for e in at.error)
    assert "Grad-CAM grid" in all_text(at)


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "config.yaml").write_text("heads: 3\n"), "config.yaml"),
    (lambda r: (r / "run.json").write_text("{"), "run.json: not valid JSON"),
    (lambda r: (r / "fold0" / "stage2" / "best.pt").write_bytes(b"PK\x03\x04 cut"), "best.pt"),
])
def test_a_damaged_run_is_named_on_the_page(damage, message, trained_run, tmp_path, monkeypatch):
    run = crafted_run(trained_run, tmp_path)
    damage(run)
    monkeypatch.setenv("MULTITASK_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception, at.exception
    assert any(message in e.value for e in at.error), [e.value for e in at.error]

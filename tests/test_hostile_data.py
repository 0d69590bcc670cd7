"""Data that is not what the command expects: said plainly, with the file named, never skipped in silence."""
from __future__ import annotations

import os
import shutil

import pandas as pd
import pytest

from multitask.data.check import main as data_main
from multitask.data.sources import load_competition
from multitask.predict import main as predict_main

from test_bad_inputs import no_traceback, run_main


def test_data_check_on_a_photo_says_it_is_not_a_data_set(faces_root, capsys):
    photo = next((faces_root / "images").rglob("normal.jpg"))
    out = run_main(data_main, capsys, "check", photo)
    no_traceback(out)
    assert out.returncode == 1 and "not a data set: give its folder, or a manifest CSV" in out.stdout


def test_data_check_on_images_without_train_csv_says_train_csv_is_missing(faces_copy, capsys):
    (faces_copy / "train.csv").unlink()
    out = run_main(data_main, capsys, "check", faces_copy)
    assert out.returncode == 1 and "train.csv: missing: ROOT/images/ is the competition layout" in out.stdout


@pytest.mark.parametrize("age, message", [("200", "age '200' is outside 0-149 years"),
                                          ("-3", "age '-3' is outside 0-149 years"),
                                          ("31.5", "age '31.5' is not a whole number of years"),
                                          ("old", "age 'old' is not a number of years")])
def test_an_impossible_age_is_named_as_such(age, message, faces_copy):
    people = pd.read_csv(faces_copy / "train.csv", dtype=str)
    people.loc[0, "age"] = age
    people.to_csv(faces_copy / "train.csv", index=False)
    _, problems = load_competition(faces_copy)
    assert any(message in p.message for p in problems), problems


@pytest.mark.slow
def test_predict_on_the_competition_train_csv_reads_its_layout(trained_run, faces_root, tmp_path, capsys):
    out = run_main(predict_main, capsys, "--run", trained_run, faces_root / "train.csv", "--out", tmp_path / "o",
                   "--folds", 0)
    no_traceback(out)
    assert out.returncode == 0, out.stderr
    assert len(pd.read_csv(tmp_path / "o" / "predictions.csv")) == 24 * 7 and (tmp_path / "o" / "report.md").exists()


@pytest.mark.slow
def test_a_broken_link_and_a_fifo_named_like_photos_are_listed_not_skipped_in_silence(trained_run, faces_root,
                                                                                       tmp_path, capsys):
    photos = tmp_path / "photos"
    shutil.copytree(sorted((faces_root / "images").iterdir())[0], photos)
    (photos / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    os.mkfifo(photos / "pipe.jpg")
    out = run_main(predict_main, capsys, "--run", trained_run, photos, "--out", tmp_path / "o", "--folds", 0)
    no_traceback(out)
    assert out.returncode == 0, out.stderr
    skipped = pd.read_csv(tmp_path / "o" / "skipped.csv")
    reasons = dict(zip(skipped["path"].map(lambda p: p.rsplit("/", 1)[-1]), skipped["reason"]))
    assert set(reasons) == {"gone.jpg", "pipe.jpg"}
    assert "FileNotFoundError" in reasons["gone.jpg"] and "not a regular file" in reasons["pipe.jpg"]
    assert len(pd.read_csv(tmp_path / "o" / "predictions.csv")) == 7

"""Data that is not what the command expects: said plainly, with the file named, never skipped in silence."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from multitask.data.check import main as data_main
from multitask.data.sources import load_competition
from multitask.predict import main as predict_main
from multitask.train import main as train_main

from conftest import tiny_overrides
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


def test_a_folder_that_is_no_mask_class_is_named_in_a_folder_per_mask_class(mask_folders_root, tmp_path, capsys):
    root = Path(shutil.copytree(mask_folders_root, tmp_path / "masked"))
    (root / "sunglasses").mkdir()
    shutil.copy(next((root / "with_mask").iterdir()), root / "sunglasses" / "a.jpg")
    out = run_main(data_main, capsys, "check", root, "--source", "mask_folders")
    no_traceback(out)
    assert out.returncode == 1 and "sunglasses: not a mask class folder; names understood: worn," in out.stdout


def test_data_check_on_a_train_csv_that_is_a_folder_names_it(faces_copy, capsys):
    (faces_copy / "train.csv").unlink()
    (faces_copy / "train.csv").mkdir()
    out = run_main(data_main, capsys, "check", faces_copy)
    no_traceback(out)
    assert out.returncode == 1 and "train.csv: not a file: ROOT/images/ is the competition layout" in out.stdout


@pytest.mark.parametrize("path", ["/etc", "../../../../../../etc", "."])
def test_a_train_csv_path_cannot_lead_outside_the_images_folder(path, faces_copy, tmp_path, capsys):
    people = pd.read_csv(faces_copy / "train.csv", dtype=str)
    people.loc[0, "path"] = path
    people.to_csv(faces_copy / "train.csv", index=False)
    out = run_main(data_main, capsys, "check", faces_copy)
    no_traceback(out)
    assert f"train.csv: line 2: path {path!r} is not a folder inside" in out.stdout
    assert "/etc/" not in out.stdout and out.returncode == 1  # /etc was never walked
    out = run_main(train_main, capsys, *tiny_overrides(faces_copy, tmp_path))
    assert out.returncode == 2 and f"line 2: path {path!r} is not a folder inside" in out.stderr


def manifest(tmp_path, faces_root, rows) -> Path:
    """A manifest beside copies of the first people's photos (mask1 and normal of each)."""
    folder = tmp_path / "set"
    people = sorted((faces_root / "images").iterdir())
    for person in people[:len(rows)]:
        shutil.copytree(person, folder / person.name)
    table = []
    for person, (genders, ages) in zip(people, rows):
        for photo, gender, age in zip(("mask1.jpg", "normal.jpg"), genders, ages):
            table.append(dict(path=f"{person.name}/{photo}", person_id=person.name, gender=gender, age=age,
                              mask="worn" if photo == "mask1.jpg" else "not_worn"))
    pd.DataFrame(table).to_csv(folder / "set.csv", index=False)
    return folder / "set.csv"


def test_a_person_with_two_genders_or_ages_far_apart_is_a_problem(faces_root, tmp_path, capsys):
    csv = manifest(tmp_path, faces_root, [(("male", "female"), (30, 30)), (("male", "male"), (25, 70)),
                                          (("female", "female"), (40, 45))])
    out = run_main(data_main, capsys, "check", csv)
    no_traceback(out)
    lines = [line for line in out.stdout.splitlines() if "person '" in line]
    assert len(lines) == 2 and out.returncode == 1, out.stdout
    assert "rows give two genders (female, male)" in lines[0]
    assert "rows give ages 25 and 70, more than 10 years apart" in lines[1]
    assert out.stdout.strip().endswith("2 photos, 2 problem(s)")  # the third person is fine


@pytest.mark.slow
def test_a_manifest_path_cannot_lead_outside_its_folder(trained_run, faces_root, tmp_path, capsys):
    csv = manifest(tmp_path, faces_root, [(("male", "male"), (30, 30))])
    table = pd.read_csv(csv)
    table.loc[0, "path"] = "/etc/hostname"
    table.loc[1, "path"] = "../../../../../../../etc/hostname"
    table.to_csv(csv, index=False)
    out = run_main(data_main, capsys, "check", csv)
    for line in (2, 3):
        assert f"line {line}: path" in out.stdout and "leads outside the CSV's folder" in out.stdout
    out = run_main(predict_main, capsys, "--run", trained_run, csv, "--out", tmp_path / "o")
    no_traceback(out)
    assert out.returncode == 2 and "leads outside the CSV's folder" in out.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_an_image_id_cannot_lead_outside_the_evaluation_images(trained_run, faces_root, tmp_path, capsys):
    folder = tmp_path / "eval"
    (folder / "images").mkdir(parents=True)
    shutil.copy(next((faces_root / "images").rglob("mask1.jpg")), folder / "images" / "a.jpg")
    pd.DataFrame({"ImageID": ["a.jpg", "../../../../../etc/hostname"], "ans": [0, 0]}).to_csv(folder / "info.csv",
                                                                                           index=False)
    out = run_main(predict_main, capsys, "--run", trained_run, folder, "--out", tmp_path / "o")
    no_traceback(out)
    assert out.returncode == 2 and "line 3: ImageID '../../../../../etc/hostname' leads outside" in out.stderr


@pytest.mark.parametrize("args, message", [
    (["--size", "0x0"], "size '0x0': each side 8 to 4096 pixels"),
    (["--people", "-3"], "--people: '-3': a whole number of at least 1"),
    (["--people", "0"], "--people: '0': a whole number of at least 1"),
])
def test_synth_refuses_sizes_and_counts_it_cannot_draw(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        data_main(["synth", str(tmp_path / "out"), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

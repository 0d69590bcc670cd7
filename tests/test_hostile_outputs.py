"""Output folders never mix two results and never lose one: predict, explain and export refuse a non-empty --out
unless --overwrite, and explain gives every photo its own grid."""
from __future__ import annotations

import shutil

import pandas as pd
import pytest

from multitask.explain import main as explain_main
from multitask.predict import main as predict_main

from test_bad_inputs import no_traceback, run_main

pytestmark = pytest.mark.slow


def test_a_second_prediction_into_the_same_folder_is_refused_unless_overwrite(trained_run, faces_root, tmp_path,
                                                                              capsys):
    out = tmp_path / "out"
    labeled = run_main(predict_main, capsys, "--run", trained_run, faces_root, "--out", out, "--folds", 0)
    assert labeled.returncode == 0 and (out / "report.md").exists()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    person = sorted((faces_root / "images").iterdir())[0]
    again = run_main(predict_main, capsys, "--run", trained_run, person, "--out", out)
    no_traceback(again)
    assert again.returncode == 2 and "not empty; give a new folder, or --overwrite" in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing lost
    (out / "my_notes.txt").write_text("mine")
    replaced = run_main(predict_main, capsys, "--run", trained_run, person, "--out", out, "--overwrite")
    assert replaced.returncode == 0
    assert len(pd.read_csv(out / "predictions.csv")) == 7
    # the first prediction's report and plots are gone with it: an unlabeled table never sits beside them
    assert not (out / "report.md").exists() and not (out / "plots").exists()
    assert (out / "my_notes.txt").read_text() == "mine"


def test_an_earlier_skipped_list_does_not_survive_an_overwrite(trained_run, faces_root, tmp_path, capsys):
    photos = tmp_path / "photos"
    shutil.copytree(sorted((faces_root / "images").iterdir())[0], photos)
    (photos / "broken.jpg").write_text("not a photo")
    out = tmp_path / "out"
    assert run_main(predict_main, capsys, "--run", trained_run, photos, "--out", out).returncode == 0
    assert (out / "skipped.csv").exists()
    (photos / "broken.jpg").unlink()
    second = run_main(predict_main, capsys, "--run", trained_run, photos, "--out", out, "--overwrite")
    assert second.returncode == 0 and "; 0 skipped;" in second.stdout
    assert not (out / "skipped.csv").exists()


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size: '0': a whole number of at least 1"),
    (["--batch-size", "-3"], "--batch-size: '-3': a whole number of at least 1"),
])
def test_a_batch_size_below_one_is_a_usage_error(args, message, trained_run, faces_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        predict_main(["--run", str(trained_run), str(faces_root), "--out", str(tmp_path / "o"), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_an_out_that_is_a_file_is_refused(trained_run, faces_root, tmp_path, capsys):
    (tmp_path / "afile.txt").write_text("mine")
    out = run_main(predict_main, capsys, "--run", trained_run, faces_root, "--out", tmp_path / "afile.txt")
    no_traceback(out)
    assert out.returncode == 2 and "afile.txt: is a file, not a folder" in out.stderr
    assert (tmp_path / "afile.txt").read_text() == "mine"


def test_explain_gives_photos_of_the_same_name_their_own_grids(trained_run, faces_root, tmp_path, capsys):
    src = next((faces_root / "images").rglob("mask1.jpg"))
    photos = tmp_path / "photos"
    for rel in ("a/img/face.jpg", "b/img/face.jpg", "c/face.jpg"):
        (photos / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, photos / rel)
    from PIL import Image

    Image.open(src).save(photos / "c" / "face.png")
    out = run_main(explain_main, capsys, "--run", trained_run, photos, "--out", tmp_path / "cams")
    assert out.returncode == 0, out.stderr
    table = pd.read_csv(tmp_path / "cams" / "predictions.csv")
    assert table["grid"].is_unique and len(table) == 4
    assert sorted(p.name for p in (tmp_path / "cams").glob("*_cams.png")) == sorted(table["grid"])
    assert set(table["grid"]) == {"a__img__face.jpg_cams.png", "b__img__face.jpg_cams.png", "c__face.jpg_cams.png",
                                  "c__face.png_cams.png"}
    again = run_main(explain_main, capsys, "--run", trained_run, photos, "--out", tmp_path / "cams")
    assert again.returncode == 2 and "--overwrite" in again.stderr

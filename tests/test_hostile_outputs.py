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


def test_a_failed_overwrite_keeps_the_earlier_results(trained_run, faces_root, tmp_path, capsys):
    """--overwrite replaces on success only: a prediction or explanation that fails leaves the earlier one whole."""
    person = sorted((faces_root / "images").iterdir())[0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((person / "mask1.jpg").read_bytes()[:600])  # truncated
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for main, out in ((predict_main, tmp_path / "pred"), (explain_main, tmp_path / "expl")):
        assert run_main(main, capsys, "--run", trained_run, person, "--out", out).returncode == 0
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        for photo in (broken, empty):
            again = run_main(main, capsys, "--run", trained_run, photo, "--out", out, "--overwrite")
            no_traceback(again)
            assert again.returncode == 2 and "unreadable image" in again.stderr
            assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jpg", "empty.jpg", "expl", "pred"]  # nothing staged


def test_explain_refuses_the_photos_predict_refused_however_their_paths_are_spelled(trained_run, tmp_path, capsys,
                                                                                     monkeypatch):
    """The run's image cache knows the unreadable files by row, not by the path the first command gave: explain
    after predict (absolute paths) on the same files by relative path still refuses every one of them."""
    from test_bad_inputs import UNREADABLE

    (tmp_path / "zoo").mkdir()
    for name, (make, _) in UNREADABLE.items():
        (tmp_path / "zoo" / name).write_bytes(make())
    predicted = run_main(predict_main, capsys, "--run", trained_run, tmp_path / "zoo", "--out", tmp_path / "p")
    assert predicted.returncode == 2 and "no photo could be predicted" in predicted.stderr
    monkeypatch.chdir(tmp_path / "zoo")
    for name, (_, reason) in UNREADABLE.items():
        out = run_main(explain_main, capsys, "--run", trained_run, name, "--out", tmp_path / "e")
        no_traceback(out)
        assert out.returncode == 2 and f"{name}: " in out.stderr and reason in out.stderr, (name, out.stderr)
        assert not (tmp_path / "e").exists()


def test_explain_takes_the_files_predict_takes(trained_run, tmp_path, capsys):
    from PIL import Image

    frames = [Image.new("RGB", (64, 64), (i * 60, 0, 0)) for i in range(3)]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:])
    for main in (predict_main, explain_main):
        out = run_main(main, capsys, "--run", trained_run, tmp_path / "moving.gif", "--out", tmp_path / "o")
        no_traceback(out)
        assert out.returncode == 2 and "moving.gif: not an image file (photos end in .bmp, .jpeg" in out.stderr


def test_an_out_folder_being_written_is_refused_in_one_line(trained_run, faces_root, tmp_path, capsys):
    from multitask.io import staged_output

    person = sorted((faces_root / "images").iterdir())[0]
    with staged_output(tmp_path / "out", [], False, "predict"):
        for main in (predict_main, explain_main):
            out = run_main(main, capsys, "--run", trained_run, person / "mask1.jpg", "--out", tmp_path / "out")
            no_traceback(out)
            assert out.returncode == 2 and "out: is being written by another command" in out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the holder's (empty) output; its lock went with it


def test_what_a_killed_command_was_writing_is_cleared_by_the_next(trained_run, faces_root, tmp_path, capsys):
    """kill -9 leaves the staged folder of the command it stopped; the next command into that --out removes it
    (and only it: another --out's staged folder beside it stays)."""
    killed, other = tmp_path / ".out.4242.tmp", tmp_path / ".out.x.4243.tmp"
    for folder in (killed, other):
        folder.mkdir()
        (folder / "predictions.csv").write_text("half")
    person = sorted((faces_root / "images").iterdir())[0]
    assert run_main(predict_main, capsys, "--run", trained_run, person, "--out", tmp_path / "out").returncode == 0
    assert not killed.exists() and other.exists()


@pytest.mark.parametrize("command", ["predict", "explain"])
def test_two_commands_into_the_same_new_folder_never_mix(command, trained_run, faces_root, tmp_path):
    """Started together: one writes the folder whole, the other is refused (the lock, or the folder not empty by
    the time it looks), and the folder holds exactly the first one's outputs."""
    import subprocess
    import sys

    people = sorted((faces_root / "images").iterdir())
    inputs = {"predict": (people[0], people[1] / "mask1.jpg"), "explain": (people[0], people[1] / "mask1.jpg")}
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", f"multitask.{command}", "--run", str(trained_run), str(photos),
                               "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for photos in inputs[command]]
    results = [(p.wait(timeout=240), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, _, err in results if code == 2)
    assert "is being written by another command" in refused or "not empty" in refused
    assert "Traceback" not in refused
    winner = inputs[command][[code for code, _, _ in results].index(0)]
    rows = pd.read_csv(out / "predictions.csv")
    assert len(rows) == (7 if winner.is_dir() else 1)
    if command == "explain":
        assert len(list(out.glob("*_cams.png"))) == len(rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

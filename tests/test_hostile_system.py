"""When the system refuses (a folder that cannot be read, a parent that cannot be written, a full disk): one line
saying what and where, exit code 3, and every file written before intact. The tests run as root, which
permissions do not stop, so the refusal is made where the system would make it."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

import multitask.io
from multitask.cli import EXIT_SYSTEM
from multitask.data.check import main as data_main
from multitask.predict import main as predict_main
from multitask.train import main as train_main

from conftest import tiny_overrides
from test_bad_inputs import no_traceback, run_main


def refuse(monkeypatch, method: str, target: Path, code: int = errno.EACCES) -> None:
    """Path.<method> raises OSError(code) on ``target`` (and below it), as the system would."""
    original = getattr(Path, method)

    def refused(self, *args, **kwargs):
        if Path(self) == target or target in Path(self).parents:
            raise OSError(code, "refused", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, refused)


def one_line(out, code: int, *words: str) -> None:
    no_traceback(out)
    assert out.returncode == code, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    for word in words:
        assert word in out.stderr, out.stderr


def test_a_person_folder_that_cannot_be_read(faces_copy, tmp_path, capsys, monkeypatch):
    person = sorted((faces_copy / "images").iterdir())[0]
    refuse(monkeypatch, "iterdir", person)
    one_line(run_main(data_main, capsys, "check", faces_copy), EXIT_SYSTEM, "permission denied at", person.name)
    out = run_main(train_main, capsys, *tiny_overrides(faces_copy, tmp_path))
    one_line(out, EXIT_SYSTEM, "permission denied at", person.name)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


@pytest.mark.slow
def test_an_out_folder_under_a_parent_that_cannot_be_written(trained_run, faces_root, tmp_path, capsys,
                                                             monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    refuse(monkeypatch, "mkdir", locked)
    out = run_main(predict_main, capsys, "--run", trained_run, faces_root, "--out", locked / "preds")
    one_line(out, EXIT_SYSTEM, "permission denied at", str(locked / "preds"))


def test_train_out_dir_under_a_parent_that_cannot_be_written(faces_root, tmp_path, capsys, monkeypatch):
    refuse(monkeypatch, "mkdir", tmp_path / "runs")
    out = run_main(train_main, capsys, *tiny_overrides(faces_root, tmp_path))
    one_line(out, EXIT_SYSTEM, "permission denied at", str(tmp_path / "runs"))


@pytest.mark.slow
def test_a_full_disk_while_training_stops_in_one_line_and_keeps_what_was_written(faces_root, tmp_path, capsys,
                                                                                  monkeypatch):
    def full(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 0: file write failed")

    monkeypatch.setattr(multitask.io.torch, "save", full)
    monkeypatch.setattr(multitask.io.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    out = run_main(train_main, capsys, *tiny_overrides(faces_root, tmp_path), "name=full")
    one_line(out, EXIT_SYSTEM, "error: disk full at", ".pt", "earlier results are kept, --resume")
    run = next((tmp_path / "runs").iterdir())
    assert (run / "config.yaml").exists() and (run / "folds.csv").exists()
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.tmp"))  # no half-written checkpoint


@pytest.mark.slow
def test_a_full_disk_while_predicting(trained_run, faces_root, tmp_path, capsys, monkeypatch):
    import pandas as pd

    def full(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    person = sorted((faces_root / "images").iterdir())[0]
    out = run_main(predict_main, capsys, "--run", trained_run, person, "--out", tmp_path / "out")
    one_line(out, EXIT_SYSTEM, "error: disk full at", str(tmp_path / "out" / "predictions.csv"))
    assert not list((tmp_path / "out").glob("*.tmp")) and not list((tmp_path / "out").glob(".*"))


@pytest.mark.slow
def test_torchs_own_disk_full_message_is_a_full_disk_too(faces_root, tmp_path, capsys, monkeypatch):
    """What torch.save raises when the disk fills mid-file (its zip writer's check, no word of writing)."""
    def full(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4608 vs 4502")

    monkeypatch.setattr(multitask.io.torch, "save", full)
    monkeypatch.setattr(multitask.io.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    out = run_main(train_main, capsys, *tiny_overrides(faces_root, tmp_path), "name=full")
    one_line(out, EXIT_SYSTEM, "error: disk full at", ".pt")


@pytest.fixture
def small_disk(tmp_path):
    """A real 24 MB file system (tmpfs), for what only a real full or read-only disk shows (threads that write).
    Needs the right to mount, which root has on this project's machines and CI."""
    disk = tmp_path / "disk"
    disk.mkdir()
    import subprocess

    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.mark.slow
def test_a_real_full_disk_and_a_read_only_one_under_training(faces_root, tmp_path, small_disk, capsys):
    import subprocess

    (small_disk / "filler").write_bytes(b"\0" * 22 * 2**20)
    overrides = [*tiny_overrides(faces_root, tmp_path), f"out_dir={small_disk / 'runs'}", "name=full"]
    out = run_main(train_main, capsys, *overrides)
    one_line(out, EXIT_SYSTEM, "error: disk full at", ".pt", "earlier results are kept, --resume")
    run = next((small_disk / "runs").iterdir())
    assert not list(run.rglob("*.tmp")) and not list(run.rglob(".*"))
    (small_disk / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    out = run_main(train_main, capsys, "--resume", run)
    one_line(out, EXIT_SYSTEM, "error: read-only file system at", str(run))
    assert "Exception in thread" not in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", ["predict", "explain", "export"])
def test_a_full_disk_names_the_output_and_leaves_nothing_behind(command, trained_run, faces_root, tmp_path,
                                                                capsys, monkeypatch):
    """A write that fails names no file; the line names the --out asked for, and no half-written file, staged
    folder or lock is left."""
    import builtins
    import io

    from multitask.explain import main as explain_main
    from multitask.export import main as export_main

    real_open = io.open

    def full(file, mode="r", *args, **kwargs):  # every write under tmp_path fails, as on a full disk
        if any(m in mode for m in "wax+") and str(tmp_path) in str(file):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full)
    monkeypatch.setattr(io, "open", full)  # pathlib's
    person = sorted((faces_root / "images").iterdir())[0]
    main, args = {"predict": (predict_main, [person]), "explain": (explain_main, [person / "mask1.jpg"]),
                  "export": (export_main, ["--format", "torchscript"])}[command]
    out = run_main(main, capsys, "--run", trained_run, *args, "--out", tmp_path / "out")
    one_line(out, EXIT_SYSTEM, "error: disk full at", str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_a_full_disk_under_synth_names_the_data_set_and_leaves_no_half_of_it(tmp_path, capsys, monkeypatch):
    from PIL import Image

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    out = run_main(data_main, capsys, "synth", tmp_path / "faces", "--people", 2, "--size", "64x80")
    one_line(out, EXIT_SYSTEM, f"error: disk full at {tmp_path / 'faces'}")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_caching_photos_names_the_cache_file(faces_root, tmp_path, capsys, monkeypatch):
    import multitask.data.dataset

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(multitask.data.dataset, "frame_all", full)
    out = run_main(train_main, capsys, *tiny_overrides(faces_root, tmp_path))
    one_line(out, EXIT_SYSTEM, f"error: disk full at {tmp_path / 'cache'}/images-", ".npy")
    assert not list((tmp_path / "cache").glob(".*"))  # no temporary cache file left

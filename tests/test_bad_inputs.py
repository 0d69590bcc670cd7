"""Bad input, everywhere: a zoo of awkward and broken files through data check, train, predict and explain.
Readable files give results; unreadable ones are named with a reason; exit codes are the documented ones
(0 done, 1 data check found problems, 2 bad input or nothing to do); no traceback is ever printed."""
from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from multitask.data.check import main as data_main
from multitask.data.images import MAX_PIXELS, read_rgb
from multitask.explain import main as explain_main
from multitask.predict import main as predict_main
from multitask.train import main as train_main

from conftest import tiny_overrides


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def photo(w=64, h=80, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def saved(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def exif_rotated() -> bytes:
    img = photo(60, 40)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    return jpeg_bytes(img, exif=exif.tobytes())


READABLE = {  # name -> bytes: awkward but valid photos, all must load as RGB
    "cmyk.jpg": lambda: jpeg_bytes(photo().convert("CMYK")),
    "sixteen_bit.png": lambda: saved(Image.fromarray((np.arange(80 * 64).reshape(80, 64) * 9).astype(np.uint16)),
                                     "PNG"),
    "palette.png": lambda: saved(photo().convert("P"), "PNG"),
    "rgba.png": lambda: saved(photo().convert("RGBA"), "PNG"),
    "grey.jpg": lambda: jpeg_bytes(photo().convert("L")),
    "exif_rotated.jpg": exif_rotated,
    "gif_named.jpg": lambda: saved(photo().convert("P"), "GIF"),
    "webp_named.jpg": lambda: saved(photo(), "WEBP"),
    "tiff_named.jpg": lambda: saved(photo(), "TIFF"),
    "one_pixel.jpg": lambda: jpeg_bytes(photo(1, 1)),
}
UNREADABLE = {  # name -> (bytes, what the reason must say)
    "random_bytes.jpg": (lambda: np.random.default_rng(1).integers(0, 255, 5000, dtype=np.uint8).tobytes(),
                         "unreadable"),
    "zero_bytes.jpg": (lambda: b"", "unreadable"),
    "html.jpg": (lambda: b"<!doctype html><html><body>Not found</body></html>", "unreadable"),
    "truncated.jpg": (lambda: jpeg_bytes(photo(200, 200))[:1500], "unreadable"),
    "header_only.jpg": (lambda: jpeg_bytes(photo())[:120], "unreadable"),
    "bomb.png": (lambda: saved(Image.new("1", (8000, 8000)), "PNG"), "above the limit"),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo") / "photos"
    root.mkdir()
    for name, make in READABLE.items():
        (root / name).write_bytes(make())
    for name, (make, _) in UNREADABLE.items():
        (root / name).write_bytes(make())
    return root


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-2000:]


def run_main(main, capsys, *args) -> subprocess.CompletedProcess:
    """A command's main() in this process: the exit code and the output `python -m` would give, without its five
    seconds of imports (an exception would fail the test, as a traceback would). Each command's entry point runs
    as `python -m` in its own tests (train, predict, explain, data check)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.mark.parametrize("name", sorted(READABLE))
def test_awkward_but_valid_photos_load_as_rgb(zoo, name):
    rgb = read_rgb(zoo / name)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    if name == "exif_rotated.jpg":
        assert rgb.shape[:2] == (60, 40)  # the EXIF rotation applied


def test_the_pixel_limit_is_read_before_decoding(zoo):
    assert 8000 * 8000 > MAX_PIXELS
    with pytest.raises(ValueError, match="above the limit"):
        read_rgb(zoo / "bomb.png")


def test_data_check_names_every_unreadable_file_and_exits_1(zoo, tmp_path, capsys):
    root = tmp_path / "folders"
    shutil.copytree(zoo, root / "any_class")
    out = run_main(data_main, capsys, "check", root)
    no_traceback(out)
    assert out.returncode == 1
    for name, (_, reason) in UNREADABLE.items():
        line = next((l for l in out.stdout.splitlines() if name in l), "")
        assert reason in line, (name, out.stdout)
    for name in READABLE:
        assert name not in out.stdout


@pytest.mark.parametrize("layout", ["empty", "no_layout"])
def test_data_check_fails_a_folder_with_no_photos(tmp_path, layout, capsys):
    root = tmp_path / "data"
    root.mkdir()
    if layout == "no_layout":
        (root / "notes.txt").write_text("not a photo")
    out = run_main(data_main, capsys, "check", root)
    no_traceback(out)
    assert out.returncode == 1 and "no photo found" in out.stdout


def competition_with_zoo(faces_root: Path, zoo: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """The session's faces, with some photos replaced by unreadable files."""
    root = Path(shutil.copytree(faces_root, tmp_path / "faces"))
    people = sorted((root / "images").iterdir())
    broken = []
    for person, name in zip(people, UNREADABLE):
        target = person / "mask2.jpg"
        shutil.copy(zoo / name, target)
        broken.append(str(target.resolve()))
    return root, broken


@pytest.mark.slow
def test_training_stops_on_bad_files_or_skips_them_as_told(faces_root, zoo, tmp_path, capsys):
    root, broken = competition_with_zoo(faces_root, zoo, tmp_path)
    args = [*tiny_overrides(root, tmp_path), "cv.folds=2", "cv.run_folds=[0]"]
    stop = run_main(train_main, capsys, *args)
    no_traceback(stop)
    assert stop.returncode == 2 and all(Path(b).name in stop.stderr for b in broken[:1])
    assert "data.on_bad_file=skip" in stop.stderr
    assert not list((tmp_path / "runs").glob("*"))  # a start that failed leaves no run folder behind
    skip = run_main(train_main, capsys, *args, "data.on_bad_file=skip")
    no_traceback(skip)
    assert skip.returncode == 0, skip.stderr[-2000:]
    run = next((tmp_path / "runs").glob("*"))
    skipped = pd.read_csv(run / "skipped.csv")
    assert set(skipped["path"]) == set(broken)
    assert not set(pd.read_csv(run / "data.csv")["path"]) & set(broken)


@pytest.mark.slow
def test_predict_names_unreadable_photos_and_predicts_the_rest(trained_run, zoo, tmp_path, capsys):
    out = run_main(predict_main, capsys, "--run", trained_run, zoo, "--out", tmp_path / "p")
    no_traceback(out)
    assert out.returncode == 0, out.stderr[-2000:]
    preds = pd.read_csv(tmp_path / "p" / "predictions.csv")
    assert sorted(Path(p).name for p in preds["path"]) == sorted(READABLE)
    skipped = pd.read_csv(tmp_path / "p" / "skipped.csv")
    for name, (_, reason) in UNREADABLE.items():
        row = skipped[skipped["path"].str.endswith(name)]
        assert len(row) == 1 and reason in row["reason"].iloc[0], name


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["predict", "explain"])
def test_nothing_readable_is_an_error_with_the_reasons_listed(trained_run, zoo, tmp_path, tool, capsys):
    main = {"predict": predict_main, "explain": explain_main}[tool]
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("truncated.jpg", "html.jpg"):
        shutil.copy(zoo / name, bad / name)
    out = run_main(main, capsys, "--run", trained_run, bad, "--out", tmp_path / "o")
    no_traceback(out)
    assert out.returncode == 2 and "no photo could be" in out.stderr
    assert "truncated.jpg: unreadable image" in out.stderr and "html.jpg: unreadable image" in out.stderr
    assert not (tmp_path / "o").exists()  # a command that failed writes nothing
    single = run_main(main, capsys, "--run", trained_run, bad / "html.jpg", "--out", tmp_path / "o1")
    no_traceback(single)
    assert single.returncode == 2


@pytest.mark.slow
def test_a_hostile_checkpoint_is_refused_in_one_line(trained_run, tmp_path, faces_root, capsys):
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))

    class Boom:
        def __reduce__(self):
            return (print, ("this ran code",))

    import pickle

    (run / "fold0" / "stage2" / "best.pt").write_bytes(pickle.dumps({"model": Boom()}))
    out = run_main(predict_main, capsys, "--run", run, faces_root / "images", "--out", tmp_path / "o", "--folds", 0)
    no_traceback(out)
    assert out.returncode == 2 and "this ran code" not in out.stdout
    assert "best.pt: not a checkpoint or state_dict this project can read safely" in out.stderr
    assert "weights_only=False" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("overrides, message", [
    (["data.root=/nowhere/at/all", "data.source=competition"], "/nowhere/at/all: data.root does not exist"),
    (["stage2.epochs=0"], "stage2.epochs=0: must be >= 1"),
])
def test_a_bad_start_says_why_in_one_line_and_leaves_no_run_folder(tmp_path, overrides, message, capsys):
    out = run_main(train_main, capsys, f"out_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}",
                   *overrides)
    no_traceback(out)
    assert out.returncode == 2 and message in out.stderr
    assert "--resume" not in out.stderr  # nothing to resume
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_written_files_follow_the_umask(tmp_path):
    import os

    from multitask.io import FILE_MODE, atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == FILE_MODE
    old = os.umask(0)
    os.umask(old)
    assert FILE_MODE == 0o666 & ~old

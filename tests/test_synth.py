"""Synthetic faces: deterministic for a seed, in the competition layout, with a box file describing each photo."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd

from multitask.data.sources import load_competition
from multitask.data.synth import generate


def file_bytes(root) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_same_seed_draws_the_same_files_and_another_seed_does_not(tmp_path):
    a = generate(tmp_path / "a", people=5, size=(96, 128), seed=7)
    b = generate(tmp_path / "b", people=5, size=(96, 128), seed=7, workers=1)
    c = generate(tmp_path / "c", people=5, size=(96, 128), seed=8)
    assert file_bytes(a) == file_bytes(b)
    assert file_bytes(a)["train.csv"] != file_bytes(c)["train.csv"]


def test_boxes_describe_every_photo_and_masks_sit_on_the_face(tmp_path):
    root = generate(tmp_path / "s", people=6, size=(96, 128), seed=1)
    table, problems = load_competition(root)
    boxes = pd.read_csv(root / "boxes.csv")
    assert problems == [] and len(boxes) == len(table) == 42
    assert set(boxes["path"].map(lambda p: str((root / p).resolve()))) == set(table["path"])
    masked = boxes[boxes["path"].str.contains("/mask")]
    unmasked = boxes[boxes["path"].str.endswith("normal.jpg")]
    assert masked[["mask_x0", "mask_y0", "mask_x1", "mask_y1"]].notna().all().all()
    assert unmasked[["mask_x0", "mask_y0", "mask_x1", "mask_y1"]].isna().all().all()
    assert ((masked.mask_x0 >= masked.face_x0 - 4) & (masked.mask_x1 <= masked.face_x1 + 4)
            & (masked.mask_y0 > (masked.face_y0 + masked.face_y1) / 2 - 10)).all()  # lower half of the face
    assert ((boxes.face_x0 >= 0) & (boxes.face_x1 <= 96) & (boxes.face_y0 >= 0) & (boxes.face_y1 <= 128)).all()


def test_labels_cover_every_group_and_ages_cross_the_thresholds(tmp_path):
    people = pd.read_csv(generate(tmp_path / "s", people=60, size=(48, 64), seed=2) / "train.csv")
    assert set(people["gender"]) == {"male", "female"}
    assert people["age"].lt(30).any() and people["age"].between(30, 59).any() and people["age"].ge(60).any()
    assert people["age"].between(27, 33).any()  # ages near the boundaries exist: those are the hard cases


def test_the_command_never_writes_over_an_existing_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    run = subprocess.run([sys.executable, "-m", "multitask.data", "synth", str(tmp_path / "out"), "--people", "2"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "already exists" in run.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"

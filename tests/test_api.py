"""The Python API: one object that predicts, explains and exports, and gives what the commands give."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from multitask import load_run
from multitask.data.images import read_rgb
from multitask.data.sources import DataError
from multitask.predict import predict

from conftest import probs_of

pytestmark = pytest.mark.slow


def test_predict_gives_the_commands_table_for_files_images_and_arrays(trained_run, faces_root, tmp_path):
    person = sorted((faces_root / "images").iterdir())[0]
    paths = sorted(person.glob("*.jpg"))
    expected = predict(trained_run, person, tmp_path / "out", progress=False, log=lambda s: None)
    model = load_run(trained_run)
    got = model.predict(paths)
    assert got["path"].tolist() == expected["path"].tolist()
    assert list(got.columns) == [c for c in expected.columns if c in got.columns]
    np.testing.assert_allclose(probs_of(got), probs_of(expected), atol=1e-6)
    assert got["label"].tolist() == expected["label"].tolist()
    as_images = model.predict([Image.open(p) for p in paths])
    as_arrays = model.predict([read_rgb(p) for p in paths])
    np.testing.assert_allclose(probs_of(as_images), probs_of(expected), atol=1e-6)
    np.testing.assert_allclose(probs_of(as_arrays), probs_of(expected), atol=1e-6)


def test_one_fold_and_the_explain_grid(trained_run, faces_root):
    model = load_run(trained_run, folds=[1])
    assert model.describe().endswith("folds [1] x 2 view(s)")
    photo, grid = model.explain(next((faces_root / "images").rglob("mask1.jpg")), targets={"mask": "incorrect"})
    assert photo.shape == (48, 40, 3) and grid.layers == ["layer1", "layer2", "layer3", "layer4"]
    assert grid.heads == ["mask", "gender", "age"] and int(grid.targets["mask"][0]) == 1
    assert all(grid.cams[layer][head].shape == (1, 48, 40) for layer in grid.layers for head in grid.heads)


def test_an_unreadable_photo_is_named(trained_run, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    with pytest.raises(DataError, match="notes.jpg: unreadable image"):
        load_run(trained_run).predict([bad])
    with pytest.raises(DataError, match=r"<image 0>: got an array of shape \(4, 4, 4, 4\) and type uint8; a photo "
                                        r"is a file path, a PIL image or an RGB array"):
        load_run(trained_run).predict([np.zeros((4, 4, 4, 4), np.uint8)])


@pytest.mark.parametrize("photos, message", [
    ([None], r"<image 0>: got NoneType; a photo is a file path, a PIL image or an RGB array \(H x W x 3"),
    ([b"\xff\xd8 jpeg bytes"], r"<image 0>: got bytes; a photo is a file path"),
    (["face.jpg", 3], r"<image 1>: got int; a photo is"),
    ([], r"photos: none given; a photo is a file path"),
    ([np.zeros((0, 0, 3), np.uint8)], r"got an array of shape \(0, 0, 3\)"),
    ([np.array([["a"]])], r"got an array of shape \(1, 1\) and type <U1"),
])
def test_what_is_not_a_photo_is_said_with_what_is_accepted(photos, message, trained_run, faces_root):
    model = load_run(trained_run, folds=[0])
    face = next((faces_root / "images").rglob("mask1.jpg"))
    photos = [face if isinstance(p, str) and p == "face.jpg" else p for p in photos]
    with pytest.raises(DataError, match=message):
        model.predict(photos)


@pytest.mark.parametrize("photo, message", [(None, "<image>: got NoneType"),
                                            ("nowhere.jpg", "nowhere.jpg: unreadable image")])
def test_explain_says_what_it_cannot_explain(photo, message, trained_run):
    with pytest.raises(DataError, match=message):
        load_run(trained_run, folds=[0]).explain(photo)

"""The face crop (data.face_crop=detector): boxes found once, cached, and used the same way everywhere."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from multitask.config import load_config
from multitask.data.dataset import cache_key
from multitask.data.photoset import preprocessing_for
from multitask.data import faces as faces_module
from multitask.data.faces import COLUMNS, find_faces
from multitask.data.synth import generate
from multitask.data.transforms import TYPICAL_BOX_MIN_PHOTOS, FaceFraming, template_points, widen
from multitask.io import atomic_write_text
from multitask.run import RunDir


@pytest.fixture(scope="module")
def anywhere_root(tmp_path_factory) -> Path:
    """Synthetic portraits whose faces vary in size and place."""
    return generate(tmp_path_factory.mktemp("anywhere") / "faces", people=12, size=(384, 512), seed=4,
                    anywhere=True)


def overlap(inner, outer) -> float:
    """Share of box ``inner`` that lies inside box ``outer``."""
    w = max(0.0, min(inner[2], outer[2]) - max(inner[0], outer[0]))
    h = max(0.0, min(inner[3], outer[3]) - max(inner[1], outer[1]))
    return w * h / ((inner[2] - inner[0]) * (inner[3] - inner[1]))


def test_the_crop_contains_the_drawn_face_wherever_it_is(anywhere_root, tmp_path):
    boxes = pd.read_csv(anywhere_root / "boxes.csv")
    boxes = boxes[boxes["path"].str.endswith("normal.jpg")].reset_index(drop=True)
    paths = [str((anywhere_root / p).resolve()) for p in boxes["path"]]
    faces = find_faces(paths, tmp_path)
    found = faces["found"].to_numpy(dtype=bool)
    assert found.sum() >= 2  # a detector for real faces finds some of these cartoon faces, not all
    assert (boxes["face_x1"] - boxes["face_x0"]).max() > 1.7 * (boxes["face_x1"] - boxes["face_x0"]).min()
    for (_, face), (_, drawn) in zip(faces[found].iterrows(), boxes[found].iterrows()):
        crop = widen([face.x0, face.y0, face.x1, face.y1], 0.25, 1.0)
        truth = [drawn.face_x0, drawn.face_y0, drawn.face_x1, drawn.face_y1]
        assert overlap(truth, crop) >= 0.85, (drawn.path, crop, truth)


def test_each_photo_is_detected_once_whatever_set_or_folder_it_comes_in(anywhere_root, tmp_path, monkeypatch):
    paths = []
    for i, p in enumerate(sorted(anywhere_root.rglob("normal.jpg"))):
        paths.append(str(tmp_path / f"{i}.jpg"))
        shutil.copy(p, paths[-1])
    real, detected, logs = faces_module.detect_many, [], []
    monkeypatch.setattr(faces_module, "detect_many", lambda rgbs: detected.extend([1] * len(rgbs)) or real(rgbs))
    part = find_faces(paths[:3], tmp_path, logs.append)
    assert len(detected) == 3
    whole = find_faces(list(reversed(paths)), tmp_path, logs.append)  # another set, in another order
    assert len(detected) == len(paths)  # only the photos not seen before
    again = find_faces(paths, tmp_path, logs.append)
    assert len(detected) == len(paths) and len(logs) == 2
    pd.testing.assert_frame_equal(part, again.iloc[:3])
    pd.testing.assert_frame_equal(whole.iloc[::-1].reset_index(drop=True), again)
    elsewhere = [shutil.copy(p, tmp_path / f"copy{i}.jpg") for i, p in enumerate(paths)]  # new paths and times
    copied = find_faces(elsewhere, tmp_path, logs.append)
    assert len(detected) == len(paths) and len(logs) == 2
    pd.testing.assert_frame_equal(copied.drop(columns="path"), again.drop(columns="path"))
    twins = [str(tmp_path / f"twin{i}.jpg") for i in range(3)]  # a new photo, three copies in one set
    Image.open(paths[1]).rotate(90, expand=True).save(twins[0])
    for twin in twins[1:]:
        shutil.copy(twins[0], twin)
    boxes = find_faces(twins, tmp_path, logs.append).drop(columns="path")
    assert len(detected) == len(paths) + 1 and logs[-1].startswith("finding faces in 1 of 3 photos")
    assert boxes.drop_duplicates().shape[0] == 1
    i = int(again["found"].idxmax())  # a photo with a face found, changed: found again
    Image.open(paths[i]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(paths[i])
    changed = find_faces(paths, tmp_path, logs.append)
    assert len(detected) == len(paths) + 2
    mirrored_x0 = Image.open(paths[i]).width - again.loc[i, "x1"]
    assert changed.loc[i, "x0"] == pytest.approx(mirrored_x0, abs=0.05 * Image.open(paths[i]).width)


def test_many_photos_are_detected_by_parallel_jobs_and_the_cache_grows_as_they_finish(anywhere_root, tmp_path,
                                                                                       monkeypatch):
    paths = [str(p) for p in sorted(anywhere_root.rglob("*.jpg"))][:12]
    one_by_one = find_faces(paths, tmp_path / "one_by_one")
    monkeypatch.setattr(faces_module, "CHUNK", 3)  # four jobs, on every core
    monkeypatch.setattr(faces_module, "SAVE_EVERY", 1)
    saved, logs, save = [], [], faces_module.atomic_to_csv
    monkeypatch.setattr(faces_module, "atomic_to_csv", lambda rows, path: saved.append(len(rows)) or save(rows, path))
    in_jobs = find_faces(paths, tmp_path / "in_jobs", logs.append)
    pd.testing.assert_frame_equal(in_jobs, one_by_one)
    assert saved == [3, 6, 9, 12]  # a run killed midway keeps the boxes found so far
    assert any(line.startswith("faces: 6 of 12 photos done, ~") for line in logs)


def test_prepare_uses_the_box_and_falls_back_to_the_centre_crop(anywhere_root, tmp_path):
    cfg = load_config([f"data.cache_dir={tmp_path}", "data.face_crop=detector", "data.crop=[120,96]",
                       "data.size=[64,64]"])
    paths = [str(p) for p in sorted(anywhere_root.rglob("normal.jpg"))]
    detected, found = preprocessing_for(cfg, paths, log=lambda s: None)
    assert found is not None and found.any() and len(found) == len(paths)
    i = int(np.argmax(found))
    center = load_config([f"data.cache_dir={tmp_path}", "data.crop=[120,96]", "data.size=[64,64]"])
    centred, none_found = preprocessing_for(center, paths, log=lambda s: None)
    prepare, center_prepare = detected.framing, centred.framing
    assert none_found is None
    assert prepare(paths[i]).shape == center_prepare(paths[i]).shape
    assert not np.array_equal(prepare(paths[i]), center_prepare(paths[i]))
    if not found.all() and found.sum() < TYPICAL_BOX_MIN_PHOTOS:
        j = int(np.argmin(found))  # no face and too few found to know the typical box: exactly the centre crop
        assert np.array_equal(prepare(paths[j]), center_prepare(paths[j]))


def face_table(found_boxes, missed_sizes) -> pd.DataFrame:
    """A find_faces table: 384x512 photos with these boxes, then photos of these sizes where no face was found."""
    rows = [dict(path=f"found{i}.jpg", found=True, score=0.99, width=384, height=512, x0=x0, y0=y0, x1=x1, y1=y1)
            for i, (x0, y0, x1, y1) in enumerate(found_boxes)]
    rows += [dict(path=f"missed{i}.jpg", found=False, width=w, height=h) for i, (w, h) in enumerate(missed_sizes)]
    return pd.DataFrame(rows).reindex(columns=["path"] + COLUMNS)


def test_a_photo_without_a_face_is_cropped_like_the_found_photos_of_its_size():
    found = [(100 + i, 150 - i, 280 + 2 * i, 360) for i in range(TYPICAL_BOX_MIN_PHOTOS)]
    prepare = FaceFraming(None, (64, 64), "detector").with_faces(face_table(found, [(384, 512), (200, 200)]))
    region = lambda path, w, h: prepare.face_box(path, np.zeros((h, w, 3), np.uint8))  # noqa: E731
    typical = np.median(np.array(found, dtype=float), axis=0)
    assert np.allclose(region("missed0.jpg", 384, 512), widen(typical, prepare.face_margin, 1.0))
    assert prepare.region("missed0.jpg", np.zeros((512, 384, 3), np.uint8))[1] == "typical"
    assert prepare.region("found3.jpg", np.zeros((512, 384, 3), np.uint8))[1] == "detected"
    assert region("missed1.jpg", 200, 200) is None  # no face found in a photo of its size: the centre crop
    assert np.allclose(region("found3.jpg", 384, 512), widen(found[3], prepare.face_margin, 1.0))
    too_few = FaceFraming(None, (64, 64), "detector").with_faces(face_table(found[1:], [(384, 512)]))
    assert too_few.face_box("missed0.jpg", np.zeros((512, 384, 3), np.uint8)) is None


def test_other_face_boxes_give_another_image_cache(tmp_path):
    paths = [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]
    prepare = FaceFraming(None, (64, 64), "detector")
    one = prepare.with_faces(face_table([(0, 0, 10, 10)], [(384, 512)]).assign(path=paths))
    other = prepare.with_faces(face_table([(0, 0, 12, 10)], [(384, 512)]).assign(path=paths))
    assert cache_key(paths, one) != cache_key(paths, other)
    assert cache_key(paths, one) == cache_key(paths, prepare.with_faces(face_table([(0, 0, 10, 10)], [(384, 512)])
                                                                       .assign(path=paths)))


def test_a_run_crops_a_photo_without_a_face_with_the_typical_box_it_recorded(tmp_path):
    """Predict, explain and the dashboard frame a missed face as training did: with the run's typical box."""
    atomic_write_text(tmp_path / "run.json", '{"typical_face_boxes": {"384x512": [100, 150, 280, 360]}}')
    cfg = load_config(["data.face_crop=detector", "data.size=[64,64]"])
    pre = RunDir(tmp_path).preprocessing(cfg)
    no_face = np.full((512, 384, 3), 128, np.uint8)
    assert np.allclose(pre.framing.face_box(no_face, no_face), widen([100, 150, 280, 360], cfg.data.face_margin, 1.0))
    other_size = np.full((300, 300, 3), 128, np.uint8)
    assert pre.framing.face_box(other_size, other_size) is None


@pytest.mark.slow
@pytest.mark.parametrize("face_crop", ["detector", "aligned"])
def test_training_and_prediction_with_a_face_crop_of_the_detector(tmp_path, face_crop):
    from multitask.training.cv import run_cv
    from multitask.predict import predict
    from tests.conftest import tiny_overrides

    root = generate(tmp_path / "faces", people=4, size=(192, 256), seed=4, anywhere=True)
    cfg = load_config(tiny_overrides(root, tmp_path) + [f"data.face_crop={face_crop}", "cv.folds=2",
                                                         "cv.run_folds=[0]"])
    run = tmp_path / "runs" / face_crop
    run_cv(cfg, run, log=lambda s: None)
    data = pd.read_csv(run / "data.csv")
    assert data["face_found"].dtype == bool and len(data) == 28
    assert "face_found" in pd.read_csv(run / "fold0" / "oof.csv")
    found_here, _ = preprocessing_for(cfg, data["path"].tolist(), log=lambda s: None)
    typical = RunDir(run).typical_face_boxes()
    assert typical == {size: tuple(box) for size, box in found_here.framing.typical.items()}
    assert all(len(face) == (4 if face_crop == "detector" else 14) for face in typical.values())  # box (+ marks)
    preds = predict(run, root / "images", tmp_path / "pred", progress=False, log=lambda s: None, faces="largest")
    assert preds["face_found"].tolist() == data.sort_values("path")["face_found"].tolist() and len(preds) == 28


def test_photos_detected_as_a_batch_get_the_boxes_they_get_alone(anywhere_root):
    from multitask.data.faces import detect, detect_many
    from multitask.data.images import read_rgb

    photos = sorted(anywhere_root.rglob("*.jpg"))[:12]
    rgbs = [read_rgb(p) for p in photos] + [np.full((200, 160, 3), 128, np.uint8)]  # two sizes, one faceless
    batched = detect_many(rgbs)
    alone = [detect(rgb) for rgb in rgbs]
    assert [f is None for f in batched] == [f is None for f in alone] and batched[-1] is None
    assert sum(f is not None for f in alone) >= 4
    for b, a in zip(batched, alone):
        if a is not None:
            np.testing.assert_allclose(b.box, a.box, atol=0.5)
            np.testing.assert_allclose(b.landmarks, a.landmarks, atol=0.5)


def rotated_about(points: np.ndarray, centre, degrees: float, scale: float = 1.0) -> np.ndarray:
    return np.c_[points, np.ones(len(points))] @ cv2.getRotationMatrix2D(centre, degrees, scale).T


def test_aligned_framing_turns_scales_and_shifts_the_five_points_onto_the_template():
    """A photo with five dots where the landmarks are (turned 25 degrees, 2.5x the framed size): each dot comes
    out on its template point, and a photo of that size without a face is framed by the typical landmarks."""
    framing = FaceFraming(None, (112, 96), "aligned", face_margin=0.3)
    target = template_points(framing.size, framing.face_margin)
    marks = rotated_about(target * 2.5 + [60, 90], (250, 300), 25)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    photo = np.zeros((600, 500, 3), np.uint8)
    for (x, y), colour in zip(marks, colours):
        cv2.circle(photo, (int(round(x)), int(round(y))), 6, colour, -1)
    box = [marks[:, 0].min() - 40, marks[:, 1].min() - 60, marks[:, 0].max() + 40, marks[:, 1].max() + 20]
    table = pd.DataFrame([dict(path=f"found{i}.png", found=True, score=0.99, width=500, height=600,
                               **dict(zip(COLUMNS[4:8], box)), **dict(zip(COLUMNS[8:], marks.ravel())))
                          for i in range(TYPICAL_BOX_MIN_PHOTOS)] + [dict(path="missed.png", found=False)])
    framing = framing.with_faces(table.reindex(columns=["path"] + COLUMNS))
    framed = framing(photo)  # an array: its face is detected on the spot (the dots are no face) -> typical
    corners, how = framing.region(photo, photo)  # what the dashboard outlines: the framed photo's corners
    assert how == "typical"
    face, _ = framing.face(photo, photo)
    np.testing.assert_allclose(np.c_[corners, np.ones(4)] @ framing.alignment(face).T,
                               [[0, 0], [96, 0], [96, 112], [0, 112]], atol=1e-6)
    assert framed.shape == (112, 96, 3)
    for (x, y), colour in zip(target, colours):
        ys, xs = np.nonzero((np.abs(framed.astype(int) - colour).sum(axis=2) < 150))
        assert len(xs) > 4, colour
        assert np.hypot(xs.mean() - x, ys.mean() - y) < 1.5, (colour, (xs.mean(), ys.mean()), (x, y))


def test_aligned_framing_puts_the_drawn_eyes_of_turned_synthetic_faces_on_the_template(tmp_path):
    """The whole path, detector included: synthetic portraits turned by up to 20 degrees; where the detector finds
    the face, the eyes as drawn land within a few pixels of the template's eyes (112 x 112, as face models use),
    where the detector's box alone leaves them tilted."""
    root = generate(tmp_path / "faces", people=12, size=(384, 512), seed=5)
    boxes = pd.read_csv(root / "boxes.csv")
    paths, eyes = [], []
    for k, r in enumerate(boxes[boxes["path"].str.endswith("normal.jpg")].itertuples()):
        turn = cv2.getRotationMatrix2D((192, 256), (-20, 10, 20)[k % 3], 1.0)
        photo = cv2.warpAffine(np.asarray(Image.open(root / r.path)), turn, (384, 512),
                               borderMode=cv2.BORDER_REPLICATE)
        paths.append(str(tmp_path / f"{k}.png"))
        Image.fromarray(photo).save(paths[-1])
        eyes.append(np.c_[[[r.left_eye_x, r.left_eye_y], [r.right_eye_x, r.right_eye_y]], [1, 1]] @ turn.T)
    faces = find_faces(paths, tmp_path)
    aligned = FaceFraming(None, (112, 112), "aligned").with_faces(faces)
    detector = FaceFraming(None, (112, 112), "detector").with_faces(faces)
    target = template_points(aligned.size, aligned.face_margin)[:2]
    errors, box_errors = [], []
    for path, drawn, found in zip(paths, eyes, faces["found"]):
        if found:
            face, _ = aligned.face(path, None)
            errors.append(np.hypot(*(np.c_[drawn, [1, 1]] @ aligned.alignment(face).T - target).T).max())
            x0, y0, x1, _ = detector.face_box(path, None)
            box_errors.append(np.hypot(*((drawn - [x0, y0]) * 112 / (x1 - x0) - target).T).max())
    assert len(errors) >= 5, f"the detector found {len(errors)} of {len(paths)} faces"
    assert np.median(errors) < 3.5 and max(errors) < 12, errors
    assert np.median(box_errors) > 2 * np.median(errors)  # the box crop alone leaves the eyes tilted, elsewhere

"""Every face in the picture: one row per face with its box, faces too small listed, photos without a face said,
the largest face alone on request, videos tracked face by face, pictures drawn.

The face detector is a real face detector (MTCNN), which finds only some of the project's drawn faces; these
tests hold what happens after detection, so the detector is replaced by one that returns the faces the scene
generator drew (``oracle``). How the real detector does on scenes is measured (docs/scenes.md), not tested.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from multitask import load_run
from multitask.data import faces as faces_module
from multitask.data.faces import Face
from multitask.data.images import read_rgb
from multitask.data.scenes import BOX, MARKS, background, generate_scenes, paste
from multitask.data.synth import draw_photo, person_traits
from multitask.predict import main as predict_main

from conftest import probs_of


def faces_of(rows: pd.DataFrame) -> list[Face]:
    """faces.csv rows as the detector gives faces: largest first."""
    faces = [Face(r[BOX].to_numpy(float), r[MARKS].to_numpy(float).reshape(5, 2), 0.99) for _, r in rows.iterrows()]
    return sorted(faces, key=lambda f: -f.width)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """Six 320x240 scenes of 1 to 5 drawn faces, 12 to 90 px wide."""
    return generate_scenes(tmp_path_factory.mktemp("scenes") / "scenes", 6, (320, 240), seed=2,
                           counts=(1, 3, 5), widths=(12, 90))


@pytest.fixture
def oracle(scenes, monkeypatch):
    """The detector replaced by the drawn faces of each scene, recognised by its pixels."""
    table = pd.read_csv(scenes / "faces.csv")
    known = {read_rgb(scenes / name).tobytes(): faces_of(rows)
             for name, rows in table.groupby("scene")}
    monkeypatch.setattr(faces_module, "detect_all", lambda rgbs, min_face=20: [known.get(r.tobytes(), []) for r in rgbs])
    return table


def test_every_face_of_a_scene_has_a_row_with_its_box_largest_first(trained_run, scenes, oracle):
    model = load_run(trained_run)
    rows = model.predict(sorted((scenes / "images").glob("*.jpg")), faces="all")
    assert len(rows) == len(oracle)
    for name, drawn in oracle.groupby("scene"):
        got = rows[rows["path"] == str((scenes / name).resolve())]
        assert got["face"].tolist() == list(range(len(drawn)))
        widths = (got["x1"] - got["x0"]).to_numpy()
        assert (np.diff(widths) <= 0).all()  # largest first
        np.testing.assert_allclose(np.sort(widths), np.sort(drawn["width"]), atol=0.1)
    small = rows["x1"] - rows["x0"] < model.cfg.predict.min_face
    assert small.any() and (~small).any()
    assert (rows.loc[small, "face_status"] == "too_small").all()
    assert rows.loc[small, [c for c in rows if c.startswith("p_")]].isna().all().all()  # listed, not classified
    assert (rows.loc[~small, "face_status"] == "predicted").all()
    np.testing.assert_allclose(probs_of(rows[~small]).reshape(len(rows[~small]), -1)[:, :3].sum(1), 1, atol=1e-5)
    assert rows.loc[~small, "label_name"].notna().all()


def test_a_photo_without_a_face_says_so_in_its_row(trained_run, oracle):
    rows = load_run(trained_run).predict(background(np.random.default_rng(0), 200, 150), faces="all")
    assert rows[["path", "face", "face_status"]].values.tolist() == [["<image 0>", -1, "no_face"]]
    assert rows[["x0", "p_mask_worn", "label_name"]].isna().all().all()


def test_each_face_gets_the_answer_of_the_same_face_cut_alone(trained_run, scenes, oracle):
    """Batching every face of several photos changes nothing: a face's probabilities are those of its cut
    face predicted on its own."""
    model = load_run(trained_run)
    rows = model.predict(sorted((scenes / "images").glob("*.jpg")), faces="all")
    rows = rows[rows["face_status"] == "predicted"].head(4)
    member = model.members[0]
    for _, row in rows.iterrows():
        rgb = read_rgb(row["path"])
        face = row[BOX + MARKS].to_numpy(float)
        alone = model.predict_framed([member.pre.framing.cut(rgb, face)[None]], pd.DataFrame({"path": ["x"]}))
        np.testing.assert_allclose(probs_of(alone)[0], probs_of(row.to_frame().T.infer_objects())[0], atol=1e-5)


def test_the_command_writes_a_row_per_face_draws_them_and_largest_keeps_one_row_per_photo(
        trained_run, scenes, oracle, tmp_path, capsys):
    assert predict_main(["--run", str(trained_run), str(scenes / "images"), "--out", str(tmp_path / "all"),
                         "--faces", "all", "--draw"]) == 0
    rows = pd.read_csv(tmp_path / "all" / "predictions.csv")
    assert len(rows) == len(oracle) and set(rows["face_status"]) == {"predicted", "too_small"}
    assert "faces classified" in capsys.readouterr().out
    drawn = sorted((tmp_path / "all" / "drawn").iterdir())
    assert [p.name for p in drawn] == sorted(p.name for p in (scenes / "images").iterdir())
    face = rows[rows["face_status"] == "predicted"].iloc[0]
    name = Path(face["path"]).name
    original, boxed = (cv2.imread(str(p)).astype(int) for p in (scenes / "images" / name, tmp_path / "all" / "drawn" / name))
    assert boxed.shape == original.shape
    x, y0, y1 = int(round(face.x0)), int(face.y0) + 2, int(face.y1) - 2
    band = np.abs(boxed[y0:y1, x - 1:x + 2] - original[y0:y1, x - 1:x + 2]).sum(2).max(1)
    assert (band > 60).mean() > 0.9  # the box's left side is drawn over the photo

    # trained_run learned centre-cropped portraits: by default it reads a photo as a whole, as it was trained
    assert predict_main(["--run", str(trained_run), str(scenes / "images"), "--out", str(tmp_path / "one")]) == 0
    one = pd.read_csv(tmp_path / "one" / "predictions.csv")
    assert len(one) == len(drawn) and "face_status" not in one


def test_faces_all_is_refused_for_a_labeled_layout(trained_run, faces_root, tmp_path, capsys):
    assert predict_main(["--run", str(trained_run), str(faces_root), "--out", str(tmp_path / "p"),
                         "--faces", "all"]) == 2
    err = capsys.readouterr().err
    assert "--faces all is for photos, folders and videos" in err and "Traceback" not in err
    assert not (tmp_path / "p").exists()


def moving_faces_video(path: Path, frames: int = 12) -> list[list[Face]]:
    """Two drawn faces crossing a 320x240 frame in opposite directions at 10 frames a second (.avi: MJPG, frames
    stored one after another; else mp4v, whose index is written last); returns
    each frame's faces as the detector would give them."""
    rng = np.random.default_rng(4)
    people = [draw_photo(person_traits(rng), "normal", rng, 240, 320) for _ in range(2)]
    fourcc = cv2.VideoWriter_fourcc(*("MJPG" if path.suffix == ".avi" else "mp4v"))
    writer = cv2.VideoWriter(str(path), fourcc, 10, (320, 240))
    backdrop, truth = background(rng, 320, 240), []
    for n in range(frames):
        scene, covered, faces = backdrop.copy(), np.zeros((240, 320), np.int32), []
        for k, (img, box, _, marks) in enumerate(people):
            x = 60 + 200 * n / frames if k == 0 else 260 - 200 * n / frames
            box, marks = paste(scene, covered, k + 1, np.asarray(img), np.asarray(box, float), marks, 50,
                               (x, 70 + 100 * k))
            faces.append(Face(box, marks.reshape(5, 2), 0.99))
        writer.write(scene[:, :, ::-1])
        truth.append(faces)
    writer.release()
    return truth


def test_faces_moving_across_a_video_keep_one_track_each(trained_run, tmp_path, monkeypatch):
    truth = iter(moving_faces_video(tmp_path / "clip.mp4"))
    monkeypatch.setattr(faces_module, "detect_all", lambda rgbs, min_face=20: [next(truth) for _ in rgbs])
    assert predict_main(["--run", str(trained_run), str(tmp_path / "clip.mp4"), "--out", str(tmp_path / "p"),
                         "--faces", "all", "--fps", "5", "--draw"]) == 0
    rows = pd.read_csv(tmp_path / "p" / "predictions.csv")
    assert rows["frame"].tolist() == [n for n in range(0, 12, 2) for _ in range(2)]  # 10 fps sampled at 5
    np.testing.assert_allclose(rows["time_s"].unique(), np.arange(0, 1.2, 0.2), atol=1e-6)
    assert rows.groupby("track")["face"].agg(set).tolist() == [{0}, {1}] or rows["track"].nunique() == 2
    first = rows[rows["y0"] < 100]["track"]  # the upper face, the other the lower one, in every frame
    assert first.nunique() == 1 and rows[rows["y0"] >= 100]["track"].nunique() == 1
    tracks = pd.read_csv(tmp_path / "p" / "tracks.csv")
    assert len(tracks) == 2 and (tracks["frames"] == 6).all()
    assert tracks["first_s"].tolist() == [0, 0] and np.allclose(tracks["last_s"], 1.0)
    upper = rows[rows["y0"] < 100]
    mean = upper[[c for c in upper if c.startswith("p_mask_")]].mean().to_numpy()
    track = tracks[tracks["track"] == first.iloc[0]].iloc[0]
    np.testing.assert_allclose(track[[c for c in tracks if c.startswith("p_mask_")]].to_numpy(float), mean, atol=1e-6)
    assert all((tmp_path / "p" / t).is_file() for t in tracks["thumbnail"])
    drawn = cv2.VideoCapture(str(tmp_path / "p" / "drawn" / "clip.mp4.mp4"))
    assert int(drawn.get(cv2.CAP_PROP_FRAME_COUNT)) == 6


def test_bad_videos_are_one_line_each_and_the_frames_read_are_kept(trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(faces_module, "detect_all", lambda rgbs, min_face=20: [[] for _ in rgbs])
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    moving_faces_video(folder / "whole.mp4")
    moving_faces_video(folder / "whole.avi")
    data = (folder / "whole.avi").read_bytes()
    (folder / "cut.avi").write_bytes(data[:len(data) // 2])
    assert predict_main(["--run", str(trained_run), str(folder), "--out", str(tmp_path / "p"), "--faces", "all"]) == 0
    skipped = pd.read_csv(tmp_path / "p" / "skipped.csv").set_index("path")["reason"]
    assert skipped[str(folder / "empty.mp4")] == "empty file (0 bytes)"
    assert "cannot be decoded as a video" in skipped[str(folder / "noise.mp4")]
    rows = pd.read_csv(tmp_path / "p" / "predictions.csv").groupby("path")
    whole = rows.get_group(str(folder / "whole.mp4"))
    assert (whole["face_status"] == "no_face").all() and whole["frame"].tolist() == [0, 5, 10]  # 2 a second
    cut = rows.get_group(str(folder / "cut.avi"))["frame"].tolist()
    assert cut == [0, 5] and "the frames read are kept" in skipped[str(folder / "cut.avi")]


def test_a_photo_of_500_tiny_faces_lists_them_all_as_too_small(trained_run, monkeypatch):
    rng = np.random.default_rng(1)
    tiny = [Face(np.array([x, y, x + 10, y + 12], float), np.tile([x + 5.0, y + 6.0], (5, 1)), 0.9)
            for x, y in rng.integers(0, 1000, (500, 2))]
    monkeypatch.setattr(faces_module, "detect_all", lambda rgbs, min_face=20: [tiny for _ in rgbs])
    rows = load_run(trained_run).predict(np.zeros((1020, 1020, 3), np.uint8), faces="all")
    assert len(rows) == 500 and (rows["face_status"] == "too_small").all()


def test_the_export_says_how_a_scenes_face_is_cut(trained_run, tmp_path):
    load_run(trained_run).export(tmp_path / "export")
    info = json.loads((tmp_path / "export" / "preprocessing.json").read_text())
    assert "widened by face_margin" in info["face_to_input"]["how"]
    assert info["face_to_input"]["then"] == ["resize", "centre crop", "normalise"]


def test_synth_draws_scenes_with_a_table_of_their_faces(tmp_path):
    out = generate_scenes(tmp_path / "s", 3, (400, 300), seed=1, counts=(4,), widths=(30, 60))
    table = pd.read_csv(out / "faces.csv")
    assert len(table) == 12 and sorted(table["scene"].unique()) == [f"images/scene_0000{i}.jpg" for i in range(3)]
    assert table["width"].between(30, 60).all()
    assert set(table["mask"]) <= {0, 1, 2} and set(table["age_group"]) <= {0, 1, 2}
    assert all((out / p).is_file() for p in table["portrait"])
    assert table["in_frame"].between(0, 1).all() and table["covered"].between(0, 1).all()


def test_the_exported_graph_gives_each_faces_answer_on_the_same_cut_faces(trained_run, scenes, oracle, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = load_run(trained_run)
    rows = model.predict(sorted((scenes / "images").glob("*.jpg")), faces="all")
    rows = rows[rows["face_status"] == "predicted"].reset_index(drop=True)
    graph = model.export(tmp_path / "export")
    pre = model.members[0].pre  # the cut that preprocessing.json's face_to_input describes
    batch = np.stack([pre.eval()(image=pre.framing.cut(read_rgb(r["path"]), r[BOX + MARKS].to_numpy(float)))["image"]
                      .numpy() for _, r in rows.iterrows()])
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": batch})))
    for head in model.heads:
        np.testing.assert_allclose(got[f"p_{head.name}"], rows[[f"p_{head.name}_{c}" for c in head.classes]],
                                   atol=1e-4)

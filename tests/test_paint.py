"""Masks painted from landmarks: where they sit, how they vary, and the paint-masks command."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from multitask.data.check import check, main as data_main
from multitask.data.paint import DEFAULT_INCORRECT, SHAPES, paint_mask
from multitask.data.synth import draw_photo, person_traits


def unmasked_face(seed: int):
    """A synthetic portrait without a mask and its five drawn landmarks."""
    rng = np.random.default_rng(seed)
    img, _, _, landmarks = draw_photo(person_traits(rng), "normal", rng, 192, 256)
    return np.asarray(img), landmarks


def covered(alpha: np.ndarray, point) -> bool:
    x, y = (int(round(v)) for v in point)
    return alpha[y, x] > 0.5


@pytest.mark.parametrize("shape", SHAPES)
def test_a_worn_mask_covers_the_drawn_nose_and_mouth(shape):
    for seed in range(8):
        rgb, marks = unmasked_face(seed)
        painted, alpha, info = paint_mask(rgb, marks, np.random.default_rng(seed), "worn", shape)
        mouth = (marks[3] + marks[4]) / 2
        assert covered(alpha, marks[2]) and covered(alpha, mouth), (shape, seed)
        assert not covered(alpha, marks[0]) and not covered(alpha, marks[1])  # eyes stay free
        assert info["shape"] == shape and info["wear"] == "worn"
        changed = np.abs(painted.astype(int) - rgb.astype(int)).sum(2) > 0
        assert changed[alpha > 0.5].mean() > 0.95 and not changed[: int(marks[:2, 1].min()) - 10].any()


@pytest.mark.parametrize("wear", ["nose_out", "mouth_out", "chin"])
def test_a_mask_pulled_down_leaves_the_nose_out_and_the_mouth_only_under_the_nose(wear):
    for seed in range(12):
        rgb, marks = unmasked_face(seed)
        _, alpha, info = paint_mask(rgb, marks, np.random.default_rng(seed), wear)
        mouth = (marks[3] + marks[4]) / 2
        assert not covered(alpha, marks[2]), (wear, seed)
        ys = np.nonzero(alpha > 0.5)[0]
        assert len(ys) and ys.min() > marks[2, 1]  # something was painted, below the nose
        assert covered(alpha, mouth) == (wear == "nose_out"), (wear, seed)
        assert covered(alpha, mouth + (0, 0.45 * (mouth[1] - marks[2, 1]) + 12))  # the chin below the lip
        assert info["wear"] == wear


def test_a_mask_pulled_down_to_the_chin_sits_lower_than_one_under_the_lip():
    tops = {wear: [] for wear in ("mouth_out", "chin")}
    for seed in range(12):
        rgb, marks = unmasked_face(seed)
        for wear in tops:
            _, alpha, _ = paint_mask(rgb, marks, np.random.default_rng(seed), wear, "surgical")
            tops[wear].append(np.nonzero(alpha > 0.5)[0].min())
    assert np.mean(np.array(tops["chin"]) > np.array(tops["mouth_out"])) > 0.9


def test_a_mask_hanging_from_one_ear_covers_neither_nose_nor_mouth_and_hangs_beside_the_face():
    sides = set()
    for seed in range(12):
        rgb, marks = unmasked_face(seed)
        painted, alpha, info = paint_mask(rgb, marks, np.random.default_rng(seed), "one_ear")
        mouth = (marks[3] + marks[4]) / 2
        assert not covered(alpha, marks[2]) and not covered(alpha, mouth), seed
        assert not covered(alpha, marks[0]) and not covered(alpha, marks[1])
        ys, xs = np.nonzero(alpha > 0.5)
        worn = paint_mask(rgb, marks, np.random.default_rng(seed), "worn")[1]
        assert len(xs) > 0.25 * (worn > 0.5).sum(), seed  # much of it is in the photo
        eye_gap = marks[1, 0] - marks[0, 0]
        beside = (xs.mean() - mouth[0]) / eye_gap  # its middle is off to one side, below the ear
        assert abs(beside) > 0.5 and ys.mean() > marks[2, 1], (seed, beside)
        sides.add(np.sign(beside))
        assert not info["valve"]
    assert sides == {-1, 1}  # either ear
def test_masks_follow_a_tilted_head():
    rgb, marks = unmasked_face(3)
    center = marks.mean(0)
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    tilted = (marks - center) @ rot.T + center
    _, alpha, _ = paint_mask(rgb, tilted, np.random.default_rng(0), "worn", "surgical")
    assert covered(alpha, tilted[2]) and covered(alpha, (tilted[3] + tilted[4]) / 2)


def test_masks_vary_in_shape_colour_pattern_and_valve():
    rgb, marks = unmasked_face(1)
    infos = [paint_mask(rgb, marks, np.random.default_rng(s))[2] for s in range(60)]
    assert {i["shape"] for i in infos} == set(SHAPES)
    assert len({i["color"] for i in infos}) >= 6
    assert len({i["pattern"] for i in infos}) >= 2
    assert 0 < sum(i["valve"] for i in infos) < 30 and not any(i["valve"] for i in infos if i["shape"] == "surgical")


@pytest.mark.parametrize("shape", ["kn95", "n95", "cloth"])
def test_a_valve_is_drawn_on_the_mask_and_nowhere_else(shape):
    shown = 0
    for seed in range(6):
        rgb, marks = unmasked_face(seed)
        plain, alpha, _ = paint_mask(rgb, marks, np.random.default_rng(seed), "worn", shape, valve=False)
        valved, _, info = paint_mask(rgb, marks, np.random.default_rng(seed), "worn", shape, valve=True)
        assert info["valve"]
        changed = np.abs(valved.astype(int) - plain.astype(int)).sum(2) > 0  # the same mask, plus the valve
        assert (alpha[changed] > 0.5).mean() > 0.95, (shape, seed)  # on the mask, not on the face
        shown += changed.sum() > 20  # a hand in front of the mask may hide it
    assert shown >= 4


def test_paint_masks_writes_a_competition_set_that_data_check_accepts(tmp_path):
    """UTKFace-style input; photos where no face is found are listed, not painted on a guess."""
    src = tmp_path / "utk"
    src.mkdir()
    for i in range(8):
        rgb, _ = unmasked_face(i)
        Image.fromarray(rgb).save(src / f"{25 + 5 * i}_{i % 2}_0_2017010{i}.jpg.chip.jpg")
    Image.new("RGB", (192, 256), (120, 120, 120)).save(src / "40_1_0_20170109.jpg.chip.jpg")  # no face at all
    out = tmp_path / "painted"
    assert data_main(["paint-masks", str(src), str(out), "--workers", "1", "--incorrect", "one_ear,chin"]) == 0
    no_face = pd.read_csv(out / "no_face.csv")
    assert any(p.endswith("40_1_0_20170109.jpg.chip.jpg") for p in no_face["path"])
    people = pd.read_csv(out / "train.csv")
    assert len(people) + len(no_face) == 9 and len(people) >= 1
    count, problems = check(out)
    assert problems == [] and count == 7 * len(people)
    labels = pd.read_csv(out / "labels.csv")
    assert labels["mask"].value_counts().to_dict() == {"worn": 5 * len(people), "incorrect": len(people),
                                                      "not_worn": len(people)}
    assert set(labels.loc[labels["mask"] == "incorrect", "wear"]) <= {"one_ear", "chin"}  # the wears asked for
    # Never over existing data.
    assert data_main(["paint-masks", str(src), str(out), "--workers", "1"]) == 2


def test_paint_masks_names_an_unknown_wear_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        data_main(["paint-masks", str(tmp_path), str(tmp_path / "out"), "--incorrect", "nose_out,sideways"])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "'nose_out,sideways': a comma-separated list of nose_out, mouth_out, chin, one_ear" in err[-1]
    assert not (tmp_path / "out").exists()


def test_the_commands_default_wears_are_the_painters(capsys):
    """`--incorrect`'s default is written in the parser (--help stays free of the painter's heavy imports): it must
    name the painter's own DEFAULT_INCORRECT."""
    with pytest.raises(SystemExit):
        data_main(["paint-masks", "--help"])
    assert f"(default: {','.join(DEFAULT_INCORRECT)})" in " ".join(capsys.readouterr().out.split())

"""Each data source gives one row per photo; bad input is reported completely, naming the files."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from multitask.data.check import check, main as data_main
from multitask.data.images import read_rgb
from multitask.config import ConfigError, load_config
from multitask.data.sources import (SOURCES, DataError, detect_source, load_competition, load_imagefolder,
                                    load_manifest, load_utkface)

COLUMNS = {"path", "person_id", "gender", "age", "age_group", "mask"}


def first_person(root: Path) -> Path:
    return sorted((root / "images").iterdir())[0]


def problem_paths(problems) -> set[str]:
    return {p.path for p in problems}


def test_competition_layout_gives_7_rows_per_person(faces_root):
    table, problems = load_competition(faces_root)
    assert problems == []
    assert COLUMNS <= set(table.columns)
    assert len(table) == 24 * 7 and table["person_id"].nunique() == 24
    assert table.groupby("person_id").size().eq(7).all()
    assert sorted(table["mask"].value_counts().to_dict().items()) == [(0, 24 * 5), (1, 24), (2, 24)]
    people = pd.read_csv(faces_root / "train.csv", dtype=str)
    ages = dict(zip(people["id"], people["age"].astype(int)))
    assert (table["age"] == table["person_id"].map(ages)).all()


def test_mixed_case_extensions_are_accepted(faces_copy):
    person = first_person(faces_copy)
    (person / "mask1.jpg").rename(person / "mask1.JPG")
    Image.open(person / "mask2.jpg").save(person / "mask2.png")
    (person / "mask2.jpg").unlink()
    (person / "normal.jpg").rename(person / "normal.jpeg")
    table, problems = load_competition(faces_copy)
    assert problems == [] and len(table) == 24 * 7


def test_missing_train_csv_names_the_file(faces_copy):
    (faces_copy / "train.csv").unlink()
    with pytest.raises(DataError, match=str(faces_copy / "train.csv")):
        load_competition(faces_copy)


def test_missing_columns_are_named(faces_copy):
    df = pd.read_csv(faces_copy / "train.csv").drop(columns=["age"])
    df.to_csv(faces_copy / "train.csv", index=False)
    with pytest.raises(DataError, match=r"missing column\(s\) \['age'\]"):
        load_competition(faces_copy)


def test_every_layout_problem_is_reported_at_once(faces_copy):
    people = sorted((faces_copy / "images").iterdir())
    (people[0] / "mask3.jpg").unlink()  # missing photo
    (people[1] / "mask9.jpg").write_bytes((people[1] / "mask1.jpg").read_bytes())  # extra photo
    (people[2] / "notes.txt").write_text("hello")  # non-image file
    (people[2] / ".DS_Store").write_text("ignored")  # hidden files are not data
    df = pd.read_csv(faces_copy / "train.csv", dtype=str)
    df.loc[3, "gender"] = "robot"  # unparseable label
    df.loc[4, "age"] = "old"
    df.loc[6, "id"] = df.loc[5, "id"]  # duplicate person id
    df.to_csv(faces_copy / "train.csv", index=False)

    table, problems = load_competition(faces_copy)
    by_path = {}
    for p in problems:
        by_path.setdefault(p.path, []).append(p.message)
    assert "missing photo(s): mask3" in by_path[str(people[0])]
    assert any("extra photo" in m for m in by_path[str(people[1] / "mask9.jpg")])
    assert any("not an image" in m for m in by_path[str(people[2] / "notes.txt")])
    csv_msgs = " | ".join(by_path[str(faces_copy / "train.csv")])
    assert "line 5: gender 'robot'" in csv_msgs and "line 6: age 'old'" in csv_msgs
    assert f"duplicate person id {df.loc[5, 'id']!r} on lines 7, 8" in csv_msgs
    assert str(people[2] / ".DS_Store") not in by_path
    # The usable rest is still loaded: 24 people - 2 bad labels - 2 sharing an id, one photo missing.
    assert len(table) == 20 * 7 - 1


def test_unreadable_and_truncated_images_are_found_by_the_check(faces_copy):
    people = sorted((faces_copy / "images").iterdir())
    truncated = people[0] / "mask1.jpg"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage = people[1] / "normal.jpg"
    garbage.write_bytes(b"this is not a jpeg")
    count, problems = check(faces_copy)
    assert count == 24 * 7
    assert problem_paths(problems) == {str(truncated.resolve()), str(garbage.resolve())}
    assert all("unreadable image" in p.message for p in problems)


def test_check_command_exits_nonzero_listing_the_files(faces_copy, capsys):
    bad = first_person(faces_copy) / "incorrect_mask.jpg"
    bad.write_bytes(b"\x89PNG broken")
    assert data_main(["check", str(faces_copy)]) == 1
    out = capsys.readouterr().out
    assert str(bad.resolve()) in out and "1 problem(s)" in out


def test_check_command_passes_on_good_data(faces_root):
    run = subprocess.run([sys.executable, "-m", "multitask.data", "check", str(faces_root)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "168 photos, 0 problem(s)" in run.stdout


def test_manifest_paths_are_relative_to_the_csv(faces_root, tmp_path):
    table, _ = load_competition(faces_root)
    rows = table.head(10)
    manifest = pd.DataFrame({
        "path": [str(Path(p).relative_to(faces_root)) for p in rows["path"]],
        "person_id": rows["person_id"], "gender": np.where(rows["gender"] == 1, "female", "male"),
        "age": rows["age"], "mask": rows["mask"].map({0: "worn", 1: "incorrect", 2: "not_worn"})})
    manifest.to_csv(faces_root / "manifest.csv", index=False)
    try:
        loaded, problems = load_manifest(faces_root / "manifest.csv")
    finally:
        (faces_root / "manifest.csv").unlink()
    assert problems == []
    assert loaded["path"].tolist() == rows["path"].tolist()
    labels = ["gender", "age_group", "mask"]
    assert loaded[labels].values.tolist() == rows[labels].values.tolist()


def test_manifest_with_age_groups_and_bad_rows(tmp_path, faces_root):
    img = next((faces_root / "images").rglob("normal.jpg"))
    (tmp_path / "a.jpg").write_bytes(img.read_bytes())
    pd.DataFrame({"path": ["a.jpg", "a.jpg", "gone.jpg"], "person_id": ["p1", "p2", "p3"],
                  "gender": ["female", "alien", "male"], "age_group": ["60+", "<30", "<30"],
                  "mask": ["not_worn", "worn", "worn"]}).to_csv(tmp_path / "m.csv", index=False)
    table, problems = load_manifest(tmp_path / "m.csv")
    assert table[["gender", "age_group", "mask"]].values.tolist() == [[1, 2, 2]]
    assert {(p.path, "line 3" in p.message or "does not exist" in p.message) for p in problems} == {
        (str(tmp_path / "m.csv"), True), (str(tmp_path / "gone.jpg"), True)}


def test_utkface_names_give_unmasked_persons(tmp_path, faces_root):
    img = next((faces_root / "images").rglob("normal.jpg")).read_bytes()
    for name in ["25_0_1_20170116.jpg.chip.jpg", "61_1_0_2017.jpg", "45_1_3_x.png"]:
        (tmp_path / name).write_bytes(img)
    (tmp_path / "readme_1_2.jpg").write_bytes(img)
    table, problems = load_utkface(tmp_path)
    assert sorted(zip(table["age"], table["gender"], table["age_group"], table["mask"])) == [
        (25, 0, 0, 2), (45, 1, 1, 2), (61, 1, 2, 2)]
    assert table["person_id"].nunique() == 3
    assert problem_paths(problems) == {str(tmp_path / "readme_1_2.jpg")}


def test_each_layout_is_recognised_by_the_table_of_sources(tmp_path, faces_root, mask_folders_root):
    (tmp_path / "faces.csv").write_text("path\n")
    (tmp_path / "utk").mkdir()
    (tmp_path / "utk" / "25_0_1_20170116.jpg").write_bytes(b"")
    (tmp_path / "signs" / "stop").mkdir(parents=True)
    roots = {"competition": faces_root, "manifest": tmp_path / "faces.csv", "mask_folders": mask_folders_root,
             "imagefolder": tmp_path / "signs", "utkface": tmp_path / "utk"}
    assert {name: detect_source(root) for name, root in roots.items()} == {name: name for name in roots}
    assert set(roots) == set(SOURCES)


def test_a_data_source_outside_the_table_is_refused_at_load():
    with pytest.raises(ConfigError) as e:
        load_config(["data.source=webdataset"])
    assert str(e.value) == ("data.source='webdataset': must be one of synthetic, manifest, competition, "
                            "imagefolder, utkface")


def test_image_folders_with_train_and_test_splits(tmp_path):
    for split in ("train", "test"):
        for cls in ("stop", "yield", "speed_30"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(d / f"{i}.png")
    (tmp_path / "train" / "stop" / "labels.txt").write_text("x")
    table, problems, classes = load_imagefolder(tmp_path)
    assert classes == ["speed_30", "stop", "yield"]
    assert len(table) == 12 and table.groupby("split").size().to_dict() == {"test": 6, "train": 6}
    assert table["person_id"].is_unique
    assert problem_paths(problems) == {str(tmp_path / "train" / "stop" / "labels.txt")}


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16", "P", "LA"])
def test_any_image_mode_loads_as_rgb(tmp_path, mode):
    rgb = Image.new("RGB", (12, 10), (200, 100, 50))
    if mode == "I;16":
        img = Image.fromarray(np.full((10, 12), 40000, dtype=np.uint16))
        path = tmp_path / "x.png"
    else:
        img = rgb.convert(mode)
        path = tmp_path / ("x.jpg" if mode in ("L", "CMYK") else "x.png")
    img.save(path)
    a = read_rgb(path)
    assert a.shape == (10, 12, 3) and a.dtype == np.uint8
    if mode == "I;16":
        assert abs(int(a[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1  # scaled, not clipped to 255
    if mode == "RGBA":
        assert tuple(a[0, 0]) == (200, 100, 50)


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    (tmp_path / "r.jpg").write_bytes(buf.getvalue())
    a = read_rgb(tmp_path / "r.jpg")
    assert a.shape == (20, 10, 3)  # portrait after rotation
    assert a[:8].mean() > 200 and a[12:].mean() < 50  # the white half is now on top


def test_a_head_column_of_the_users_own_takes_class_names_or_indices():
    from multitask.data.table import class_indices

    got = class_indices(pd.Series(["yes", "0", " No", "", "-1"]), ["no", "yes"], "faces.csv: column glasses")
    assert got.tolist() == [1, 0, 0, -1, -1]
    with pytest.raises(DataError) as e:
        class_indices(pd.Series(["yes", "maybe", "2"]), ["no", "yes"], "faces.csv: column glasses")
    assert "faces.csv: column glasses: values ['2', 'maybe'] are not classes ['no', 'yes'] or their indices" in str(e.value)

"""The mask layouts people have: a folder per mask class, named as the public face-mask sets name them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from multitask.data.sources import MASK_ALIASES, detect_source, label_key, load_mask_folders
from multitask.data.table import load_labeled

# folder name -> mask class (0 worn, 1 incorrect, 2 not worn), in the spellings of the common sets
LAYOUTS = {
    "kaggle two classes": {"with_mask": 0, "without_mask": 2},
    "kaggle three classes": {"with_mask": 0, "without_mask": 2, "mask_weared_incorrect": 1},
    "this project's": {"worn_correctly": 0, "worn_incorrectly": 1, "not_worn": 2},
    "spaces and capitals": {"Mask": 0, "No Mask": 2, "Mask Worn Incorrectly": 1},
    "dashes": {"with-mask": 0, "without-mask": 2, "incorrect-mask": 1},
}


def mask_layout(faces_root: Path, out: Path, folders: dict) -> Path:
    """Two photos of each of the first three persons in every class folder (normal.jpg for not worn, mask1.jpg for
    worn, incorrect_mask.jpg for incorrect: the synthetic faces' own labels)."""
    photo = {0: "mask1", 1: "incorrect_mask", 2: "normal"}
    for name, cls in folders.items():
        (out / name).mkdir(parents=True)
        for person in sorted((faces_root / "images").iterdir())[:3]:
            shutil.copy(person / f"{photo[cls]}.jpg", out / name / f"{person.name}.jpg")
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_common_mask_layout_is_read_as_a_folder_per_mask_class(layout, faces_root, tmp_path):
    root = mask_layout(faces_root, tmp_path / "set", LAYOUTS[layout])
    assert detect_source(root) == "mask_folders"
    table, problems = load_mask_folders(root)
    assert problems == []
    expected = {cls: 3 for cls in LAYOUTS[layout].values()}
    assert table["mask"].value_counts().to_dict() == expected
    for name, cls in LAYOUTS[layout].items():
        assert set(table[table["path"].str.contains(f"/{name}/")]["mask"]) == {cls}
    same, _ = load_labeled(root)  # what data.extra_val reads
    assert same["mask"].tolist() == table["mask"].tolist()


def test_a_folder_with_a_class_name_it_does_not_know_is_not_a_mask_layout(faces_root, tmp_path):
    root = mask_layout(faces_root, tmp_path / "set", {"with_mask": 0, "sunglasses": 2})
    assert detect_source(root) == "imagefolder"


def test_label_names_match_in_any_case_with_dashes_underscores_or_spaces():
    assert label_key("  Mask-Weared  Incorrect ") == "mask_weared_incorrect"
    assert MASK_ALIASES[label_key("WITHOUT MASK")] == 2


@pytest.mark.slow
def test_a_with_mask_without_mask_folder_is_scored_by_predict_and_as_an_extra_validation_set(
        trained_run, faces_root, tmp_path):
    from multitask.predict import predict

    root = mask_layout(faces_root, tmp_path / "kaggle", LAYOUTS["kaggle two classes"])
    df = predict(trained_run, root, tmp_path / "pred", progress=False, log=lambda s: None)
    assert sorted(df["true_mask"]) == [0, 0, 0, 2, 2, 2] and "true_gender" not in df
    assert list(json.loads((tmp_path / "pred" / "report.json").read_text())) == ["mask"]
    # the session's run scores its extra validation set, laid out as with_mask/, mask_weared_incorrect/,
    # without_mask/, in every fold and in the report
    scored = json.loads((trained_run / "report.json").read_text())["extra_val"]["masked"]
    assert scored["photos"] == 96 and scored["heads"] == ["mask"] and len(scored["folds"]) == 3
    assert set(scored["ensemble"]["mask"]["per_class"]) == {"worn", "incorrect", "not_worn"}

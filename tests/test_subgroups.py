"""Who the model fails: scores per subgroup (gender x age group, race, a manifest's own columns) and the model card."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from multitask.config import ConfigError, face_heads, load_config
from multitask.data.sources import load_competition
from multitask.data.table import load_table
from multitask.subgroups import MIN_GROUP_PHOTOS, subgroup_results

from conftest import manifest_csv, tiny_overrides


def oof_of(true: dict, pred: dict, **columns) -> pd.DataFrame:
    """A prediction table with one-hot probabilities of ``pred``."""
    df = pd.DataFrame({"path": [f"p{i}" for i in range(len(true["mask"]))], "person_id": "x", **columns})
    for h in face_heads():
        df[f"true_{h.name}"] = true[h.name]
        for i, c in enumerate(h.classes):
            df[f"p_{h.name}_{c}"] = (np.asarray(pred[h.name]) == i).astype(float)
    return df


def test_each_group_is_scored_and_the_largest_gap_is_between_groups_big_enough():
    n = MIN_GROUP_PHOTOS
    true = {"mask": [0, 0, 2, 2] * n, "gender": [0] * 2 * n + [1] * 2 * n, "age": [0, 1] * n * 2}
    pred = {"mask": true["mask"][:2 * n] + [0] * 2 * n,  # right on group A, "worn" for everyone in group B
            "gender": true["gender"], "age": true["age"]}
    race = ["A"] * 2 * n + ["B"] * 2 * n
    oof = oof_of(true, pred, race=race)
    oof.loc[0, "race"] = "C"  # a group of one photo: listed, left out of the gap
    cfg = load_config()
    r = subgroup_results(oof, face_heads(), cfg)["race"]
    assert set(r["groups"]) == {"A", "B", "C"} and r["groups"]["C"]["photos"] == 1
    assert r["groups"]["A"]["scores"]["mask"]["accuracy"] == 1.0
    assert r["groups"]["B"]["scores"]["mask"]["accuracy"] == 0.5
    assert r["gap"]["mask"]["accuracy"] == pytest.approx(0.5)
    assert r["gap"]["gender"]["accuracy"] == 0.0
    # within gender x age group, a group holds one gender: its gender macro-F1 means nothing and is left out
    g = subgroup_results(oof, face_heads(), cfg)["gender x age group"]
    assert set(g["groups"]) == {"male <30", "male 30-59", "female <30", "female 30-59"}
    assert g["groups"]["male <30"]["scores"]["gender"]["f1_macro"] is None
    assert g["groups"]["male <30"]["scores"]["mask"]["f1_macro"] is not None


@pytest.mark.slow
def test_the_trained_runs_report_and_model_card_show_the_subgroups(trained_run):
    report = json.loads((trained_run / "report.json").read_text())
    assert set(report["subgroups"]) == {"gender x age group", "mask on vs not_worn", "race"}
    oof = pd.read_csv(trained_run / "oof.csv")
    split = report["subgroups"]["mask on vs not_worn"]["groups"]  # age read on masked against unmasked photos
    assert {k: g["photos"] for k, g in split.items()} == {"not_worn": int((oof["true_mask"] == 2).sum()),
                                                           "on": int((oof["true_mask"] != 2).sum())}
    races = set(load_competition(json.loads((trained_run / "run.json").read_text())["data_root"])[0]["race"])
    assert set(report["subgroups"]["race"]["groups"]) == races
    assert sum(g["photos"] for g in report["subgroups"]["race"]["groups"].values()) == len(
        pd.read_csv(trained_run / "oof.csv"))
    text = (trained_run / "report.md").read_text()
    assert "## Subgroups" in text and "### race" in text and "| **largest gap** |" in text
    card = (trained_run / "MODEL_CARD.md").read_text()
    for section in ("## Intended use", "## Training data", "## Subgroups", "## Known limitations",
                    "## Masked photos never trained on (data.extra_val)"):
        assert section in card
    assert "| masked | 96 |" in card  # the extra validation set, scored by the fold ensemble


def test_a_manifest_names_its_own_subgroup_columns(faces_root, tmp_path):
    table, _ = load_competition(faces_root)
    manifest = table[["path", "person_id", "gender", "age", "mask"]].assign(
        camera=np.where(np.arange(len(table)) % 2, "phone", "webcam"))
    csv = manifest_csv(manifest, faces_root, f"photos-{tmp_path.name}")
    base = tiny_overrides(faces_root, tmp_path)[2:] + ["data.source=manifest", f"data.root={csv}"]
    table, _ = load_table(load_config(base + ["report.subgroups=[camera]"]))
    assert set(table["camera"]) == {"phone", "webcam"}
    with pytest.raises(ConfigError, match=r"report.subgroups: column\(s\) \['lens'\] are not in the data"):
        load_table(load_config(base + ["report.subgroups=[lens]"]))

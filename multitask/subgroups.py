"""Who the model fails: every head's scores per subgroup of the out-of-fold photos (gender x age group, mask on vs
not, race and the data's own columns, ``report.subgroups``), and the largest gap between groups."""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import numpy as np
import pandas as pd

from multitask.config import Config, HeadConfig
from multitask.metrics import JOINT, label, score
from multitask.run import frame_arrays, subgroup_columns, true_column
from multitask.tasks import joint_label


MIN_GROUP_PHOTOS = 20  # the largest gap is taken over groups with at least this many photos


def subgroup_labels(oof: pd.DataFrame, heads: Sequence[HeadConfig], cfg: Config) -> Dict[str, pd.Series]:
    """Subgroup name -> each photo's group: the true classes of the heads in report.cross crossed (gender x age
    group), for a head with an absent class its photos of that class against the others (age read on unmasked
    against masked photos), and every subgroup column the table keeps (race, report.subgroups)."""
    by_name = {h.name: h for h in heads}
    crossed = [by_name[n] for n in cfg.report.cross if n in by_name]
    out = {}
    if crossed and len(crossed) == len(cfg.report.cross):
        true = [oof[true_column(h)].to_numpy() for h in crossed]
        known = np.all([t >= 0 for t in true], axis=0)
        out[" x ".join(cfg.report.cross) + " group"] = pd.Series(
            [" ".join(h.classes[t[i]] for h, t in zip(crossed, true)) if known[i] else None for i in range(len(oof))],
            index=oof.index)
    for h in heads:
        if h.absent is not None:
            true = oof[true_column(h)].to_numpy()
            out[f"{h.name} on vs {h.absent}"] = pd.Series(
                np.where(true < 0, None, np.where(true == h.classes.index(h.absent), h.absent, "on")), index=oof.index)
    for col in subgroup_columns(cfg):
        if col in oof and oof[col].notna().any():
            out[col] = oof[col].where(oof[col].notna()).astype("string")
    return out


def subgroup_results(oof: pd.DataFrame, heads: Sequence[HeadConfig], cfg: Config) -> dict:
    """Per subgroup and group: photos, persons, and per head (and the joint label) macro-F1 and accuracy on the
    out-of-fold photos; macro-F1 is None where the group holds one true class of the head (it says nothing
    there). ``gap``: per head, the largest difference between groups of at least MIN_GROUP_PHOTOS photos."""
    results = {}
    for name, labels in subgroup_labels(oof, heads, cfg).items():
        groups = {}
        for value in sorted(labels.dropna().unique()):
            part = oof[(labels == value).to_numpy()]
            targets, probs = frame_arrays(heads, part)
            scores = score(heads, targets, probs)
            row = {"photos": len(part), "persons": int(part["person_id"].nunique()), "scores": {}}
            for key, sc in scores.items():
                if key == JOINT:
                    known = np.all([targets[h.name] >= 0 for h in heads], axis=0)
                    true = joint_label(heads, {h: t[known] for h, t in targets.items()})
                else:
                    true = targets[key][targets[key] >= 0]
                row["scores"][key] = {"f1_macro": sc["f1_macro"] if len(np.unique(true)) > 1 else None,
                                      "accuracy": sc["accuracy"]}
            groups[str(value)] = row
        big = [g for g in groups.values() if g["photos"] >= MIN_GROUP_PHOTOS]
        gap = {}
        for key in (next(iter(groups.values()))["scores"] if groups else {}):
            for metric in ("f1_macro", "accuracy"):
                values = [g["scores"][key][metric] for g in big if g["scores"][key][metric] is not None]
                if len(values) > 1:
                    gap.setdefault(key, {})[metric] = float(max(values) - min(values))
        results[name] = {"groups": groups, "gap": gap}
    return results


def subgroup_table(result: dict, name: Callable[[str], str]) -> pd.DataFrame:
    """One subgroup of ``subgroup_results`` as a table: a row per group (photos, persons, and per score key, named
    by ``name``, "macro-F1 / accuracy"; a dash where the group holds one true class), and the largest gap last.
    report.md and the dashboard show this table."""
    cell = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    keys = list(next(iter(result["groups"].values()))["scores"]) if result["groups"] else []
    rows = [{"group": g, "photos": str(v["photos"]), "persons": str(v["persons"]),
             **{name(k): f"{cell(v['scores'][k]['f1_macro'])} / {cell(v['scores'][k]['accuracy'])}" for k in keys}}
            for g, v in result["groups"].items()]
    rows.append({"group": "largest gap", "photos": "", "persons": "",
                 **{name(k): f"{cell(result['gap'].get(k, {}).get('f1_macro'))} / "
                             f"{cell(result['gap'].get(k, {}).get('accuracy'))}" for k in keys}})
    return pd.DataFrame(rows, columns=["group", "photos", "persons", *map(name, keys)])


def subgroup_lines(results: dict, heads: Sequence[HeadConfig]) -> List[str]:
    if not results:
        return []
    lines = ["", "## Subgroups (all out-of-fold photos)", "",
             "Macro-F1 / accuracy per group; a dash where the group holds one true class of the head. The largest "
             f"gap is between groups of at least {MIN_GROUP_PHOTOS} photos."]
    for name, r in results.items():
        table = subgroup_table(r, lambda k: label(k, heads))
        table.iloc[-1, 0] = f"**{table.iloc[-1, 0]}**"
        lines += ["", f"### {name}", "", "| " + " | ".join(table.columns) + " |", "|---" * len(table.columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in table.itertuples(index=False)]
    return lines

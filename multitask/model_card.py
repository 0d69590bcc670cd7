"""MODEL_CARD.md of a run: what the model is, what it was trained and judged on, who it fails, and where not to
use it. Written with the report, from the run directory and the report's numbers alone."""
from __future__ import annotations

from typing import List, Sequence

import pandas as pd

from multitask.config import Config, HeadConfig
from multitask.metrics import label


def _score_rows(result: dict, heads: Sequence[HeadConfig]) -> List[str]:
    rows = ["| | macro-F1 (mean ± std over folds) | accuracy |", "|---|---|---|"]
    rows += [f"| {label(k, heads)} | {v['f1_macro']:.3f} ± {result['std'][k]['f1_macro']:.3f} | {v['accuracy']:.3f} |"
             for k, v in result["mean"].items()]
    return rows


def _subgroup_rows(result: dict, heads: Sequence[HeadConfig]) -> List[str]:
    subgroups = result.get("subgroups") or {}
    if not subgroups:
        return ["No subgroup could be scored (the data has no gender and age labels or subgroup columns)."]
    rows = []
    for sub, r in subgroups.items():
        worst = {}
        for key, gap in r["gap"].items():
            metric = "f1_macro" if "f1_macro" in gap else "accuracy"
            scored = {g: v["scores"][key][metric] for g, v in r["groups"].items()
                      if v["scores"][key][metric] is not None}
            if scored:
                low = min(scored, key=scored.get)
                worst[key] = f"{label(key, heads)} {gap[metric]:.3f} ({'macro-F1' if metric == 'f1_macro' else 'accuracy'}; " \
                             f"lowest: {low} {scored[low]:.3f})"
        sizes = ", ".join(f"{g} {v['photos']}" for g, v in r["groups"].items())
        rows += [f"- **{sub}** (photos: {sizes}). Largest gap between groups: "
                 + ("; ".join(worst.values()) if worst else "too few photos per group to compare") + "."]
    return rows + ["", "The full table per group is in report.md, section Subgroups."]


def _real_mask_rows(result: dict, heads: Sequence[HeadConfig]) -> List[str]:
    """Per extra set and head with an absent class (the mask): macro-F1, on vs absent accuracy, recalls."""
    present = [h for h in heads if h.absent is not None]
    extra = [(name, r, h) for name, r in (result.get("extra_val") or {}).items() for h in present
             if h.name in r["heads"]]
    if not extra:
        return ["No labeled set outside the training data was scored (`data.extra_val`): how the heads do on "
                "photos unlike the training ones (real masks) is not known from this run."]
    rows = ["| set | photos | head | macro-F1 | on vs absent accuracy | recall per class |",
            "|---|---|---|---|---|---|"]
    for name, r, h in extra:
        m = r["ensemble"][h.name]
        recalls = ", ".join(f"{c} {v['recall']:.3f} ({v['support']})" for c, v in m["per_class"].items()
                            if v["support"])
        rows.append(f"| {name} | {r['photos']} | {h.name} (vs {h.absent}) | {m['f1_macro']:.3f} "
                    f"| {m.get('on_accuracy', float('nan')):.3f} | {recalls} |")
    return rows + ["", "Fold ensemble of this run, never trained on these photos."]


def _weakest_classes(result: dict, heads: Sequence[HeadConfig]) -> List[str]:
    out = []
    for h in heads:
        per_class = result["pooled"].get(h.name, {}).get("per_class", {})
        scored = {c: v["f1"] for c, v in per_class.items() if v["support"]}
        if len(scored) > 1:
            low = min(scored, key=scored.get)
            out.append(f"{h.name}: {low} (F1 {scored[low]:.3f})")
    return out


def model_card(cfg: Config, run, heads: Sequence[HeadConfig], oof: pd.DataFrame, result: dict, recipe: str) -> str:
    d = cfg.data
    head_list = ", ".join(f"{h.name} ({' / '.join(h.classes)}; kind {h.kind}"
                          + (", prior training" if h.prior == "training" else "") + ")" for h in heads)
    stages = [f"stage {i}: {s.epochs} epochs on " + (f"heads {', '.join(s.heads)}" if s.heads else "every head")
              + (f", photos whose {', '.join(f'{k} is {v}' for k, v in s.only.items())}" if s.only else "")
              for i, s in enumerate(cfg.stages, 1) if s.enabled]
    extra = [f"{what}: {', '.join(map(str, roots))}" for what, roots in
             (("extra stage-1 photos", d.extra_unmasked), ("extra training sets", d.extra_train)) if roots]
    weakest = _weakest_classes(result, heads)
    lines = [
        f"# Model card: {run.root.name}", "",
        "## Model", "",
        f"A {cfg.model.arch} trunk (weights at start: {cfg.model.pretrained}) shared by one head per task: "
        f"{head_list}. "
        f"Input: {d.size[0]}x{d.size[1]} px of the face region ({d.face_crop}). {len(result['folds'])} fold model(s) "
        f"of {cfg.cv.folds}-fold cross-validation grouped by person; predictions average them.", "",
        "## Intended use", "",
        "Telling from a photo of one face whether a mask is worn, worn incorrectly or not worn, with the person's "
        "apparent gender and age group, for studying such classifiers (the mask classification competition) and "
        "for inspecting what they look at (Grad-CAM). Not for identifying people, for decisions about a person "
        "(access, health, age checks), or for gender beyond the two labels the training data used.", "",
        "## Training data", "",
        f"data.source {d.source} {d.root or ''}: {len(oof)} photos of {oof['person_id'].nunique()} persons were "
        "held out once each (out-of-fold). " + "; ".join(stages) + "."
        + (" " + "; ".join(extra) + "." if extra else ""),
        "", f"Recipe: {recipe}", "",
        "## Scores (held-out persons)", "", *_score_rows(result, heads), "",
        "## Subgroups", "", *_subgroup_rows(result, heads), "",
        "## Masked photos never trained on (data.extra_val)", "", *_real_mask_rows(result, heads), "",
        "## Known limitations", "",
        "- One face per photo: with several faces, the largest (face_crop=detector|aligned) or the centre crop is "
        "read.",
        "- Masks in the competition and dev sets are painted from templates; painted-mask scores flatter the model. "
        "Judge the mask head on real masked photos (the section above).",
        "- Gender is a binary label and age a label from the source data (partly estimated); both are read from "
        "appearance and are wrong for some people.",
    ]
    if weakest:
        lines.append("- Weakest class per head (all out-of-fold photos): " + "; ".join(weakest) + ".")
    lines += ["", "## Use", "",
              f"`multitask predict --run {run.root} PHOTOS --out OUT`; in Python `multitask.load_run(\"{run.root}\")`; "
              f"`multitask export --run {run.root} --out DIR` for ONNX."]
    return "\n".join(lines) + "\n"

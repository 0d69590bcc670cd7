"""Inspection dashboard: ``streamlit run apps/dashboard.py`` (or ``make dashboard``).

Reads run directories only (``runs/`` by default; ``multitask dashboard --runs DIR`` or MULTITASK_RUNS): it opens
on the run's headline scores and one of its held-out photos with the Grad-CAM grid (trunk stages x heads) already
drawn; any held-out photo, an uploaded one or the camera's can be inspected (for a run that frames photos by
their detected face: every face boxed and labeled, and the CAM grid of the face picked); the per-fold report with
subgroup scores, confusion matrices and learning curves; the most confident mistakes.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image, UnidentifiedImageError

import torch

from multitask.annotate import draw_faces, face_label
from multitask.api import Predictor
from multitask.cli import MAX_UPLOAD_MB
from multitask.config import ConfigError, extra_val_names
from multitask.data.transforms import DETECTED, Preprocessing
from multitask.data.images import TooLarge, check_pixels, read_rgb, to_rgb
from multitask.explain import METHODS, explain_photo, overlay, photo_faithfulness
from multitask.data.sources import DataError
from multitask.model import WeightsError
from multitask.metrics import JOINT
from multitask.subgroups import subgroup_table
from multitask.inference import PREDICTED, TOO_SMALL, default_faces, face_vectors
from multitask.run import Member, RunDir, final_heads, pred_column, prob_columns, read_json, true_column
from multitask.tasks import joint_class_names, joint_label, joint_probabilities

HELD_OUT = "held-out photos of the run"

st.set_page_config(page_title="multitask inspector", layout="wide")


@st.cache_resource(show_spinner="loading models")
def models_for(run: str, folds: tuple):
    """(config, fold models, the run's preprocessing)."""
    cfg = RunDir(run).load_config()
    return cfg, RunDir(run).load_models(cfg, list(folds)), RunDir(run).preprocessing(cfg)


@st.cache_data
def read_csv(path: str, mtime: float) -> pd.DataFrame:  # mtime: a rewritten file is read again
    return pd.read_csv(path, dtype={"person_id": str})


def csv(path: Path) -> pd.DataFrame | None:
    return read_csv(str(path), path.stat().st_mtime) if path.exists() else None


@st.cache_data(show_spinner="computing Grad-CAM")
def cams_for(run: str, folds: tuple, photo_key: str, _photo: np.ndarray, method: str, targets: tuple,
             framed: bool = False):
    _, models, pre = models_for(run, folds)
    return explain_photo(models, pre, _photo, method, dict(targets) or None, framed=framed)


@st.cache_data(show_spinner="finding every face")
def faces_for(run: str, folds: tuple, photo_key: str, _photo: np.ndarray) -> pd.DataFrame:
    """A row per face of the photo (``multitask.inference``), predicted by the models shown."""
    cfg, models, pre = models_for(run, folds)
    predictor = Predictor([Member(RunDir(run), cfg, models, pre, cfg.predict.views())], torch.device("cpu"))
    return predictor.predict_faces([_photo], [photo_key])


def pick_face(run: Path, folds: tuple, photo: np.ndarray, photo_key: str) -> tuple[np.ndarray, str] | None:
    """Every face of an uploaded photo boxed and labeled; the face picked, cut out as the network gets it (None:
    no face to inspect)."""
    cfg, _, pre = models_for(str(run), folds)
    rows = faces_for(str(run), folds, photo_key, photo)
    st.image(draw_faces(photo, rows, final_heads(cfg)), width="stretch",
             caption=f"{(rows['face_status'] == PREDICTED).sum()} face(s) classified, "
                     f"{(rows['face_status'] == TOO_SMALL).sum()} too small (under {cfg.predict.min_face} px wide)")
    faces = rows[rows["face_status"] == PREDICTED]
    if faces.empty:
        st.info("No face large enough to classify was found in this photo.")
        return None
    labels = {int(r.face): f"face {int(r.face)}: {face_label(r, final_heads(cfg))}" for r in faces.itertuples()}
    k = st.selectbox("face", list(labels), format_func=labels.get, key="face_pick")
    row = faces[faces["face"] == k].iloc[0]
    return pre.framing.cut(photo, face_vectors(row.to_frame().T)[0]), f"{photo_key}:face{k}"


@st.cache_data(show_spinner="scoring faithfulness")
def faithfulness_for(run: str, folds: tuple, photo_key: str, _photo: np.ndarray, method: str, targets: tuple):
    _, models, pre = models_for(run, folds)
    _, grid = cams_for(run, folds, photo_key, _photo, method, targets)
    return photo_faithfulness(models, pre, _photo, grid)


def list_runs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if RunDir(p).is_run()), key=lambda p: p.stat().st_mtime,
                  reverse=True)


def read_upload(upload) -> np.ndarray | None:
    """The uploaded photo as RGB, or None after a friendly message."""
    if upload.size > MAX_UPLOAD_MB * 1024 * 1024:
        st.error(f"{upload.name} is {upload.size / 2**20:.1f} MB; the limit is {MAX_UPLOAD_MB} MB.")
        return None
    try:
        with Image.open(io.BytesIO(upload.getvalue())) as img:
            check_pixels(img)
            img.load()
            return to_rgb(img)
    except TooLarge as e:
        st.error(f"{upload.name}: {e}.")
        return None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        st.error(f"Could not read {upload.name} as an image ({type(e).__name__}). "
                 "Upload a JPEG, PNG, BMP, WebP or TIFF photo.")
        return None


def show_prediction(cfg, grid) -> None:
    heads = [h for h in cfg.heads if h.name in grid.probs]
    cols = st.columns(len(heads) + (1 if len(heads) > 1 else 0))
    for col, h in zip(cols, heads):
        p = grid.probs[h.name][0]
        col.markdown(f"**{h.name}**: {h.classes[int(p.argmax())]} ({p.max():.2f})")
        col.bar_chart(pd.DataFrame({"probability": p}, index=h.classes), height=160, horizontal=True)
        if h.prior == "training":
            col.caption("with the training photos' class frequencies (prior: training)")
    if len(heads) > 1:
        joint = joint_probabilities([grid.probs[h.name] for h in heads])[0]
        names = joint_class_names(heads)
        top = np.argsort(joint)[::-1][:3]
        cols[-1].markdown(f"**{len(names)}-class top 3**")
        cols[-1].dataframe(pd.DataFrame({"class": [int(i) for i in top], "label": [names[i] for i in top],
                                         "probability": [round(float(joint[i]), 3) for i in top]}),
                           hide_index=True)


def inspect(run: Path, folds: tuple, photo: np.ndarray, photo_key: str, key: str, framed: bool = False) -> None:
    """Photo, predictions and the CAM grid with its pickers; ``framed``: a face already cut out of its photo."""
    cfg, _, pre = models_for(str(run), folds)
    c1, c2, c3 = st.columns([2, 3, 2])
    method = c1.selectbox("CAM method", list(METHODS), key=f"{key}_method")
    opacity = c3.slider("CAM opacity", 0.0, 1.0, 0.5, 0.05, key=f"{key}_opacity")
    target_cols = c2.columns(len(cfg.heads))
    targets = {}
    for col, h in zip(target_cols, cfg.heads):
        choice = col.selectbox(f"{h.name} target", ["predicted"] + list(h.classes), key=f"{key}_t_{h.name}")
        if choice != "predicted":
            targets[h.name] = h.classes.index(choice)
    if method == "scorecam":
        st.caption("ScoreCAM runs one forward pass per channel: expect tens of seconds.")
    target_key = tuple(sorted(targets.items()))
    rgb, grid = cams_for(str(run), folds, photo_key, photo, method, target_key, framed)
    left, right = st.columns([1, 3])
    if cfg.data.face_crop in DETECTED and not framed:
        left.image(*face_box_view(pre, photo), width="stretch")
    left.image(rgb, caption="network input", width="stretch")
    with right:
        show_prediction(cfg, grid)
    layers = st.multiselect("layers", grid.layers, default=grid.layers, key=f"{key}_layers")
    st.markdown("**Grad-CAM grid** (rows: trunk layers, columns: heads; each head explains the class in its title)")
    header = st.columns(len(grid.heads) + 1)
    for col, head in zip(header[1:], grid.heads):
        h = cfg.head(head)
        cls = int(grid.targets[head][0])
        col.markdown(f"**{head}**: {h.classes[cls]} ({grid.probs[head][0, cls]:.2f})")
    for layer in layers:
        row = st.columns(len(grid.heads) + 1)
        row[0].markdown(f"`{layer}`")
        for col, head in zip(row[1:], grid.heads):
            col.image(overlay(rgb, grid.cams[layer][head][0], opacity), width="stretch")
    if st.checkbox("faithfulness of the deepest layer's CAMs", key=f"{key}_faith"):
        st.caption("confidence_change: how the explained class's probability changes when only the CAM-weighted "
                   "photo is shown (higher: the CAM kept what mattered). road: ROAD combined score, removing "
                   "the most and least relevant pixels (higher: more faithful). Averaged over the models shown.")
        st.dataframe(faithfulness_for(str(run), folds, photo_key, photo, method, target_key).round(4), hide_index=True)


def too_broad(root: Path, run: Path) -> bool:
    """A data root that would open most of the machine: the file system's root, the home folder or a folder
    holding either, or a folder holding the run itself (a crafted run.json or config.yaml must not widen the
    photos the page shows)."""
    home = Path.home().resolve()
    return root == Path(root.anchor) or home.is_relative_to(root) or run.resolve().is_relative_to(root)


@st.cache_data(ttl=60)
def linked_folders(root: str) -> list[str]:
    """The targets of folders linked into a data root (a subset made of symlinked person folders), two levels
    down: ROOT/<person> and ROOT/images/<person>."""
    out = []
    for parent in (Path(root), Path(root) / "images"):
        if parent.is_dir():
            out += [str(p.resolve()) for p in parent.iterdir() if p.is_symlink() and p.is_dir()]
    return out


def allowed_roots(run: Path, cfg) -> list[Path]:
    """Where this run's photos may come from: its data root(s), extra sets and caches, and the folders linked into
    them. Paths in a run's CSV files outside these are not opened (a crafted oof.csv must not show other files of
    the machine)."""
    roots = [RunDir(run).recorded().get("data_root"), cfg.data.root, cfg.data.cache_dir, *cfg.data.extra_unmasked,
             *cfg.data.extra_train, *cfg.data.extra_val]
    roots = [Path(r).resolve() for r in roots if r]
    roots = [r for r in roots if not too_broad(r, run)]
    return roots + [Path(t) for r in roots for t in linked_folders(str(r)) if not too_broad(Path(t), run)]


def open_photo(run: Path, cfg, path: str) -> np.ndarray | None:
    """A photo of the run, or None after saying why (moved, unreadable, or outside the run's data)."""
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(root) for root in allowed_roots(run, cfg)):
        st.error(f"{path} is outside this run's data folders; not shown.")
        return None
    try:
        return read_rgb(resolved)
    except FileNotFoundError:
        st.warning(f"{path} is missing (was the run copied from another machine, or the photos moved?).")
    except (OSError, ValueError) as e:
        st.error(f"Cannot read {path}: {e}")
    return None


def face_box_view(pre: Preprocessing, photo: np.ndarray) -> tuple[np.ndarray, str]:
    """The photo with the region the network is given drawn on it (data.face_crop=detector|aligned)."""
    corners, how = pre.framing.region(photo, photo)
    if corners is None:
        return photo, "no face found: the centre crop is used"
    shown = photo.copy()
    cv2.polylines(shown, [np.round(corners).astype(np.int32)], True, (255, 40, 40), max(2, photo.shape[1] // 150))
    return shown, ("detected face region" if how == "detected"
                   else "no face found: the run's typical face region for photos of this size")


def class_filters(table: pd.DataFrame, true: str, pred: str, names: list[str], what: str, cols, key: str
                  ) -> pd.DataFrame:
    """The rows whose true and predicted class (columns ``true`` and ``pred``, indices into ``names``) are among
    the ones picked, and only the misclassified ones when asked."""
    wanted = [cols[0].multiselect(f"true {what}", names, key=f"{key}_true"),
              cols[1].multiselect(f"predicted {what}", names, key=f"{key}_pred")]
    for column, classes in zip((true, pred), wanted):
        if classes:
            table = table[table[column].isin([names.index(c) for c in classes])]
    if cols[2].checkbox("only misclassified", key=f"{key}_wrong"):
        table = table[table[true] != table[pred]]
    return table


def chosen_photo(run: Path, cfg, table: pd.DataFrame, key: str) -> tuple[np.ndarray, str] | None:
    """(the photo, its path) the user picks among the rows of ``table``."""
    if table.empty:
        st.warning("No photo matches these filters.")
        return None
    path = st.selectbox(f"photo ({len(table)} match)", table["path"].tolist(),
                        format_func=lambda p: f"{Path(p).parent.name}/{Path(p).name}", key=f"{key}_pick")
    rgb = open_photo(run, cfg, path)
    return None if rgb is None else (rgb, path)


def extra_val_picker(run: Path, cfg, name: str, folds: tuple, key: str) -> tuple[np.ndarray, str] | None:
    """A photo of an extra validation set (data.extra_val), filtered by its true and predicted class of the head
    it is about (the one with an absent class: the mask)."""
    frames = [csv(RunDir(run).extra_val(k, name)) for k in folds]
    frames = [f for f in frames if f is not None]
    if not frames:
        st.info(f"{name} is scored when a fold finishes; no scores for the chosen model yet.")
        return None
    table = frames[0].copy()
    head = next((h for h in cfg.heads if h.absent is not None), None)
    if head is not None and true_column(head) in table:
        table[pred_column(head)] = np.mean([f[prob_columns(head)].to_numpy() for f in frames], axis=0).argmax(1)
        table = class_filters(table, true_column(head), pred_column(head), list(head.classes), head.name,
                              st.columns(3), key)
    return chosen_photo(run, cfg, table, key)


def photo_picker(run: Path, cfg, key: str) -> tuple[np.ndarray, str] | None:
    """A photo of the run, filtered by fold and by its true and predicted joint class (out-of-fold)."""
    oof = csv(RunDir(run).oof)
    data = csv(RunDir(run).data)
    table = oof if oof is not None else data
    if table is None:
        st.info("This run has no photos listed yet (data.csv / oof.csv appear as training goes).")
        return None
    if oof is not None and all(true_column(h) in oof for h in cfg.heads):
        table = oof.assign(true_class=joint_label(cfg.heads, {h.name: oof[true_column(h)] for h in cfg.heads}),
                           pred_class=joint_label(cfg.heads, {h.name: oof[pred_column(h)] for h in cfg.heads}))
        c = st.columns(4)
        folds = c[0].multiselect("fold", sorted(table["fold"].unique()), key=f"{key}_folds")
        if folds:
            table = table[table["fold"].isin(folds)]
        table = class_filters(table, "true_class", "pred_class", joint_class_names(cfg.heads), "class", c[1:], key)
    return chosen_photo(run, cfg, table, key)


def report_page(run: Path) -> None:
    report = RunDir(run).report_json
    if not report.exists():
        st.info("No report yet: it is written when the cross-validation finishes "
                "(or run `multitask report RUN_DIR`).")
        return
    r = read_json(report)
    keys = list(r["mean"])
    name = score_names(r)
    rows = [{"fold": k, **{f"{name(x)} F1": round(v[x]["f1_macro"], 4) for x in keys},
             **{f"{name(x)} acc": round(v[x]["accuracy"], 4) for x in keys}} for k, v in r["folds"].items()]
    rows.append({"fold": "mean ± std", **{f"{name(x)} F1": f"{r['mean'][x]['f1_macro']:.4f} ± "
                                                            f"{r['std'][x]['f1_macro']:.4f}" for x in keys},
                 **{f"{name(x)} acc": f"{r['mean'][x]['accuracy']:.4f}" for x in keys}})
    st.subheader("Macro-F1 and accuracy per fold")
    st.dataframe(pd.DataFrame(rows).astype(str), hide_index=True)
    subgroups = r.get("subgroups") or {}
    if subgroups:
        st.subheader("Subgroups (macro-F1 / accuracy; a dash where a group holds one true class of the head)")
        which = st.selectbox("subgroup", list(subgroups), key="report_subgroup")
        st.dataframe(subgroup_table(subgroups[which], name), hide_index=True)
    st.subheader("Per-class scores (all out-of-fold photos)")
    pick = st.selectbox("head", keys, format_func=name, key="report_head")
    st.dataframe(pd.DataFrame(r["pooled"][pick]["per_class"]).T)
    st.subheader("Confusion matrices")
    pngs = sorted(RunDir(run).plots.glob("confusion_*.png"))
    for col, png in zip(st.columns(max(1, len(pngs))), pngs):
        col.image(str(png), width="stretch")
    st.subheader("Learning curves")
    for png in sorted(RunDir(run).plots.glob("curves_*.png")):
        st.image(str(png))


def score_names(report: dict):
    """report.json's score key -> how the page calls it: a head's name, or the joint label's ('18-class')."""
    return lambda key: report["joint_name"] if key == JOINT else key


def headline(run: Path, cfg) -> None:
    """The run's scores at a glance: macro-F1 per head over the folds, and the masked sets never trained on."""
    path = RunDir(run).report_json
    if not path.exists():
        st.caption("No report yet: scores appear when the cross-validation finishes.")
        return
    r = read_json(path)
    name = score_names(r)
    keys = sorted(r["mean"], key=lambda k: k != JOINT)
    present = [h for h in cfg.heads if h.absent is not None]  # heads with an on vs absent accuracy
    extra = [(n, x, h) for n, x in (r.get("extra_val") or {}).items() for h in present if h.name in x["heads"]]
    cols = st.columns(len(keys) + len(extra))
    for col, k in zip(cols, keys):
        col.metric(f"{name(k)} macro-F1", f"{r['mean'][k]['f1_macro']:.3f}", help=f"± {r['std'][k]['f1_macro']:.3f} "
                   f"over {len(r['folds'])} fold(s), held-out persons")
    for col, (n, x, h) in zip(cols[len(keys):], extra):
        col.metric(f"{n}: {h.name} on vs {h.absent}", f"{x['ensemble'][h.name]['on_accuracy']:.3f}",
                   help=f"{x['photos']} photos never trained on (data.extra_val), fold ensemble")


def mistakes_page(run: Path, cfg, folds_available: tuple) -> None:
    oof = csv(RunDir(run).oof)
    if oof is None or not all(true_column(h) in oof for h in cfg.heads):
        st.info("No out-of-fold predictions yet.")
        return
    joint = joint_probabilities([oof[prob_columns(h)].to_numpy() for h in cfg.heads])
    true = joint_label(cfg.heads, {h.name: oof[true_column(h)] for h in cfg.heads})
    pred = joint.argmax(1)
    names = joint_class_names(cfg.heads)
    wrong = pd.DataFrame({"path": oof["path"], "fold": oof["fold"], "true": [names[i] for i in true],
                          "predicted": [names[i] for i in pred], "confidence": joint.max(1)})[true != pred]
    wrong = wrong.sort_values("confidence", ascending=False).head(25)
    st.subheader(f"Most confident mistakes ({int((true != pred).sum())} mistakes of {len(oof)} photos)")
    st.dataframe(wrong.assign(photo=[Path(p).parent.name + "/" + Path(p).name for p in wrong["path"]])
                 .drop(columns="path"), hide_index=True)
    if wrong.empty:
        return
    path = st.selectbox("show the CAMs of", wrong["path"].tolist(),
                        format_func=lambda p: f"{Path(p).parent.name}/{Path(p).name}", key="mistake_pick")
    row = wrong[wrong["path"] == path].iloc[0]
    fold = int(row["fold"])
    st.caption(f"true {row['true']}, predicted {row['predicted']} ({row['confidence']:.2f}). Explained by the model "
               f"of fold {fold}, which never saw this photo (the other folds' models trained on it).")
    rgb = open_photo(run, cfg, path)
    if rgb is not None and fold in folds_available:
        inspect(run, (fold,), rgb, path, "mistake")


def main() -> None:
    st.title("multitask inspector")
    root = Path(os.environ.get("MULTITASK_RUNS", "runs"))  # fixed at start: the page cannot browse elsewhere
    st.sidebar.caption(f"runs folder: {root.name or root}/ (MULTITASK_RUNS, set before starting)")
    runs = list_runs(root)
    damaged = sorted(p.name for p in root.iterdir() if RunDir(p).is_damaged_run()) if root.is_dir() else []
    if damaged:
        st.warning(f"Not shown, {RunDir(root).config.name} missing: {', '.join(damaged)} (in {root.resolve()}).")
    if not runs:
        st.info(f"No {'other ' if damaged else ''}runs in {root.resolve()}. Train one with `multitask train`.")
        return
    run = st.sidebar.selectbox("run", runs, format_func=lambda p: p.name)
    try:
        show_run(run)
    except (ConfigError, WeightsError, DataError) as e:  # a damaged run folder: say which file, keep the page
        st.error(f"{run.name} cannot be shown: {e}")


def show_run(run: Path) -> None:
    cfg = RunDir(run).load_config()
    have = RunDir(run).trained_folds(cfg)
    if not have:
        st.info(f"{run.name} has no trained fold yet.")
        report_page(run)
        return
    choice = st.sidebar.selectbox("model", ["ensemble of folds"] + [f"fold {k}" for k in have])
    folds = tuple(have) if choice.startswith("ensemble") else (int(choice.split()[1]),)
    shown = (f"the ensemble of folds {', '.join(map(str, folds))} (mean probabilities and CAMs)" if len(folds) > 1
             else f"the model of fold {folds[0]}")
    st.sidebar.caption(f"Shown: {shown}.")
    headline(run, cfg)
    st.sidebar.caption(f"{cfg.model.arch}, {cfg.data.size[0]}x{cfg.data.size[1]} px, heads: "
                       + ", ".join(h.name + (" (prior: training)" if h.prior == "training" else "")
                                   for h in cfg.heads))
    photo_tab, report_tab, mistakes_tab = st.tabs(["Inspect a photo", "Report", "Mistakes"])
    with photo_tab:
        extra_sets = extra_val_names(cfg.data)
        source = st.radio("photo", [HELD_OUT, "upload", "camera"] + [f"extra validation: {n}" for n in extra_sets],
                          horizontal=True)
        picked = None
        if source.startswith("extra validation: "):
            picked = extra_val_picker(run, cfg, source.split(": ", 1)[1], folds, "extra")
        elif source in ("upload", "camera"):
            upload = (st.file_uploader(f"a photo (up to {MAX_UPLOAD_MB} MB)",
                                       type=["jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff"])
                      if source == "upload" else st.camera_input("your face, in the middle of the picture"))
            if upload is not None:
                rgb = read_upload(upload)
                picked = (rgb, f"upload:{upload.file_id}") if rgb is not None else None
                if picked is not None and default_faces(cfg) == "all":
                    face = pick_face(run, folds, *picked)
                    if face is not None:
                        st.caption(f"Explained by {shown}.")
                        inspect(run, folds, *face, "photo", framed=True)
                    picked = None
        else:
            picked = photo_picker(run, cfg, "data")
            if picked is not None and len(folds) > 1:
                st.caption("The ensemble's other folds trained on this photo: pick its own fold's model in the "
                           "sidebar (or see the Mistakes tab) for what a model that never saw it makes of it.")
        if picked is not None:
            st.caption(f"Explained by {shown}.")
            inspect(run, folds, picked[0], picked[1], "photo")
    with report_tab:
        report_page(run)
    with mistakes_tab:
        mistakes_page(run, cfg, tuple(have))


main()

"""The Python API: a trained run (or several) as one object that predicts, explains and exports.

    from multitask import load_run
    model = load_run("runs/faces-20261205-101500")          # every trained fold; folds=[0] for one model
    table = model.predict(["a.jpg", pil_image, rgb_array])  # the table `multitask predict` writes
    photo, grid = model.explain("a.jpg")                    # CAMs: grid.cams[layer][head] is 1 x H x W
    model.export("exported/", format="onnx")                # a graph that returns probabilities

The ``multitask predict``, ``explain`` and ``export`` commands are thin shells around this object, so the API
and the commands give the same numbers.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from PIL import Image

from multitask.config import ENSEMBLES, FACES, Config, ConfigError, check_ranges
from multitask.data.images import read_rgb
from multitask.data.photoset import photo_set
from multitask.data.sources import DataError, Problem
from multitask.data.transforms import Preprocessing
from multitask.engine import Runtime, loader_workers, predict_views, resolve_device
from multitask.inference import PREDICTED, cut_faces, default_faces, face_table, face_vectors, merge_predictions
from multitask.model import MultiHeadNet
from multitask.run import Member, RunDir, check_same_classes, final_heads, prediction_frame
from multitask.tasks import joint_class_names, joint_label

Photo = Union[str, Path, np.ndarray, Image.Image]  # a file, a PIL image or an RGB array


@dataclass
class FramedPhotos:
    """Photos as every member prepares them (decode, face region, resize), with the ones that failed."""

    images: List[Optional[np.ndarray]]  # per member: N x H x W x 3 uint8 (rows of unreadable photos: zeros)
    unreadable: List[Problem]
    face_found: Optional[np.ndarray]  # face_crop=detector|aligned: whether each photo's face was found; else None


def with_priors(cfg: Config, priors: Sequence[tuple[str, str]], run: RunDir) -> Config:
    """``cfg`` with (head, balanced | training) pairs replacing its heads' ``prior``."""
    for head, prior in priors:
        if cfg.head(head) is None:
            raise ConfigError(f"--prior {head}={prior}: {run.root} has no head {head!r} (heads: "
                              f"{', '.join(h.name for h in cfg.heads)})")
        cfg.head(head).prior = prior
    check_ranges(cfg)  # e.g. training on a head without class weights
    return cfg


def ensemble(per_run: Sequence[Dict[int, Dict[str, np.ndarray]]], how: str = "mean") -> tuple[dict, dict]:
    """(probabilities per head, predicted class per head) of runs' fold predictions (one dict fold -> head ->
    probabilities per run). Probabilities: ``mean_of_runs``. ``vote``: the majority of every fold model's class,
    ties broken by those probabilities."""
    probs = mean_of_runs(per_run)
    if how == "mean":
        return probs, {h: p.argmax(1) for h, p in probs.items()}
    preds = {}
    for h, p in probs.items():
        votes = sum(np.eye(p.shape[1])[f[h].argmax(1)] for folds in per_run for f in folds.values())
        preds[h] = (votes + p * 1e-3).argmax(1)
    return probs, preds


def mean_of_runs(per_run: Sequence[Dict[int, Dict[str, np.ndarray]]]) -> Dict[str, np.ndarray]:
    """Per head: the mean of the runs' fold means, over the runs that have that head (class probabilities: every
    run; predicted values: the runs whose head predicts them), so each run counts once however many folds it has."""
    means = [{h: np.mean([f[h] for f in folds.values()], axis=0) for h in next(iter(folds.values()))}
             for folds in per_run]
    return {h: np.mean([m[h] for m in means if h in m], axis=0) for h in dict.fromkeys(h for m in means for h in m)}


def predict_arrays(models: Dict[int, MultiHeadNet], images: np.ndarray, cfg: Config, device: torch.device,
                   views: Sequence[tuple], batch_size: int = 128, progress: bool = False
                   ) -> Dict[int, tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]]:
    """Per fold: (per head the class probabilities, per head that predicts them the values) of prepared photos
    (N x H x W x 3 uint8), averaged over views."""
    rt, pre = Runtime.on(device, cfg), Preprocessing.from_config(cfg)
    workers = loader_workers(cfg.data.workers, device, True)
    return {k: predict_views(model, images, pre, views, rt, batch_size, workers, progress, desc=f"fold {k}")
            for k, model in models.items()}


def predictions_frame(cfg: Config, table: pd.DataFrame, probs: dict, preds: dict, values: dict) -> pd.DataFrame:
    """predictions.csv: the input's rows, the run's prediction columns (true classes where the input has
    labels; values where a head predicts them), each head's class name, and the joint label (the competition's
    18-class ``ans``)."""
    heads = [h for h in cfg.heads if h.name in probs]
    targets = {h.name: table[h.column].astype(np.int64).to_numpy() for h in heads if h.column in table.columns
               and table[h.column].notna().all() and (table[h.column].astype(np.int64) >= 0).all()}
    df = prediction_frame(heads, table, probs, preds, targets, values)
    for h in heads:
        df[h.name + "_class"] = [h.classes[i] for i in preds[h.name]]
    df["label"] = joint_label(heads, preds)
    df["label_name"] = [joint_class_names(heads)[i] for i in df["label"]]
    df["label_prob"] = np.prod([probs[h.name][np.arange(len(df)), preds[h.name]] for h in heads], axis=0)
    return df


ACCEPTED = "a photo is a file path, a PIL image or an RGB array (H x W x 3, or H x W grey; uint8, or floats in [0, 1])"


def rgb_array(photo, name: str = "<photo>") -> np.ndarray:
    """A PIL image or an array (H x W x 3 RGB, or H x W grey; uint8, or float in [0, 1]) as H x W x 3 uint8; a
    DataError naming the photo (``name``) for anything else."""
    if isinstance(photo, Image.Image):
        photo = np.asarray(photo.convert("RGB"))
    if not isinstance(photo, np.ndarray):
        raise DataError([Problem(name, f"got {type(photo).__name__}; {ACCEPTED}")], "the photo")
    a = photo
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or 0 in a.shape or a.dtype.kind not in "uif":
        raise DataError([Problem(name, f"got an array of shape {photo.shape} and type {a.dtype}; {ACCEPTED}")],
                        "the photo")
    if a.dtype != np.uint8:
        a = np.clip(a * (255 if a.dtype.kind == "f" and a.max() <= 1 else 1), 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(a[:, :, :3])


def photo_rgb(photo: Photo, name: str) -> np.ndarray:
    """Any ``Photo`` as H x W x 3 uint8; a DataError naming it (``name``) when it cannot be one."""
    if isinstance(photo, (str, Path)):
        try:
            return read_rgb(Path(photo))
        except Exception as e:  # any decoder or file error is this photo's problem
            raise DataError([Problem(name, f"unreadable image ({type(e).__name__}: {e})")], "the photo") from None
    return rgb_array(photo, name)


class Predictor:
    """The trained fold models of one or more runs, predicting as ``multitask predict`` does: each run's fold
    ensemble over its test-time views, each run counting once."""

    def __init__(self, members: Sequence[Member], device: torch.device, how: str = "mean", batch_size: int = 128):
        if how not in ENSEMBLES:
            raise ConfigError(f"ensemble {how!r}: must be mean or vote")
        if batch_size < 1:
            raise ConfigError(f"batch size {batch_size}: must be at least 1")
        self.members, self.device, self.how, self.batch_size = list(members), device, how, batch_size
        self.seconds: Dict[str, float] = {}  # wall time per step over all calls: faces, framing, network

    @contextmanager
    def timed(self, step: str):
        tick = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - tick

    @property
    def cfg(self) -> Config:
        """The first run's config: its heads and classes are every run's."""
        return self.members[0].cfg

    @property
    def heads(self):
        """The heads the runs' models predict."""
        return final_heads(self.cfg)

    def describe(self) -> str:
        """Which models predict, e.g. "faces-...: folds [0, 1, 2] x 2 view(s)"."""
        return "; ".join(m.describe() for m in self.members)

    # --- photos -> prepared arrays ---------------------------------------------------------------------------

    def frame_files(self, paths: List[str]) -> FramedPhotos:
        """Photo files as each run prepares them, through the run's image cache (``data.cache_dir``) and, under
        ``face_crop=detector|aligned``, its cached faces."""
        images, unreadable, face_found = [], {}, None
        for m in self.members:
            photos = photo_set(m.cfg, pd.DataFrame({"path": paths}), lambda s: None, m.run.typical_face_boxes(),
                               cache=True, timed=self.timed)
            images.append(photos.images)
            unreadable.update({p.path: p for p in photos.unreadable})
            if face_found is None and "face_found" in photos.table:
                face_found = photos.table["face_found"].to_numpy()
        return FramedPhotos(images, list(unreadable.values()), face_found)

    def read_photos(self, photos: Sequence[Photo]) -> tuple[List[np.ndarray], List[str]]:
        """(the photos as H x W x 3 uint8, a name per photo) of files, PIL images and arrays; an unreadable one is a
        DataError naming it."""
        if not photos:
            raise DataError([Problem("photos", f"none given; {ACCEPTED}")], "the photos to predict")
        names = [os.path.abspath(p) if isinstance(p, (str, Path)) else f"<image {i}>" for i, p in enumerate(photos)]
        rgbs, problems = [], []
        for photo, name in zip(photos, names):
            try:
                rgbs.append(photo_rgb(photo, name))
            except DataError as e:
                problems += e.problems
        if problems:
            raise DataError(problems, "the photos to predict")
        return rgbs, names

    def frame_photos(self, photos: Sequence[Photo]) -> tuple[List[np.ndarray], List[str]]:
        """(per member the prepared photos, a name per photo) of files, PIL images and arrays, no cache; an
        unreadable file is a DataError naming it."""
        rgbs, names = self.read_photos(photos)
        with self.timed("framing"):
            return [np.stack([m.pre.framing(rgb) for rgb in rgbs]) for m in self.members], names

    # --- prepared arrays -> the table ------------------------------------------------------------------------

    def predict_framed(self, images: Sequence[np.ndarray], table: pd.DataFrame, progress: bool = False
                         ) -> pd.DataFrame:
        """The prediction table of prepared photos (per member, in ``table``'s order)."""
        with self.timed("network"):
            per_run = [predict_arrays(m.models, arr, m.cfg, self.device, m.views, self.batch_size, progress)
                       for m, arr in zip(self.members, images)]
        probs, preds = ensemble([{k: p for k, (p, _) in folds.items()} for folds in per_run], self.how)
        values = mean_of_runs([{k: y for k, (_, y) in folds.items()} for folds in per_run])
        return predictions_frame(self.cfg, table, probs, preds, values)

    def predict_faces(self, rgbs: Sequence[np.ndarray], names: Sequence[str], progress: bool = False
                      ) -> pd.DataFrame:
        """One row per face of each photo (``inference``: the box, the detector's score and landmarks, then the
        prediction columns), or one ``no_face`` row per photo without any; every face of these photos goes
        through each model in one batch."""
        from multitask.data.faces import detect_all

        with self.timed("faces"):
            table = face_table(names, detect_all(rgbs), self.cfg.predict.min_face)
        todo = table[table["face_status"] == PREDICTED]
        photo_of_row = pd.Series(range(len(names)), index=list(names)).groupby(level=0).first()[todo["path"]]
        with self.timed("cut"):
            crops = [cut_faces(m.pre.framing, rgbs, photo_of_row.to_numpy(), face_vectors(todo))
                     for m in self.members]
        predicted = (self.predict_framed(crops, todo[["path", "face"]], progress) if len(todo)
                     else self.no_predictions())
        return merge_predictions(table, predicted)

    def no_predictions(self) -> pd.DataFrame:
        """The prediction table of no photo: its columns, for rows that have none."""
        value_heads = {h for m in self.members for model in m.models.values() for h in model.value_heads}
        probs = {h.name: np.zeros((0, len(h.classes))) for h in self.heads}
        preds = {h: p.argmax(1) for h, p in probs.items()}
        return predictions_frame(self.cfg, pd.DataFrame({"path": []}), probs, preds,
                                 {h: np.zeros(0) for h in value_heads})

    def predict(self, photos: Union[Photo, Sequence[Photo]], faces: Optional[str] = None,
                progress: bool = False) -> pd.DataFrame:
        """The columns of ``multitask predict``'s predictions.csv (``p_<head>_<class>``, ``pred_<head>``,
        ``<head>_class``, ``value_<head>``, ``label``) for photos (file paths, PIL images or RGB arrays).
        ``faces``: ``all``: a row per face found (``inference``: box, landmarks, ``face_status``); ``largest``: a
        row per photo, framed as the run framed its training photos; default: ``all`` for runs that frame photos by
        their detected face, else ``largest``."""
        if isinstance(photos, (str, Path, np.ndarray, Image.Image)):
            photos = [photos]
        faces = faces or default_faces(self.cfg)
        if faces not in FACES:
            raise ConfigError(f"faces={faces!r}: must be " + " or ".join(FACES))
        if faces == "all":
            rgbs, names = self.read_photos(list(photos))
            return self.predict_faces(rgbs, names, progress)
        images, names = self.frame_photos(list(photos))
        return self.predict_framed(images, pd.DataFrame({"path": names}), progress)

    # --- CAMs and export -------------------------------------------------------------------------------------

    def explain(self, photo: Photo, method: str = "gradcam", targets: Optional[Dict[str, str]] = None,
                layers: Optional[Sequence[str]] = None, face: Optional[int] = None):
        """(the photo as the network sees it, H x W x 3 floats in [0, 1]; its ``CamGrid``): every trunk layer x
        every head, from the first run's fold models (their mean where there are several). ``targets``: a class
        to explain per head instead of the predicted one, e.g. {"mask": "incorrect"}. ``face``: explain this face
        of the photo (its ``face`` number in ``predict(..., faces="all")``) instead of the photo as framed in
        training."""
        from multitask.data.faces import detect_all
        from multitask.explain import explain_photo, parse_targets

        m = self.members[0]
        name = str(photo) if isinstance(photo, (str, Path)) else "<image>"
        rgb = photo_rgb(photo, name)
        wanted = parse_targets([f"{h}={c}" for h, c in (targets or {}).items()], m.cfg)
        if face is None:
            return explain_photo(m.models, m.pre, rgb, method, wanted or None, layers)
        found = detect_all([rgb])[0]
        if not 0 <= face < len(found):
            raise DataError([Problem(name, f"has {len(found)} face(s) the detector keeps; face {face} asked for")],
                            "the face to explain")
        crop = m.pre.framing.cut(rgb, found[face].vector)
        return explain_photo(m.models, m.pre, crop, method, wanted or None, layers, framed=True)

    def export(self, out: Path, format: str = "onnx", overwrite: bool = False) -> Path:
        """The first run's fold models as one graph that returns probabilities, and ``preprocessing.json``
        beside it (see ``multitask.export``); returns the model file."""
        from multitask.export import export_member

        return export_member(self.members[0], Path(out), format, overwrite)


def load_run(run_dirs: Union[str, Path, Sequence[Union[str, Path]]], folds: Optional[Sequence[int]] = None,
             device: Optional[str] = None, ensemble: Optional[str] = None, tta_flip: Optional[bool] = None,
             priors: Sequence[tuple[str, str]] = (), batch_size: int = 128) -> Predictor:
    """A ``Predictor`` over the trained folds (``folds``: only these) of one run directory or several (averaged,
    each run counting once; they must predict the same classes). ``device``: the run's ``train.device`` unless
    given; ``ensemble`` (mean | vote) and ``tta_flip``: the run's ``predict`` section unless given; ``priors``:
    (head, balanced | training) pairs replacing the runs' ``heads[i].prior``."""
    runs = [RunDir(r) for r in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    if not runs:
        raise ConfigError("load_run: no run directory given")
    cfgs = [with_priors(run.load_config(), priors, run) for run in runs]
    check_same_classes(runs, cfgs)
    dev = resolve_device(device or cfgs[0].train.device)
    members = [Member(run, cfg, run.load_models(cfg, folds, dev), run.preprocessing(cfg), cfg.predict.views(tta_flip))
               for run, cfg in zip(runs, cfgs)]
    return Predictor(members, dev, ensemble or cfgs[0].predict.ensemble, batch_size)

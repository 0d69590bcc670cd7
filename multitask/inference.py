"""Every face of a photo, one row each: found by the detector, cut out as the run frames its faces, and all the
faces of a photo (and of several photos) sent through the models in one batch.

Used for photos of scenes (``--faces all``): predict (photos, folders, video frames), the Python API and the
dashboard. Training portraits keep one labeled face per photo (``--faces largest``: the photo framed as in
training), so the competition's layouts, their scores and the submission file never pass through here.

A face's row: ``face`` (0 = the largest), ``face_status`` (``predicted``; ``too_small``: narrower than
``predict.min_face``, listed with its box and not classified; ``no_face``: the one row of a photo where the
detector found none), the box ``x0, y0, x1, y1`` in the photo's pixels, ``face_score`` (the detector's), the five
landmarks (``left_eye_x`` ...), then the prediction columns of ``predictions.csv``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from multitask.config import Config
from multitask.data.faces import LANDMARKS, Face
from multitask.data.transforms import DETECTED, FaceFraming

PREDICTED, TOO_SMALL, NO_FACE = "predicted", "too_small", "no_face"
BOX = ["x0", "y0", "x1", "y1"]
FACE_COLUMNS = ["face", "face_status", *BOX, "face_score", *[f"{n}_{a}" for n in LANDMARKS for a in "xy"]]


def default_faces(cfg: Config) -> str:
    """``all`` for a run that frames photos by their detected face (it has learned faces as the detector cuts
    them); ``largest`` for one that learned whole portraits (centre crop or whole photo), whose framing of a photo
    is what it knows."""
    return "all" if cfg.data.face_crop in DETECTED else "largest"


def face_table(names: Sequence[str], found: Sequence[Sequence[Face]], min_face: int) -> pd.DataFrame:
    """One row per face of each photo (``names[i]``'s faces ``found[i]``, largest first), or one ``no_face`` row
    for a photo without any: ``path`` + FACE_COLUMNS (no predictions yet)."""
    rows = []
    for name, faces in zip(names, found):
        if not faces:
            rows.append({"path": name, "face": -1, "face_status": NO_FACE})
        for k, face in enumerate(faces):
            status = PREDICTED if face.width >= min_face else TOO_SMALL
            rows.append({"path": name, "face": k, "face_status": status,
                         **dict(zip(BOX, np.round(face.box, 1))), "face_score": round(face.score, 4),
                         **dict(zip(FACE_COLUMNS[7:], np.round(face.landmarks.ravel(), 1)))})
    return pd.DataFrame(rows, columns=["path", *FACE_COLUMNS]).astype({"face": int})


def face_vectors(table: pd.DataFrame) -> np.ndarray:
    """The faces of ``face_table`` rows as ``FaceFraming.cut`` takes them (box, then landmarks), N x 14."""
    return table[BOX + FACE_COLUMNS[7:]].to_numpy(dtype=np.float64)


def cut_faces(framing: FaceFraming, rgbs: Sequence[np.ndarray], photo_of_row: Sequence[int],
              faces: np.ndarray) -> np.ndarray:
    """Each face (a row of ``face_vectors``) cut from its photo (``rgbs[photo_of_row[i]]``) as ``framing`` frames
    faces: N x H x W x 3 uint8 at the run's load size."""
    if not len(faces):
        return np.zeros((0, *framing.size, 3), np.uint8)
    return np.stack([framing.cut(rgbs[p], face) for p, face in zip(photo_of_row, faces)])


def merge_predictions(table: pd.DataFrame, predicted: pd.DataFrame) -> pd.DataFrame:
    """``face_table`` rows with the prediction columns of its ``predicted`` rows (in the same order as
    ``table[table.face_status == PREDICTED]``); other rows get none (empty cells)."""
    out = table.reset_index(drop=True)
    rows = np.flatnonzero((out["face_status"] == PREDICTED).to_numpy())
    extra = predicted[[c for c in predicted.columns if c not in out.columns]]
    return out.join(extra.set_axis(rows))

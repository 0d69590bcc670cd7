"""Face boxes and five landmarks from an offline detector (MTCNN), found once and cached.

MTCNN comes from ``facenet-pytorch``, whose wheel ships the detector's weights (MIT licence); that package pins an
old torch, so it is installed without its dependencies (``pip install --no-deps facenet-pytorch==2.6.0``; the
Makefile does it). Why MTCNN: it finds real masked faces where a HOG detector mostly does not, unmasked faces
all but always, in tens of milliseconds a photo on a CPU (docs/real-masks.md has the comparison).

Settings for masked faces: a mask lowers the score of every MTCNN stage, so the three stages run at 0.5 instead
of MTCNN's defaults (0.6, 0.7, 0.7) and a box is kept from score 0.8 instead of 0.9; lower kept scores add
boxes around the eyes only.

Landmarks are (x, y) in the photo's pixels, in MTCNN's order: left eye, right eye, nose tip, left and right
mouth corner ("left" as seen in the photo). Used by the face crop (``data.face_crop=detector``) and by the mask
painter (``multitask data paint-masks``).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import pandas as pd

from multitask.data.images import files_key, read_rgb
from multitask.io import atomic_to_csv
from multitask.parallel import on_every_core

LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
COLUMNS = ["found", "score", "width", "height", "x0", "y0", "x1", "y1"] + [f"{n}_{a}" for n in LANDMARKS for a in "xy"]
MIN_SIDE = 160  # small crops are enlarged to this before detection: MTCNN misses faces under ~40 px
STAGE_THRESHOLDS = (0.5, 0.5, 0.5)  # MTCNN's proposal, refine and output stages; a mask lowers every stage's score
MIN_SCORE = 0.8


class DetectorMissing(RuntimeError):
    """The detector package is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Face:
    box: np.ndarray  # x0, y0, x1, y1
    landmarks: np.ndarray  # 5 x 2, LANDMARKS order
    score: float

    @property
    def vector(self) -> np.ndarray:
        """Box, then the landmarks (x, y) x 5: what ``FaceFraming.cut`` frames a face by."""
        return np.concatenate([self.box, self.landmarks.ravel()])

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])


_detectors: dict = {}
# The smallest face (pixels) the detector looks for in photos of scenes: MTCNN's image pyramid starts at
# 12 / SCENE_MIN_FACE, so a smaller value finds smaller faces at a higher cost. Training portraits use 40.
SCENE_MIN_FACE = 20
PORTRAIT_MIN_FACE = 40
# Photos whose longer side is above this are scaled down before detection (boxes mapped back): the time of the
# pyramid grows with the pixels, and a face of 20 px in such a photo is too small to classify anyway.
DETECT_MAX_SIDE = 1920


def detector(min_face: int = PORTRAIT_MIN_FACE):
    """The MTCNN detector for faces of at least ``min_face`` pixels, built once per process (CPU; weights from the
    installed wheel, never downloaded)."""
    if min_face not in _detectors:
        try:
            from facenet_pytorch import MTCNN
        except ImportError as e:
            raise DetectorMissing("the face detector needs facenet-pytorch: pip install --no-deps "
                                  "facenet-pytorch==2.6.0 (its weights ship in the wheel)") from e
        _detectors[min_face] = MTCNN(keep_all=True, device="cpu", min_face_size=min_face,
                                     thresholds=list(STAGE_THRESHOLDS))
    return _detectors[min_face]


def detect(rgb: np.ndarray) -> Optional[Face]:
    """The most prominent face of an RGB photo (largest confident box), or None."""
    return detect_many([rgb])[0]


def detect_many(rgbs: Sequence[np.ndarray]) -> list[Optional[Face]]:
    """``detect`` for several photos (training portraits: the largest face of each)."""
    return [faces[0] if faces else None for faces in detect_all(rgbs, PORTRAIT_MIN_FACE)]


def detect_all(rgbs: Sequence[np.ndarray], min_face: int = SCENE_MIN_FACE) -> list[list[Face]]:
    """Every confident face of each photo, largest first. Photos of one size go through the detector as one batch,
    which shares its per-call work (the image pyramid, one network call per scale) between them."""
    inputs = [detector_input(rgb) for rgb in rgbs]
    faces: list[list[Face]] = [[] for _ in rgbs]
    for shape in dict.fromkeys(img.shape for img, _, _ in inputs):
        same = [i for i, (img, _, _) in enumerate(inputs) if img.shape == shape]
        boxes, probs, points = detector(min_face).detect([inputs[i][0] for i in same], landmarks=True)
        for k, i in enumerate(same):
            faces[i] = confident_faces(boxes[k], probs[k], points[k], *inputs[i][1:])
    return faces


def detector_input(rgb: np.ndarray) -> tuple[np.ndarray, float, int]:
    """(the photo as the detector gets it, its scale, its padding): small photos enlarged, large ones reduced, a
    border added."""
    h, w = rgb.shape[:2]
    scale = max(1.0, MIN_SIDE / max(h, w)) if max(h, w) <= DETECT_MAX_SIDE else DETECT_MAX_SIDE / max(h, w)
    img = rgb if scale == 1 else cv2.resize(rgb, (round(w * scale), round(h * scale)),
                                            interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    pad = img.shape[0] // 4  # a face filling the whole photo is missed without some surround
    return cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_REPLICATE), scale, pad


def confident_faces(boxes, probs, points, scale: float, pad: int) -> list[Face]:
    """The detector's confident boxes for one photo, largest first, in the photo's pixels."""
    if boxes is None:
        return []
    keep = [i for i in range(len(boxes)) if probs[i] >= MIN_SCORE]
    keep.sort(key=lambda i: -(boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1]))
    unmap = lambda a: (np.asarray(a, dtype=np.float64) - pad) / scale  # noqa: E731
    return [Face(unmap(boxes[i]), unmap(points[i]).reshape(5, 2), float(probs[i])) for i in keep]


def face_row(face: Optional[Face], shape=(np.nan, np.nan)) -> dict:
    """A ``find_faces`` row (without the path) for a photo of ``shape`` (height, width, ...)."""
    h, w = shape[:2]
    if face is None:
        return dict(zip(COLUMNS, [False, np.nan, w, h] + [np.nan] * (len(COLUMNS) - 4)))
    return dict(zip(COLUMNS, [True, face.score, w, h, *face.box, *face.landmarks.ravel()]))


def content_key(path: str) -> str:
    """What the box cache knows a photo by: a hash of its bytes ("missing" if unreadable)."""
    try:
        with open(path, "rb") as f:
            return hashlib.blake2b(f.read(), digest_size=16).hexdigest()
    except OSError:
        return "missing"


CHUNK = 256  # photos per detection job
SAVE_EVERY = 16  # jobs between saves of the box cache: a killed run keeps what it found


def one_thread() -> None:
    """Worker start: one detector per process, each on its own core."""
    import torch

    torch.set_num_threads(1)


DETECT_BATCH = 16  # photos per detector call


def readable_rgb(path: str) -> Optional[np.ndarray]:
    """The photo, or None when it cannot be read (the image loader reports it)."""
    try:
        return read_rgb(path)
    except (OSError, ValueError):
        return None


def detect_files(paths: Sequence[str]) -> list[dict]:
    rows = []
    for start in range(0, len(paths), DETECT_BATCH):
        rgbs = [readable_rgb(p) for p in paths[start:start + DETECT_BATCH]]
        faces = iter(detect_many([rgb for rgb in rgbs if rgb is not None]))
        rows += [face_row(None) if rgb is None else face_row(next(faces), rgb.shape) for rgb in rgbs]
    return rows


def find_faces(paths: Sequence[str], cache_dir: Path, log: Callable[[str], None] = print) -> pd.DataFrame:
    """One row per path (``path`` + COLUMNS), each photo detected once: boxes are cached per photo content in
    ``cache_dir/faces-<detector settings>.csv``, so any set of photos reuses the boxes of any earlier one, and so
    does a copy of the data elsewhere (a cluster's scratch disk, a fresh download): detection costs ~15 ms a photo
    on a CPU, hashing ~0.05. New photos are detected on every core and the cache is saved as it grows, with the
    time left in the log. Unreadable files get ``found`` False; they are reported by the image loader."""
    paths = list(paths)
    settings = ('mtcnn-v2', STAGE_THRESHOLDS, MIN_SCORE, 'content', DETECT_MAX_SIDE)
    cache = Path(cache_dir) / f"faces-{files_key([], repr(settings))}.csv"
    keys = pd.DataFrame({"key": [content_key(p) for p in paths]})
    known = (pd.read_csv(cache, dtype={"key": str}).drop_duplicates("key", keep="last") if cache.exists()
             else pd.DataFrame(columns=["key"] + COLUMNS))
    new = keys.loc[~keys["key"].isin(known["key"]), "key"].drop_duplicates()  # a photo twice in the set: once
    if len(new):
        log(f"finding faces in {len(new)} of {len(paths)} photos (the others cached; boxes kept in {cache})")
        known = detect_new(new, [paths[i] for i in new.index], cache, known, log)
    table = keys.merge(known, on="key", how="left")[COLUMNS].assign(path=paths)
    table = table[["path"] + COLUMNS]
    return table.astype({"found": bool}).astype({c: float for c in COLUMNS if c != "found"})


def detect_new(keys: pd.Series, paths: list[str], cache: Path, known: pd.DataFrame,
               log: Callable[[str], None]) -> pd.DataFrame:
    """``known`` (key + COLUMNS) with the rows of photos not in it (new keys only: still one row per key), detected
    in jobs of CHUNK photos on every core; the cache is saved every SAVE_EVERY jobs and at the end."""
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    rows, start = [], time.perf_counter()
    for k, chunk_rows in enumerate(on_every_core(detect_files, chunks, initializer=one_thread), 1):
        rows += chunk_rows
        if k % SAVE_EVERY == 0 or k == len(chunks):
            found = pd.DataFrame(rows, columns=COLUMNS).assign(key=keys.to_numpy()[:len(rows)])
            grown = pd.concat([known, found[["key"] + COLUMNS]], ignore_index=True)
            atomic_to_csv(grown, cache)
            if k < len(chunks):
                left = (time.perf_counter() - start) / len(rows) * (len(paths) - len(rows)) / 60
                log(f"faces: {len(rows)} of {len(paths)} photos done, ~{left:.1f} min left")
    return grown

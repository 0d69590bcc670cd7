"""Scenes: several faces of known labels on one background, to measure every-face prediction.

``multitask data synth OUT --scenes N``: N photos (``images/scene_00000.jpg`` ...) with 1 to 20 faces each (or
the counts ``--faces`` names), each face pasted at 24 to 200 pixels wide, some overlapping (a later face covers
an earlier one), some cut by the frame's edge. ``faces.csv``: one row per face: its scene, its box and landmarks in
the scene's pixels, its labels (the competition's codes: mask, gender, age, age_group), how much of it is covered
by later faces or outside the frame, and ``portrait``: the photo it was cut from, which predicted alone gives
the same face's single-portrait answer.

The faces are drawn synthetic persons (``synth.draw_photo``, their portraits saved under ``portraits/``), or
the photos of a labeled folder in the competition layout (``--faces-from``: its boxes from the face detector,
cached in ``--cache-dir``; photos without a found face are not used).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
import pandas as pd

from multitask.data.faces import LANDMARKS
from multitask.data.images import read_rgb
from multitask.data.sources import COMPETITION_MASK, COMPETITION_PHOTOS, load_source
from multitask.data.transforms import crop_box
from multitask.io import errors_named
from multitask.tasks import FACE_AGE_THRESHOLDS, cut

FACE_WIDTHS = (24, 200)  # pixels, the face box's width in a scene (drawn log-uniformly)
FACE_COUNTS = tuple(range(1, 21))
SURROUND = 0.6  # of the face box's size, pasted with the face on each side (hair, ears, a mask's loops)
BOX = ["x0", "y0", "x1", "y1"]
MARKS = [f"{n}_{a}" for n in LANDMARKS for a in "xy"]
PORTRAIT = (240, 320)  # drawn portraits: a face box ~120 px wide


def background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A gradient with a few shapes of clutter and sensor noise: something for a detector to refuse."""
    top, bottom = rng.integers(30, 225, 3), rng.integers(30, 225, 3)
    t = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    img = np.broadcast_to(top * (1 - t) + bottom * t, (height, width, 3)).astype(np.uint8).copy()
    for _ in range(int(rng.integers(4, 12))):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(width // 20, width // 4)), int(rng.integers(height // 20, height // 3))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x, y), (x + w, y + h), colour, -1)
        else:
            cv2.ellipse(img, (x, y), (w // 2, h // 2), float(rng.uniform(0, 180)), 0, 360, colour, -1)
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def drawn_face(rng: np.random.Generator, out: Path, index: int) -> dict:
    """A synthetic person's portrait (saved under ``portraits/``) and its face: photo, box, landmarks, labels."""
    from multitask.data.synth import draw_photo, person_traits

    t = person_traits(rng)
    photo = COMPETITION_PHOTOS[int(rng.integers(len(COMPETITION_PHOTOS)))]
    img, box, _, marks = draw_photo(t, photo, rng, *PORTRAIT)
    rel = f"portraits/{index:06d}_{photo}.jpg"
    img.save(out / rel, quality=92)
    return dict(portrait=rel, rgb=np.asarray(img), box=np.asarray(box, float), marks=np.asarray(marks, float),
                mask=COMPETITION_MASK[photo], gender=t["gender"], age=t["age"])


def labeled_faces(root: Path, cache_dir: Path) -> pd.DataFrame:
    """The photos of a competition-layout folder whose face the detector finds: path, labels, box, landmarks."""
    from multitask.data.faces import find_faces

    table = load_source("competition", root)[0]
    found = find_faces(table["path"].tolist(), cache_dir, lambda s: None)
    table = pd.concat([table.reset_index(drop=True), found.drop(columns="path")], axis=1)
    return table[table["found"]].reset_index(drop=True)


def paste(scene: np.ndarray, covered: np.ndarray, number: int, rgb: np.ndarray, box: np.ndarray, marks: np.ndarray,
          width: float, centre: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Paste a face (box and landmarks in ``rgb``) into ``scene`` at ``width`` pixels, its box centred on
    ``centre``, with its surround faded out at the edges; what it covers is ``number`` in ``covered``.
    Returns (box, landmarks) in the scene's pixels."""
    x0, y0, x1, y1 = box
    grow = SURROUND * max(x1 - x0, y1 - y0)
    region = np.array([x0 - grow, y0 - grow, x1 + grow, y1 + grow])
    scale = width / (x1 - x0)
    piece = crop_box(rgb, region)
    size = (max(2, round(piece.shape[1] * scale)), max(2, round(piece.shape[0] * scale)))
    piece = cv2.resize(piece, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    ph, pw = piece.shape[:2]
    alpha = np.zeros((ph, pw), np.float32)
    cv2.ellipse(alpha, (pw // 2, ph // 2), (int(pw * 0.46), int(ph * 0.46)), 0, 0, 360, 1.0, -1)
    alpha = cv2.GaussianBlur(alpha, (0, 0), max(1.0, pw * 0.04))[:, :, None]
    # where the region's top-left corner lands in the scene
    face_centre = ((x0 + x1) / 2 - region[0]) * scale, ((y0 + y1) / 2 - region[1]) * scale
    left, top = round(centre[0] - face_centre[0]), round(centre[1] - face_centre[1])
    h, w = scene.shape[:2]
    sx0, sy0, sx1, sy1 = max(0, left), max(0, top), min(w, left + pw), min(h, top + ph)
    if sx1 > sx0 and sy1 > sy0:
        a = alpha[sy0 - top:sy1 - top, sx0 - left:sx1 - left]
        part = piece[sy0 - top:sy1 - top, sx0 - left:sx1 - left]
        scene[sy0:sy1, sx0:sx1] = (part * a + scene[sy0:sy1, sx0:sx1] * (1 - a)).astype(np.uint8)
        covered[sy0:sy1, sx0:sx1][a[:, :, 0] > 0.5] = number
    to_scene = lambda p: (np.asarray(p, float).reshape(-1, 2) - region[:2]) * scale + [left, top]  # noqa: E731
    return to_scene(box).ravel(), to_scene(marks)


def generate_scenes(out: Path, scenes: int, size: tuple[int, int] = (1280, 720), seed: int = 0,
                    counts: Sequence[int] = FACE_COUNTS, widths: tuple[int, int] = FACE_WIDTHS,
                    faces_from: Optional[Path] = None, cache_dir: Path = Path(".cache/multitask")) -> Path:
    """Write ``scenes`` scene photos and ``faces.csv`` to ``out`` (which must not exist), built in a temporary
    folder beside it and renamed at the end, so that an interrupted run leaves nothing half-written."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; synthetic data is never written over existing files")
    labeled = labeled_faces(Path(faces_from), Path(cache_dir)) if faces_from else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        with errors_named(out, tmp):
            (tmp / "images").mkdir()
            (tmp / "portraits").mkdir()
            rows = []
            for s in range(scenes):
                rows += draw_scene(tmp, s, np.random.default_rng([seed, s]), size, counts, widths, labeled)
            table = pd.DataFrame(rows)
            table["age_group"] = cut(table["age"].to_numpy(), FACE_AGE_THRESHOLDS)
            table.to_csv(tmp / "faces.csv", index=False)
            if labeled is not None:
                (tmp / "portraits").rmdir()  # the portraits are the labeled folder's photos
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def draw_scene(out: Path, s: int, rng: np.random.Generator, size: tuple[int, int], counts: Sequence[int],
               widths: tuple[int, int], labeled: Optional[pd.DataFrame]) -> list[dict]:
    """One scene photo written to ``out/images``; its faces' rows."""
    width, height = size
    scene, covered = background(rng, width, height), np.zeros((height, width), np.int32)
    faces = []
    for k in range(int(rng.choice(counts))):
        if labeled is None:
            face = drawn_face(rng, out, s * 100 + k)
        else:
            row = labeled.iloc[int(rng.integers(len(labeled)))]
            face = dict(portrait=row["path"], rgb=read_rgb(row["path"]), box=row[BOX].to_numpy(float),
                        marks=row[MARKS].to_numpy(float), mask=row["mask"], gender=row["gender"], age=row["age"])
        w = float(np.exp(rng.uniform(*np.log(widths))))
        centre = rng.uniform(-0.1 * w, width + 0.1 * w), rng.uniform(-0.1 * w, height + 0.1 * w)
        box, marks = paste(scene, covered, k + 1, face["rgb"], face["box"], face["marks"], w, centre)
        faces.append(dict(scene=f"images/scene_{s:05d}.jpg", face=k, **dict(zip(BOX, box)),
                          **dict(zip(MARKS, marks.ravel())), portrait=face["portrait"], mask=int(face["mask"]),
                          gender=int(face["gender"]), age=int(face["age"]), width=box[2] - box[0]))
    for f in faces:  # what later faces and the frame leave of each face
        x0, y0, x1, y1 = (int(round(v)) for v in (f["x0"], f["y0"], f["x1"], f["y1"]))
        area = max(1, (x1 - x0) * (y1 - y0))
        inside = covered[max(0, y0):max(0, y1), max(0, x0):max(0, x1)]
        f["in_frame"] = round(inside.size / area, 3)
        f["covered"] = round(float((inside > f["face"] + 1).sum()) / area, 3)
    cv2.imwrite(str(out / "images" / f"scene_{s:05d}.jpg"), scene[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    return faces


def generate_mosaics(out: Path, photos: Sequence[str], widths: Sequence[int], size: tuple[int, int] = (1280, 720),
                     seed: int = 0) -> Path:
    """Face crops (``photos``) pasted whole, side by side, into mosaics of ``size``: real faces in a group. Each
    mosaic holds crops of one width (``widths`` in turn); ``tiles.csv``: mosaic, the crop, its rectangle there."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=False)
    rng = np.random.default_rng(seed)
    order, rows, m = list(rng.permutation(len(photos))), [], 0
    width, height = size
    while order:
        w = int(widths[m % len(widths)])
        scene = background(rng, width, height)
        per_row, gap = max(1, (width - w // 2) // int(w * 1.5)), w // 2
        for r in range(max(1, (height - gap) // (int(w * 1.25) + gap))):
            for c in range(per_row):
                if not order:
                    break
                path = photos[order.pop()]
                crop = read_rgb(path)
                h = round(crop.shape[0] * w / crop.shape[1])
                x, y = gap + c * int(w * 1.5), gap + r * (int(w * 1.25) + gap)
                if y + h > height:
                    order.append(photos.index(path))
                    break
                scene[y:y + h, x:x + w] = cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA)
                rows.append(dict(mosaic=f"images/mosaic_{m:05d}.jpg", photo=path, width=w, x0=x, y0=y, x1=x + w,
                                 y1=y + h))
        cv2.imwrite(str(out / "images" / f"mosaic_{m:05d}.jpg"), scene[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
        m += 1
    pd.DataFrame(rows).to_csv(out / "tiles.csv", index=False)
    return out


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of boxes a (N x 4) and b (M x 4): N x M."""
    x0, y0 = np.maximum(a[:, None, 0], b[None, :, 0]), np.maximum(a[:, None, 1], b[None, :, 1])
    x1, y1 = np.minimum(a[:, None, 2], b[None, :, 2]), np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def match_faces(truth: pd.DataFrame, found: pd.DataFrame, at: float = 0.5) -> pd.Series:
    """For each true face (``faces.csv`` rows of one scene), the row of ``found`` (predict's rows of that scene)
    whose box overlaps it most with IoU >= ``at``, each found face used once, largest true faces first; -1: none."""
    match = pd.Series(-1, index=truth.index)
    boxes = found[found["face_status"] != "no_face"]
    if boxes.empty:
        return match
    overlap = iou(truth[BOX].to_numpy(float), boxes[BOX].to_numpy(float))
    used = set()
    for i in np.argsort(-truth["width"].to_numpy()):
        for j in np.argsort(-overlap[i]):
            if overlap[i, j] < at:
                break
            if j not in used:
                used.add(j)
                match.iloc[i] = boxes.index[j]
                break
    return match

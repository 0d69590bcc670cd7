"""Synthetic faces in the competition layout: ``multitask data synth OUT --people N --size WxH``.

Each person gets 7 portraits (mask1..5, incorrect_mask, normal) and a row in train.csv; ``boxes.csv`` holds each
photo's face box and mask box (x0, y0, x1, y1 in pixels) and five landmarks, for checking where a model looks.

The cues are learnable but not trivial:
- gender: jaw width, hair length, lip colour and beards, each with exceptions, so no single cue decides;
- age: a continuous cue (grey hair, forehead wrinkles, receding hairline) driven by the age in years plus noise,
  so ages near 30 and 60 are genuinely ambiguous, as in real photos;
- mask: painted from the drawn landmarks by the project's mask painter (``paint.py``: shapes, colours, prints,
  shading, ear loops), worn over nose and mouth, worn incorrectly (nose out, or pulled down to the chin), or absent;
- nuisance: skin tone, head position and scale, gaze, lighting, background, clothes and JPEG quality vary.
Deterministic for a seed: person i draws from ``numpy.random.default_rng([seed, i])`` whatever the pool size.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from multitask.data.faces import LANDMARKS
from multitask.data.paint import paint_mask
from multitask.data.sources import COMPETITION_PHOTOS
from multitask.io import errors_named
from multitask.parallel import on_every_core

SKIN = np.array([[255, 224, 196], [234, 192, 160], [198, 145, 110], [160, 110, 80], [110, 72, 50]], float)
HAIR = np.array([[30, 25, 20], [90, 60, 35], [200, 170, 110], [150, 70, 35]], float)
GREY = np.array([200, 200, 200], float)
RACES = ["White", "Asian", "Black", "Indian", "Others"]


def sample_age(rng: np.random.Generator) -> int:
    # Roughly the competition's imbalance: many young, fewer middle-aged, few 60+.
    group = rng.choice(3, p=[0.45, 0.40, 0.15])
    low, high = [(18, 30), (30, 60), (60, 80)][group]
    return int(rng.integers(low, high))


def person_traits(rng: np.random.Generator) -> dict:
    gender = int(rng.integers(2))
    age = sample_age(rng)
    oldness = np.clip((age - 30) / 35 + rng.normal(0, 0.12), 0, 1)  # continuous age cue
    skin = SKIN[rng.integers(len(SKIN))] + rng.normal(0, 10, 3)
    return dict(
        gender=gender, age=age, oldness=oldness, skin=skin,
        race=RACES[rng.integers(len(RACES))],
        hair=HAIR[rng.integers(len(HAIR))] * (1 - oldness) + GREY * oldness + rng.normal(0, 8, 3),
        long_hair=rng.random() < (0.88 if gender else 0.08),
        jaw=rng.normal(0.88 if gender else 1.0, 0.035),  # face width factor
        beard=(not gender) and rng.random() < 0.45,
        lips=np.array([190, 60, 90]) if gender and rng.random() < 0.8 else skin * 0.75,
        wrinkles=int(np.clip(round(oldness * 5 + rng.normal(0, 0.6)), 0, 6)),
        recede=(not gender) and oldness > 0.55 and rng.random() < 0.6,
        clothes=rng.integers(0, 255, 3),
        background=rng.integers(40, 230, 3),
    )


def color(c) -> tuple:
    return tuple(int(v) for v in np.clip(c, 0, 255))


def draw_photo(t: dict, photo: str, rng: np.random.Generator, width: int, height: int, anywhere: bool = False):
    """One portrait; returns (PIL image, face box, mask box or None, landmarks). ``anywhere``: the head's size
    and place vary widely (a face detector has to find it), otherwise it sits near the centre."""
    bg = np.clip(t["background"] + rng.normal(0, 20, 3), 0, 255)
    img = Image.new("RGB", (width, height), color(bg))
    d = ImageDraw.Draw(img)
    # Vertical background gradient, cheap: a few bands.
    for k in range(8):
        d.rectangle([0, k * height // 8, width, (k + 1) * height // 8], fill=color(bg * (0.85 + 0.04 * k)))

    s = width / 384 * rng.uniform(0.85, 1.15)  # head scale
    cx = width / 2 + rng.uniform(-0.08, 0.08) * width
    cy = height * 0.42 + rng.uniform(-0.06, 0.06) * height
    if anywhere:
        s = width / 384 * rng.uniform(0.55, 1.0)
        cx = rng.uniform(100 * s, width - 100 * s)
        cy = rng.uniform(140 * s, height - 140 * s)
    fw, fh = 95 * s * t["jaw"], 125 * s  # face half-width, half-height
    gaze = rng.uniform(-0.15, 0.15) * fw  # features shift left/right: a turned head

    if t["long_hair"]:
        d.rounded_rectangle([cx - fw * 1.25, cy - fh * 1.05, cx + fw * 1.25, cy + fh * 1.55], radius=int(60 * s),
                            fill=color(t["hair"]))
    d.rectangle([cx - fw * 0.35, cy + fh * 0.7, cx + fw * 0.35, cy + fh * 1.3], fill=color(t["skin"] * 0.9))  # neck
    d.ellipse([cx - fw * 2.0, cy + fh * 1.15, cx + fw * 2.0, cy + fh * 2.6], fill=color(t["clothes"]))  # shoulders
    d.ellipse([cx - fw * 1.08, cy - fh * 0.1, cx - fw * 0.88, cy + fh * 0.25], fill=color(t["skin"] * 0.92))  # ears
    d.ellipse([cx + fw * 0.88, cy - fh * 0.1, cx + fw * 1.08, cy + fh * 0.25], fill=color(t["skin"] * 0.92))
    face_box = [cx - fw, cy - fh, cx + fw, cy + fh]
    d.ellipse(face_box, fill=color(t["skin"]))
    top = cy - fh * (0.55 if t["recede"] else 0.7)
    d.chord([cx - fw * 1.02, cy - fh * 1.08, cx + fw * 1.02, top + fh * 0.35], 180, 360, fill=color(t["hair"]))

    fx = cx + gaze
    eye_y, nose_y, mouth_y = cy - fh * 0.12, cy + fh * 0.22, cy + fh * 0.5
    for side in (-1, 1):
        ex = fx + side * fw * 0.4
        d.ellipse([ex - 18 * s, eye_y - 9 * s, ex + 18 * s, eye_y + 9 * s], fill=(245, 245, 245))
        d.ellipse([ex - 7 * s + gaze * 0.1, eye_y - 7 * s, ex + 7 * s + gaze * 0.1, eye_y + 7 * s],
                  fill=color(rng.integers(20, 120, 3)))
        brow = eye_y - 22 * s
        d.line([ex - 20 * s, brow + 3 * s, ex + 20 * s, brow - side * 2 * s], fill=color(t["hair"] * 0.8),
               width=max(1, int((5 if t["gender"] == 0 else 3) * s)))
        for k in range(t["wrinkles"] // 2):  # crow's feet
            wx = ex + side * 24 * s
            d.line([wx, eye_y - 4 * s + k * 5 * s, wx + side * 10 * s, eye_y - 8 * s + k * 7 * s],
                   fill=color(t["skin"] * 0.7), width=max(1, int(2 * s)))
    for k in range(t["wrinkles"]):  # forehead lines
        y = cy - fh * 0.42 - k * 7 * s
        d.arc([fx - fw * 0.5, y - 6 * s, fx + fw * 0.5, y + 6 * s], 200, 340, fill=color(t["skin"] * 0.72),
              width=max(1, int(2 * s)))
    d.polygon([(fx, eye_y + 8 * s), (fx - 16 * s, nose_y), (fx + 16 * s, nose_y)], fill=color(t["skin"] * 0.7))
    d.ellipse([fx - 30 * s, mouth_y - 8 * s, fx + 30 * s, mouth_y + 8 * s], fill=color(t["lips"]))
    if t["beard"]:
        d.chord([cx - fw * 0.95, cy + fh * 0.05, cx + fw * 0.95, cy + fh * 1.02], 0, 180,
                fill=color(t["hair"] * 0.7))
        d.ellipse([fx - 30 * s, mouth_y - 8 * s, fx + 30 * s, mouth_y + 8 * s], fill=color(t["lips"]))

    # Five landmarks as a detector gives them (faces.LANDMARKS order); masks are painted from them.
    landmarks = np.array([[fx - fw * 0.4, eye_y], [fx + fw * 0.4, eye_y], [fx, nose_y],
                          [fx - 30 * s, mouth_y], [fx + 30 * s, mouth_y]])
    mask_box = None
    if photo != "normal":
        wear = "worn" if photo != "incorrect_mask" else ("nose_out" if rng.random() < 0.6 else "chin")
        painted, alpha, _ = paint_mask(np.asarray(img), landmarks, rng, wear)
        img = Image.fromarray(painted)
        ys, xs = np.nonzero(alpha > 0.5)
        mask_box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]

    # Lighting: a global gain and a left/right gradient, then sensor noise.
    a = np.asarray(img, dtype=np.float32)
    ramp = np.linspace(-1, 1, width, dtype=np.float32)[None, :, None] * rng.uniform(-0.2, 0.2)
    a = a * (rng.uniform(0.7, 1.25) + ramp) + rng.normal(0, 4, (1, 1, 3))
    a += rng.normal(0, 3, a.shape).astype(np.float32)
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    clip = lambda b: [int(np.clip(b[0], 0, width)), int(np.clip(b[1], 0, height)),  # noqa: E731
                      int(np.clip(b[2], 0, width)), int(np.clip(b[3], 0, height))]
    return img, clip(face_box), (clip(mask_box) if mask_box else None), landmarks


def draw_person(args) -> tuple[dict, list[dict]]:
    out, seed, index, width, height, anywhere = args
    rng = np.random.default_rng([seed, index])
    t = person_traits(rng)
    pid = f"{index + 1:06d}"
    gender = "female" if t["gender"] else "male"
    folder = f"{pid}_{gender}_{t['race']}_{t['age']}"
    (Path(out) / "images" / folder).mkdir(parents=True, exist_ok=True)
    boxes = []
    for photo in COMPETITION_PHOTOS:
        img, face, mask, marks = draw_photo(t, photo, rng, width, height, anywhere)
        rel = f"images/{folder}/{photo}.jpg"
        img.save(Path(out) / rel, quality=int(rng.integers(60, 96)))
        boxes.append(dict(path=rel, face_x0=face[0], face_y0=face[1], face_x1=face[2], face_y1=face[3],
                          **{f"mask_{k}": (mask[i] if mask else None) for i, k in enumerate(["x0", "y0", "x1", "y1"])},
                          **{f"{n}_{a}": round(float(marks[i][j]), 1) for i, n in enumerate(LANDMARKS)
                             for j, a in enumerate("xy")}))
    person = dict(id=pid, gender=gender, race=t["race"], age=t["age"], path=folder)
    return person, boxes


def generate(out: Path, people: int, size: tuple[int, int] = (384, 512), seed: int = 0,
             workers: int | None = None, anywhere: bool = False) -> Path:
    """Write ``people`` synthetic persons to ``out`` (must not exist yet); built in a temp folder then renamed,
    so an interrupted run never leaves a half-written data set behind."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; synthetic data is never written over existing files")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        with errors_named(out, tmp):  # a full disk: said for the data set asked for, not the temporary folder
            width, height = size
            jobs = [(str(tmp), seed, i, width, height, anywhere) for i in range(people)]
            # a few persons are drawn here: starting worker processes would cost more
            results = list(on_every_core(draw_person, jobs, (workers or 0) if people > 8 else 1, chunksize=8))
            pd.DataFrame([p for p, _ in results]).to_csv(tmp / "train.csv", index=False)
            pd.DataFrame([b for _, bs in results for b in bs]).to_csv(tmp / "boxes.csv", index=False)
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


RACE_INDEX = {r: i for i, r in enumerate(RACES)}


def draw_unmasked(args) -> None:
    """One extra unmasked person, UTKFace-style: ``<age>_<gender>_<race>_<index>.jpg``."""
    out, seed, index, width, height = args
    rng = np.random.default_rng([seed, 1, index])  # a stream of its own: never one of the main set's persons
    t = person_traits(rng)
    img = draw_photo(t, "normal", rng, width, height)[0]
    img.save(Path(out) / f"{t['age']}_{t['gender']}_{RACE_INDEX[t['race']]}_{index:06d}.jpg",
             quality=int(rng.integers(60, 96)))


def generate_unmasked(out: Path, people: int, size: tuple[int, int] = (384, 512), seed: int = 0) -> Path:
    """``people`` extra unmasked persons, one portrait each, UTKFace-style names (``data.extra_unmasked``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        with errors_named(out, tmp):
            jobs = [(str(tmp), seed, i, *size) for i in range(people)]
            list(on_every_core(draw_unmasked, jobs, chunksize=16))
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_synthetic_unmasked(cache_dir: Path, people: int, size, seed: int) -> Path:
    out = Path(cache_dir) / f"synthetic-unmasked-{people}p-{size[0]}x{size[1]}-s{seed}"
    if not out.exists():
        generate_unmasked(out, people, tuple(size), seed)
    return out


def ensure_synthetic(cache_dir: Path, people: int, size, seed: int, anywhere: bool = False) -> Path:
    """The synthetic data set for these settings, generated once and reused."""
    out = Path(cache_dir) / f"synthetic-{people}p-{size[0]}x{size[1]}-s{seed}{'-anywhere' if anywhere else ''}"
    if not out.exists():
        generate(out, people, tuple(size), seed, anywhere=anywhere)
    return out

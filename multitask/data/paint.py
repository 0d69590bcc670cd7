"""Masks painted from facial landmarks, with the variety real masks have.

A mask is drawn in the face's own frame (origin between the eyes, x along the eye line, y down the face, one
unit = the distance between the eyes), so it follows the head's tilt, size and turn. What varies, drawn from the
generator for each photo: the shape (surgical with pleats, cloth, KN95 folded, N95 cup), the colour (the usual
whites and blues, dark and bright cloth, prints: stripes, dots, blotches, bold graphics such as a cartoon mouth),
an exhalation valve on respirators and sport masks, pleats and folds, fabric noise, a shading that follows the
face's own light, soft edges, ear loops and, sometimes, something in front of the mask.
Worn incorrectly, as real photos show it: below the nose (``nose_out``), pulled down under the lower lip with the
mouth showing (``mouth_out``), pulled down to the chin (``chin``), or hanging from one ear (``one_ear``);
paint-masks draws those of ``DEFAULT_INCORRECT`` unless asked for others.

``multitask data paint-masks SRC OUT`` turns unmasked photos into the competition layout (see
``paint_folder``).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import pandas as pd

from multitask.io import errors_named
from multitask.parallel import on_every_core

SHAPES = ("surgical", "cloth", "kn95", "n95")
SHAPE_P = (0.5, 0.2, 0.15, 0.15)  # surgical masks are what most people wear
COLORS = {  # name -> RGB; whites and blues first, as on the street
    "white": (232, 234, 236), "light_blue": (160, 200, 228), "blue": (95, 145, 205), "teal": (120, 196, 190),
    "green": (110, 160, 120), "pink": (232, 176, 196), "beige": (214, 196, 168), "grey": (150, 152, 156),
    "black": (36, 36, 40), "navy": (42, 52, 92), "red": (170, 50, 55), "yellow": (225, 205, 110),
}
COLOR_P = np.array([0.28, 0.2, 0.1, 0.06, 0.03, 0.04, 0.03, 0.05, 0.12, 0.04, 0.03, 0.02])
PATTERNS = ("plain", "stripes", "dots", "blotches", "graphic")
PATTERN_P = (0.74, 0.06, 0.06, 0.06, 0.08)
# Exhalation valves: on many respirators and sport masks, rarely on cloth. Models trained without them called
# real valved masks "not worn" (docs/real-masks.md).
VALVE_P = {"surgical": 0.0, "cloth": 0.12, "kn95": 0.3, "n95": 0.45}
VALVE_COLORS = ((235, 235, 235), (140, 140, 145), (30, 30, 32), (60, 160, 80), (230, 120, 40), (70, 110, 190))
WEARS = ("worn", "nose_out", "mouth_out", "chin", "one_ear")
# The odds of each wear for paint-masks' incorrect photo, among the wears asked for (--incorrect): under the nose is
# what most real incorrect masks are.
INCORRECT_P = {"nose_out": 0.7, "mouth_out": 0.3, "chin": 0.3, "one_ear": 0.3}
# The default: with mouth_out and one_ear too, a model found no more real incorrect masks and called more real
# unmasked faces "incorrect" (docs/results.md, issue 37 item 5)
DEFAULT_INCORRECT = ("nose_out", "chin")
UTK_RACES = {"0": "White", "1": "Black", "2": "Asian", "3": "Indian", "4": "Others"}


def face_frame(landmarks: np.ndarray):
    """(origin, x axis, y axis, unit length) of the face: eye midpoint, eye line, down the face, eye distance."""
    eyes = landmarks[:2]
    origin = eyes.mean(0)
    x = eyes[1] - eyes[0]
    unit = float(np.linalg.norm(x))
    x = x / max(unit, 1e-6)
    y = np.array([-x[1], x[0]])
    return origin, x, y, max(unit, 1e-6)


def smooth_closed(points: np.ndarray, n: int = 120) -> np.ndarray:
    """A closed Catmull-Rom curve through the points."""
    p = np.asarray(points, dtype=np.float64)
    out = []
    k = len(p)
    per = max(2, n // k)
    for i in range(k):
        p0, p1, p2, p3 = p[i - 1], p[i], p[(i + 1) % k], p[(i + 2) % k]
        for t in np.linspace(0, 1, per, endpoint=False):
            t2, t3 = t * t, t * t * t
            out.append(0.5 * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2
                              + (-p0 + 3 * p1 - 3 * p2 + p3) * t3))
    return np.array(out)


def outline(shape: str, wear: str, nose: float, mouth: float, center: float, rng: np.random.Generator
            ) -> tuple[np.ndarray, float, float]:
    """The mask's outline in face units, and its top and bottom (y)."""
    chin = mouth + rng.uniform(0.55, 0.7)
    if wear == "worn":
        # From high on the bridge to halfway down the nose, as real masks sit: models trained on bridge-high
        # masks called many real, lower-sitting masks "worn incorrectly".
        top = nose * rng.uniform(0.3, 0.7)
        bottom = chin + rng.uniform(0.0, 0.15)
    elif wear == "nose_out":
        top = nose + rng.uniform(0.08, 0.18)  # under the nose tip, above the lip
        bottom = chin + rng.uniform(0.05, 0.2)
    elif wear == "mouth_out":  # pulled down under the lower lip: squashed onto the chin, taller than a chin strap
        top = mouth + rng.uniform(0.12, 0.2)
        bottom = chin + rng.uniform(0.15, 0.3)
    elif wear == "one_ear":  # taken off one ear: the mask as worn, then hung from the other (``hang``)
        top = nose * rng.uniform(0.3, 0.7)
        bottom = chin + rng.uniform(0.0, 0.15)
    else:  # chin
        top = mouth + rng.uniform(0.2, 0.32)
        bottom = chin + rng.uniform(0.25, 0.45)
    half = rng.uniform(0.78, 0.95)  # half width at the cheeks
    mid = (top + bottom) / 2
    if shape == "surgical":
        pts = [(-half * 0.92, top + 0.1), (0, top), (half * 0.92, top + 0.1), (half, mid),
               (half * 0.85, bottom - 0.12), (0, bottom), (-half * 0.85, bottom - 0.12), (-half, mid)]
    elif shape == "cloth":
        pts = [(-half * 0.85, top + 0.2), (0, top), (half * 0.85, top + 0.2), (half * 0.95, mid),
               (half * 0.6, bottom - 0.1), (0, bottom + 0.03), (-half * 0.6, bottom - 0.1), (-half * 0.95, mid)]
    elif shape == "kn95":
        pts = [(-half * 0.8, top + 0.3), (0, top - 0.05), (half * 0.8, top + 0.3), (half * 0.9, mid),
               (half * 0.45, bottom - 0.12), (0, bottom + 0.05), (-half * 0.45, bottom - 0.12), (-half * 0.9, mid)]
    else:  # n95 cup: an oval
        t = np.linspace(0, 2 * np.pi, 10, endpoint=False)
        pts = np.stack([np.cos(t) * half * 0.85, mid + np.sin(t) * (bottom - top) / 2], 1)
    pts = np.asarray(pts, dtype=np.float64)
    pts[:, 0] += center
    return smooth_closed(pts), top, bottom


def hang(worn: np.ndarray, side: int, swing: float) -> Callable[[np.ndarray], np.ndarray]:
    """The turn (of points in face units) about the ear on ``side`` (-1: the photo's left) that hangs a mask worn
    with outline ``worn`` straight below that ear, then ``swing`` degrees further."""
    ear = np.array([side * 1.05, 0.45])
    dx, dy = worn.mean(0) - ear
    turn = np.pi / 2 - np.arctan2(dy, dx) + np.deg2rad(swing)
    rot = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    return lambda points: (points - ear) @ rot.T + ear


def texture(h: int, w: int, color: np.ndarray, pattern: str, rng: np.random.Generator, unit: float) -> np.ndarray:
    """H x W x 3 float texture in 0..255: colour, print, fabric grain."""
    tex = np.empty((h, w, 3), np.float32)
    tex[:] = color
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    other = np.array(list(COLORS.values())[rng.integers(len(COLORS))], np.float32)
    if pattern == "stripes":
        angle, period = rng.uniform(0, np.pi), unit * rng.uniform(0.12, 0.3)
        band = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / period * 2 * np.pi) > 0.3
        tex[band] = other
    elif pattern == "dots":
        period, radius = unit * rng.uniform(0.15, 0.3), rng.uniform(0.15, 0.3)
        dot = ((xx / period) % 1 - 0.5) ** 2 + ((yy / period) % 1 - 0.5) ** 2 < radius ** 2
        tex[dot] = other
    elif pattern == "blotches":
        noise = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), max(1.0, unit * 0.12))
        tex[noise > noise.std() * 0.6] = other
    elif pattern == "graphic":  # a few large bold shapes, as on printed fun masks (teeth, snouts, logos)
        palette = np.array(list(COLORS.values()) + [(250, 250, 250), (10, 10, 10)], np.float32)
        for _ in range(int(rng.integers(2, 6))):
            ink = tuple(float(v) for v in palette[rng.integers(len(palette))])
            c = (int(rng.uniform(0.2, 0.8) * w), int(rng.uniform(0.25, 0.85) * h))
            size = (int(unit * rng.uniform(0.1, 0.45)), int(unit * rng.uniform(0.06, 0.3)))
            if rng.random() < 0.6:
                cv2.ellipse(tex, c, size, float(rng.uniform(0, 180)), 0, 360, ink, -1, cv2.LINE_AA)
            else:
                zig = np.stack([np.linspace(-size[0], size[0], 7), size[1] * (np.arange(7) % 2 * 2 - 1)], 1)
                cv2.polylines(tex, [(zig + c).astype(np.int32)], False, ink, max(1, int(unit * 0.05)), cv2.LINE_AA)
    grain = rng.normal(0, rng.uniform(2, 8), (h, w, 1)).astype(np.float32)
    return tex + grain


def draw_valve(out: np.ndarray, centre: np.ndarray, radius: float, shade: np.ndarray, on: np.ndarray,
               rng: np.random.Generator) -> np.ndarray:
    """An exhalation valve (disc or rounded square, a rim, a cap with vents) at ``centre`` (ROI pixels), lit
    like the mask under it and only where the mask is (``on``: its opacity)."""
    colour = np.array(VALVE_COLORS[rng.integers(len(VALVE_COLORS))], np.float32) + rng.normal(0, 8, 3)
    c, r = tuple(int(round(v)) for v in centre), max(2, int(round(radius)))
    body, layer = np.zeros(out.shape[:2], np.float32), np.full_like(out, colour)
    if rng.random() < 0.65:
        cv2.circle(body, c, r, 1.0, -1, cv2.LINE_AA)
    else:
        cv2.rectangle(body, (c[0] - r, c[1] - r), (c[0] + r, c[1] + r), 1.0, -1)
        body = cv2.GaussianBlur(body, (0, 0), max(0.5, r * 0.25))
    rim = tuple(float(v) for v in colour * 0.6)
    cv2.circle(layer, c, r, rim, max(1, r // 5), cv2.LINE_AA)
    cv2.circle(layer, c, max(1, int(r * 0.5)), tuple(float(v) for v in colour * rng.uniform(0.75, 1.1)), -1,
               cv2.LINE_AA)
    for k in range(-1, 2):  # vents
        y = c[1] + k * max(1, r // 3)
        cv2.line(layer, (c[0] - int(r * 0.4), y), (c[0] + int(r * 0.4), y), rim, max(1, r // 8), cv2.LINE_AA)
    body = (body * on)[..., None]
    return out * (1 - body) + layer * shade[..., None] * body


def paint_mask(rgb: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator, wear: str = "worn",
               shape: Optional[str] = None, color: Optional[str] = None, valve: Optional[bool] = None
               ) -> tuple[np.ndarray, np.ndarray, dict]:
    """(painted RGB uint8, the mask's opacity H x W in 0..1, what was drawn). ``landmarks``: 5 x 2 (faces.py).
    ``shape``, ``color``, ``valve``: drawn from the generator unless given."""
    if wear not in WEARS:
        raise ValueError(f"wear {wear!r}: one of {WEARS}")
    shape = shape or str(rng.choice(SHAPES, p=SHAPE_P))
    color = color or str(rng.choice(list(COLORS), p=COLOR_P / COLOR_P.sum()))
    pattern = str(rng.choice(PATTERNS, p=PATTERN_P)) if color not in ("white", "light_blue") else "plain"
    valve = (bool(rng.random() < VALVE_P[shape]) if valve is None else valve) and wear != "one_ear"
    drawn = dict(wear=wear, shape=shape, color=color, pattern=pattern, valve=valve, occluded=False)
    h, w = rgb.shape[:2]
    origin, ax, ay, unit = face_frame(np.asarray(landmarks, dtype=np.float64))
    to_face = lambda p: np.array([(p - origin) @ ax, (p - origin) @ ay]) / unit  # noqa: E731
    to_image = lambda q: origin + (q[..., :1] * ax + q[..., 1:] * ay) * unit  # noqa: E731
    nose = to_face(landmarks[2])
    mouth = to_face((landmarks[3] + landmarks[4]) / 2)
    center = nose[0] * 0.7  # a turned head moves the nose, and the mask with it
    poly, top, bottom = outline(shape, wear, nose[1], mouth[1], center, rng)
    worn_poly, turn = poly, (lambda points: points)
    hung = int(rng.choice([-1, 1])) if wear == "one_ear" else 0  # the side of the ear it hangs from
    if hung:
        turn = hang(poly, hung, rng.uniform(-25, 25))
        poly = turn(poly)

    # Everything below works on the mask's neighbourhood only (a portrait is mostly not mask).
    pad = unit * 0.5
    outline_xy = to_image(poly)
    x0, y0 = np.maximum(np.floor(outline_xy.min(0) - pad), 0).astype(int)
    x1, y1 = np.minimum(np.ceil(outline_xy.max(0) + pad), [w, h]).astype(int)
    alpha_full = np.zeros((h, w), np.float32)
    if x1 <= x0 or y1 <= y0:  # the face is outside the photo
        return rgb.copy(), alpha_full, drawn
    roi = rgb[y0:y1, x0:x1].astype(np.float32)
    rh, rw = roi.shape[:2]
    corner = np.array([x0, y0], np.float64)

    # Opacity: the outline filled at 4x and shrunk (anti-aliased), then softened.
    ss = 4
    big = np.zeros((rh * ss, rw * ss), np.uint8)
    cv2.fillPoly(big, [np.round((outline_xy - corner) * ss).astype(np.int32)], 255)
    alpha = cv2.resize(big, (rw, rh), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    alpha = cv2.GaussianBlur(alpha, (0, 0), max(0.5, unit * rng.uniform(0.005, 0.02)))

    # Shading in face coordinates: round across the face, pleats or folds down it, light from the face itself.
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    fu = ((xx - origin[0]) * ax[0] + (yy - origin[1]) * ax[1]) / unit - center
    fv = ((xx - origin[0]) * ay[0] + (yy - origin[1]) * ay[1]) / unit
    depth = (top + bottom) / 2
    shade = 1 - rng.uniform(0.1, 0.3) * np.clip(fu / 1.1, -1, 1) ** 2
    shade *= 1 + rng.uniform(-0.08, 0.08) * (fv - depth)
    if shape == "surgical":
        pleats = rng.integers(2, 4)
        phase = (fv - top) / max(bottom - top, 1e-3) * (pleats + 1)
        shade *= 1 - rng.uniform(0.06, 0.16) * np.exp(-((phase - np.round(phase)) ** 2) / 0.01) * (phase > 0.5)
    elif shape in ("kn95", "cloth"):
        shade *= 1 - rng.uniform(0.05, 0.15) * np.exp(-(fu ** 2) / 0.003)  # the centre seam or fold
    folds = rng.uniform(0, 0.06)
    shade *= 1 + folds * np.sin(fv * rng.uniform(8, 16) + fu * rng.uniform(-3, 3) + rng.uniform(0, 6.3))
    light = cv2.GaussianBlur(roi.mean(2), (0, 0), max(2.0, unit * 0.35))
    inside = alpha > 0.5
    ref = float(np.median(light[inside])) if inside.any() else float(light.mean())
    shade *= np.clip(light / max(ref, 1.0), 0.6, 1.3) * np.clip(ref / 170.0, 0.45, 1.15) ** 0.7

    tint = np.array(COLORS[color], np.float32) + rng.normal(0, 10, 3)
    tex = texture(rh, rw, tint, pattern, rng, unit) * shade[..., None].astype(np.float32)
    out = roi * (1 - alpha[..., None]) + np.clip(tex, 0, 255) * alpha[..., None]
    # The valve draws from its own stream, so the rest of the mask is the same with or without one.
    valve_rng = np.random.default_rng(rng.integers(1 << 32))
    if valve:  # in front or on one cheek, inside the outline
        at = to_image(np.array([center + valve_rng.uniform(-0.35, 0.35),
                                (top + bottom) / 2 + valve_rng.uniform(-0.05, 0.12)]))
        out = draw_valve(out, at - corner, unit * valve_rng.uniform(0.17, 0.28), shade, alpha, valve_rng)
    occluded = bool(rng.random() < 0.12) and not hung  # a hand is held in front of a mask on the face
    if occluded:  # a hand or a phone in front of part of the mask (it hides the mask, not uncovers the face)
        occluder = np.zeros((rh, rw), np.float32)
        c = to_image(np.array([rng.uniform(-1, 1) + center, rng.uniform(top, bottom)])) - corner
        cv2.ellipse(occluder, (int(c[0]), int(c[1])), (int(unit * rng.uniform(0.2, 0.45)),
                    int(unit * rng.uniform(0.2, 0.45))), float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        occluder = cv2.GaussianBlur(occluder, (0, 0), max(0.5, unit * 0.02))[..., None]
        skin = np.median(roi[alpha < 0.05], axis=0) if (alpha < 0.05).any() else roi.mean((0, 1))
        fill = skin * rng.uniform(0.8, 1.1) if rng.random() < 0.7 else rng.uniform(20, 90, 3)
        out = out * (1 - occluder) + fill * (shade[..., None] * occluder)
    loops = shape != "n95" or rng.random() < 0.5
    if loops:  # ear loops (or N95 straps): thin lines from the mask's edge to the ear
        loop_color = tuple(float(v) for v in np.clip(tint * 1.05, 0, 255))
        thick = max(1, int(round(unit * 0.025)))
        layer = out.copy()
        for side in (hung,) if hung else (-1, 1):  # a hanging mask keeps the loops of its ear only
            edge = side * np.abs(worn_poly[:, 0] - center).max() * 0.97 + center
            for v_mask, v_ear in ((top + 0.1, 0.25), (bottom - 0.2, 0.65)):
                a = to_image(turn(np.array([edge, v_mask]))) - corner
                b = to_image(np.array([edge + side * 0.12, v_ear])) - corner
                cv2.line(layer, tuple(int(t) for t in a), tuple(int(t) for t in b), loop_color, thick, cv2.LINE_AA)
        out = out * 0.25 + layer * 0.75
    painted = rgb.copy()
    painted[y0:y1, x0:x1] = np.clip(out, 0, 255).astype(np.uint8)
    alpha_full[y0:y1, x0:x1] = alpha
    return painted, alpha_full, {**drawn, "occluded": occluded}


# --- paint-masks: unmasked photos -> the competition layout ----------------------------------------------


def _paint_person(args) -> dict:
    """One person's seven photos; returns the person's row and label rows, or why the person was left out."""
    from multitask.data.faces import detect
    from multitask.data.images import read_rgb

    out, index, row, seed, incorrect = args
    rng = np.random.default_rng([seed, index])
    try:
        rgb = read_rgb(row["path"])
    except (OSError, ValueError) as e:
        return {"skipped": row["path"], "reason": f"unreadable image ({e})"}
    face = detect(rgb)
    if face is None:
        return {"skipped": row["path"], "reason": "no face found (not painted on a guess)"}
    gender = ("male", "female")[int(row["gender"])]
    race = UTK_RACES.get(str(row.get("race", "")), str(row.get("race", "") or "Unknown"))
    folder = f"{index + 1:06d}_{gender}_{race}_{int(row['age'])}"
    target = Path(out) / "images" / folder
    target.mkdir(parents=True, exist_ok=True)
    labels = []
    photos = [("normal", None)] + [(f"mask{k}", "worn") for k in range(1, 6)]
    odds = np.array([INCORRECT_P[w] for w in incorrect])
    photos.append(("incorrect_mask", str(rng.choice(incorrect, p=odds / odds.sum()))))
    shapes = rng.permutation(SHAPES).tolist() + [None]  # each person gets every shape once, then any
    for (name, wear), shape in zip(photos, [None] + shapes + [None]):
        info = {"wear": "none", "shape": "", "color": "", "pattern": "", "valve": False, "occluded": False}
        img = rgb
        if wear is not None:
            img, _, info = paint_mask(rgb, face.landmarks, rng, wear, shape)
        cv2.imwrite(str(target / f"{name}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(80, 96))])
        labels.append({"path": f"images/{folder}/{name}.jpg",
                       "mask": {"none": "not_worn", "worn": "worn"}.get(info["wear"], "incorrect"),
                       **info, "source_file": row["path"]})
    person = dict(id=f"{index + 1:06d}", gender=gender, race=race,
                  age=int(row["age"]), path=folder)
    return {"person": person, "labels": labels}


def paint_folder(table: pd.DataFrame, out: Path, seed: int = 0, workers: int = 0,
                 log: Callable[[str], None] = print, incorrect: Sequence[str] = DEFAULT_INCORRECT
                 ) -> tuple[int, pd.DataFrame]:
    """Paint masks on one unmasked photo per row of ``table`` (path, gender, age[, race]) into ``out``:
    ``train.csv``, ``images/<id>_<gender>_<race>_<age>/{normal, mask1..5, incorrect_mask}.jpg``, ``labels.csv``
    (shape, colour, wear of each photo) and ``no_face.csv`` (photos left out, with the reason).
    Written into a temporary folder and renamed at the end: ``out`` must not exist. Returns (persons painted,
    left out). ``incorrect``: the wears the incorrect photo is drawn from (with ``INCORRECT_P``'s odds)."""
    unknown = sorted(set(incorrect) - set(INCORRECT_P))
    if unknown or not incorrect:
        raise ValueError(f"incorrect wears {', '.join(unknown) or '(none)'}: choose from {', '.join(INCORRECT_P)}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; painted data is never written over existing files")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    jobs = [(str(tmp), i, r, seed, tuple(incorrect)) for i, r in enumerate(table.to_dict("records"))]
    from multitask.data.faces import one_thread  # the detector's module, loaded when painting

    try:
        with errors_named(out, tmp):  # a full disk: said for the data set asked for, not the temporary folder
            # a few persons are painted here: starting workers (a detector each) would cost more
            results = list(on_every_core(_paint_person, jobs, workers if len(jobs) > 8 else 1, one_thread, 16))
            people = [r["person"] for r in results if "person" in r]
            skipped = pd.DataFrame([{"path": r["skipped"], "reason": r["reason"]} for r in results
                                    if "skipped" in r], columns=["path", "reason"])
            pd.DataFrame(people, columns=["id", "gender", "race", "age", "path"]).to_csv(tmp / "train.csv",
                                                                                         index=False)
            pd.DataFrame([lab for r in results for lab in r.get("labels", [])]).to_csv(tmp / "labels.csv",
                                                                                      index=False)
            skipped.to_csv(tmp / "no_face.csv", index=False)
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"painted {len(people)} persons ({len(people) * 7} photos) into {out}; {len(skipped)} left out "
        f"(listed in {out / 'no_face.csv'})")
    return len(people), skipped

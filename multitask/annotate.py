"""Photos people can read: every face boxed and labeled (supervision's annotators), coloured by its first head's
class (the mask: worn green, incorrect orange, not worn red); faces too small to classify in grey."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import supervision as sv

from multitask.config import HeadConfig
from multitask.inference import BOX, PREDICTED, TOO_SMALL

TRAFFIC = ["#22aa44", "#ff9900", "#e8262b"]  # the first head's classes in order; more classes: supervision's own
GREY = "#9a9a9a"


def palette(first: HeadConfig) -> sv.ColorPalette:
    """A colour per class of the first head, then grey (too small)."""
    others = [c.as_hex() for c in sv.ColorPalette.DEFAULT.colors]
    colours = (TRAFFIC + others)[:len(first.classes)] if len(first.classes) <= 3 else others[:len(first.classes)]
    return sv.ColorPalette.from_hex(colours + [GREY])


def face_label(row, heads: Sequence[HeadConfig]) -> str:
    """e.g. "worn 0.97 | female | <30" (the first head's class and probability, then the others' classes)."""
    if row["face_status"] == TOO_SMALL:
        return "too small"
    first, *rest = heads
    p = row[f"p_{first.name}_{row[f'{first.name}_class']}"]
    return " | ".join([f"{row[f'{first.name}_class']} {p:.2f}"] + [str(row[f"{h.name}_class"]) for h in rest])


def draw_faces(rgb: np.ndarray, rows: pd.DataFrame, heads: Sequence[HeadConfig]) -> np.ndarray:
    """``rgb`` (H x W x 3 uint8) with the faces of ``rows`` (``inference`` rows of this photo) boxed and labeled;
    a photo without faces comes back as it was."""
    rows = rows[rows["face_status"].isin([PREDICTED, TOO_SMALL])]
    if rows.empty:
        return rgb.copy()
    first = heads[0]
    classes = [first.classes.index(c) if s == PREDICTED else len(first.classes)
               for c, s in zip(rows[f"{first.name}_class"], rows["face_status"])]
    detections = sv.Detections(xyxy=rows[BOX].to_numpy(np.float32), class_id=np.array(classes, int))
    colours = palette(first)
    side = max(rgb.shape[:2])
    scale = max(0.35, side / 1600)
    out = sv.BoxAnnotator(color=colours, thickness=max(1, round(side / 500))).annotate(rgb.copy(), detections)
    labels = sv.LabelAnnotator(color=colours, text_scale=scale, text_thickness=max(1, round(scale * 1.5)),
                               text_padding=max(2, round(6 * scale)), smart_position=True)
    return labels.annotate(out, detections, [face_label(r, heads) for _, r in rows.iterrows()])

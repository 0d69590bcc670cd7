"""The face task's classes and the heads' joint label.

The joint label is the mixed-radix code of the heads in their declared order; for the face task
(mask, gender, age) that is the competition's 18-class label: 6*mask + 3*gender + age.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# Declared in the order of the competition's 18-class code: class = 6*mask + 3*gender + age.
FACE_CLASSES = {"mask": ["worn", "incorrect", "not_worn"], "gender": ["male", "female"],
                "age": ["<30", "30-59", "60+"]}
MASK_CLASSES, GENDER_CLASSES, AGE_CLASSES = FACE_CLASSES["mask"], FACE_CLASSES["gender"], FACE_CLASSES["age"]
FACE_AGE_THRESHOLDS = (30, 60)  # <30, 30-59, 60+


def cut(values, thresholds: Sequence[int]) -> np.ndarray:
    """The class of each value: 0 below thresholds[0], k from thresholds[k-1] on."""
    return np.digitize(np.asarray(values), list(thresholds)).astype(np.int64)


def encode_joint(labels: Sequence[np.ndarray], sizes: Sequence[int]) -> np.ndarray:
    """Mixed-radix code of per-head labels (first head most significant)."""
    code = np.zeros_like(np.asarray(labels[0]), dtype=np.int64)
    for label, size in zip(labels, sizes):
        code = code * size + np.asarray(label, dtype=np.int64)
    return code


def joint_label(heads: Sequence, preds: dict) -> np.ndarray:
    """The joint class of per-head predicted classes (``preds``: head name -> classes), e.g. the 18-class label;
    ``heads``: HeadConfigs."""
    return encode_joint([preds[h.name] for h in heads], [len(h.classes) for h in heads])


def joint_probabilities(probs: Sequence[np.ndarray]) -> np.ndarray:
    """Joint class probabilities as the product of the heads' probabilities, shape (N, prod(sizes))."""
    joint = np.asarray(probs[0])
    for p in probs[1:]:
        joint = (joint[:, :, None] * np.asarray(p)[:, None, :]).reshape(len(joint), -1)
    return joint


def joint_class_names(heads: Sequence) -> list[str]:
    names = [""]
    for h in heads:
        names = [f"{n}/{c}" if n else c for n in names for c in h.classes]
    return names

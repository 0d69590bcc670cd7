"""The heads and their joint label.

The joint label is the mixed-radix code of the heads in their declared order; for the face task
(mask, gender, age) that is the competition's 18-class label: 6*mask + 3*gender + age.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from multitask.config import HeadConfig

MASK_CLASSES = ["worn", "incorrect", "not_worn"]
GENDER_CLASSES = ["male", "female"]
AGE_CLASSES = ["<30", "30-59", "60+"]


def age_group(age, thresholds: Sequence[int] = (30, 60)) -> np.ndarray:
    """0: age < t0, 1: t0 <= age < t1, 2: age >= t1."""
    return np.digitize(np.asarray(age), list(thresholds)).astype(np.int64)


def encode_joint(labels: Sequence[np.ndarray], sizes: Sequence[int]) -> np.ndarray:
    """Mixed-radix code of per-head labels (first head most significant)."""
    code = np.zeros_like(np.asarray(labels[0]), dtype=np.int64)
    for label, size in zip(labels, sizes):
        code = code * size + np.asarray(label, dtype=np.int64)
    return code


def joint_probabilities(probs: Sequence[np.ndarray]) -> np.ndarray:
    """Joint class probabilities as the product of the heads' probabilities, shape (N, prod(sizes))."""
    joint = np.asarray(probs[0])
    for p in probs[1:]:
        joint = (joint[:, :, None] * np.asarray(p)[:, None, :]).reshape(len(joint), -1)
    return joint


def joint_class_names(heads: Sequence[HeadConfig]) -> list[str]:
    names = [""]
    for h in heads:
        names = [f"{n}/{c}" if n else c for n in names for c in h.classes]
    return names

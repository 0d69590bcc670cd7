"""Scores of predicted probabilities against true labels: per head and for the joint (18-class) label."""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from multitask.config import HeadConfig
from multitask.tasks import joint_class_names, joint_label, joint_probabilities

JOINT = "joint"


def joint_name(heads: Sequence[HeadConfig]) -> str:
    """How reports call the joint label: '18-class' for the face task."""
    n = int(np.prod([len(h.classes) for h in heads]))
    return f"{n}-class" if len(heads) > 1 else heads[0].name


def label(key: str, heads: Sequence[HeadConfig]) -> str:
    """How reports call a score's key: the head's name, or the joint label's ('18-class')."""
    return joint_name(heads) if key == JOINT else key


def class_scores(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict:
    """Macro-F1 and accuracy (as scikit-learn computes them on these labels) and per-class P/R/F1."""
    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "f1_macro": float(f1_score(y_true, y_pred, average="macro")),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(classes)},
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def score(heads: Sequence[HeadConfig], targets: Dict[str, np.ndarray], probs: Dict[str, np.ndarray]) -> dict:
    """Scores per head and for the joint label over ``heads`` (in their declared order).

    Rows whose target is -1 for a head are left out of that head's scores and of the joint's."""
    out = {}
    for h in heads:
        valid = targets[h.name] >= 0
        out[h.name] = class_scores(targets[h.name][valid], probs[h.name][valid].argmax(1), h.classes)
    if len(heads) > 1:
        valid = np.all([targets[h.name] >= 0 for h in heads], axis=0)
        true = joint_label(heads, {h.name: targets[h.name][valid] for h in heads})
        pred = joint_probabilities([probs[h.name][valid] for h in heads]).argmax(1)
        out[JOINT] = class_scores(true, pred, joint_class_names(heads))
    return out


def selection_score(scores: dict) -> float:
    """The number a fold keeps its best epoch by: the joint macro-F1 (or the single head's)."""
    return scores[JOINT]["f1_macro"] if JOINT in scores else next(iter(scores.values()))["f1_macro"]

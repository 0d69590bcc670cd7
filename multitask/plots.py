"""The report's pictures: confusion matrices and learning curves, as PNG files."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen before pyplot loads)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from multitask.config import HeadConfig  # noqa: E402
from multitask.metrics import JOINT, label  # noqa: E402
from multitask.tasks import joint_class_names  # noqa: E402


def plot_confusion(matrix, classes: Sequence[str], title: str, path: Path) -> None:
    m = np.asarray(matrix, dtype=float)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * n + 2), max(3.5, 0.45 * n + 1.5)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90 if n > 6 else 0, fontsize=7 if n > 6 else 9)
    ax.set_yticks(range(n), classes, fontsize=7 if n > 6 else 9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 18:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=6 if n > 6 else 9,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(metrics: pd.DataFrame, title: str, path: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(metrics["epoch"], metrics["loss"], marker="o", label="train loss")
    a.set_xlabel("epoch")
    a.set_title("training loss")
    for col in [c for c in metrics.columns if c.startswith("val_f1_")]:
        b.plot(metrics["epoch"], metrics[col], marker="o", label=col.replace("val_f1_", ""))
    b.set_xlabel("epoch")
    b.set_title("validation macro-F1")
    b.set_ylim(0, 1)
    b.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_confusions(scores: dict, heads: Sequence[HeadConfig], out: Path, prefix: str = "") -> List[str]:
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for key, s in scores.items():
        classes = joint_class_names(heads) if key == JOINT else next(h.classes for h in heads if h.name == key)
        name = f"{prefix}confusion_{label(key, heads)}.png"
        plot_confusion(s["confusion"], classes, f"{label(key, heads)} (macro-F1 {s['f1_macro']:.3f})", out / name)
        names.append(name)
    return names

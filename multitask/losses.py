"""Per-head losses (label smoothing, class weights, focal), the terms on soft targets (person consistency, a
teacher's predictions), and mixup / CutMix on batches."""
from __future__ import annotations

import functools
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from multitask.config import AugmentConfig, HeadConfig, LossConfig
from multitask.heads import KINDS, kind


def inverse_frequency_weights(labels: np.ndarray, n_classes: int, rows: Optional[np.ndarray] = None
                              ) -> torch.Tensor:
    """Weights proportional to 1/count (mean 1 over present classes); unseen classes get 0. ``rows``: how much
    each label counts (e.g. its chance of being drawn in an epoch); 1 each when None."""
    rows = np.ones(len(labels)) if rows is None else rows
    counts = np.bincount(labels[labels >= 0], rows[labels >= 0], minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, 1.0 / np.where(counts > 0, counts, 1.0), 0.0)  # counts may be fractions
    w *= (counts > 0).sum() / max(w.sum(), 1e-12)
    return torch.tensor(w, dtype=torch.float32)


class MultiHeadLoss(nn.Module):
    """Weighted sum of one loss per active head (cross-entropy, or its kind's own loss: heads.py); targets of -1
    (no label) are ignored. ``soft_terms`` (``PersonConsistency``, ``TeacherAgreement``) add their weighted terms on
    the rows' soft targets: one matrix, each term's block after the one before, NaN rows where a term has none.
    ``loss.balance=uncertainty``: each head's weighted loss L_h becomes exp(-s_h) L_h + s_h with a learned
    ``log_variances`` s_h (its only parameters: the trainer gives them to the optimizer and the checkpoint)."""

    def __init__(self, heads: Sequence[str], loss_weights: Sequence[float], cfg: LossConfig,
                 class_weights: Optional[Dict[str, torch.Tensor]] = None, kinds: Optional[Sequence[str]] = None,
                 column: Optional[Dict[str, int]] = None, soft_terms: Sequence[nn.Module] = ()):
        """``column``: each head's column in the target matrix (default: the order of ``heads``)."""
        super().__init__()
        self.heads, self.loss_weights = list(heads), list(loss_weights)
        self.column = dict(column) if column is not None else {h: i for i, h in enumerate(self.heads)}
        self.kinds = dict(zip(self.heads, kinds or ["ce"] * len(self.heads)))
        self.smoothing, self.gamma = cfg.label_smoothing, cfg.focal_gamma
        self.soft_terms = nn.ModuleList(soft_terms)
        self.log_variances = (nn.Parameter(torch.zeros(len(self.heads))) if cfg.balance == "uncertainty"
                              else None)
        for name, w in (class_weights or {}).items():
            self.register_buffer(f"w_{name}", w)

    def _head_loss(self, name: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = getattr(self, f"w_{name}", None)
        valid = target >= 0
        if not valid.any():
            return logits.sum() * 0.0
        logits, target = logits[valid].float(), target[valid]
        own_loss = KINDS[self.kinds[name]].loss
        if own_loss is not None:
            return own_loss(logits, target).mean()
        ce = F.cross_entropy(logits, target, weight=weight, label_smoothing=self.smoothing, reduction="none")
        if self.gamma > 0:
            p_true = logits.softmax(1).gather(1, target[:, None]).squeeze(1)
            ce = ce * (1 - p_true).pow(self.gamma)
        norm = weight[target].sum() if weight is not None else torch.tensor(float(len(target)))
        return ce.sum() / norm.clamp_min(1e-12)

    def forward(self, logits: Dict[str, torch.Tensor], targets: torch.Tensor,
                targets_b: Optional[torch.Tensor] = None, lam: float = 1.0,
                soft: Optional[torch.Tensor] = None):
        """(total loss, per-head losses and per soft term its value); with mixing, lam * loss(targets) +
        (1 - lam) * loss(targets_b); with ``soft`` (the rows' soft targets), the ``soft_terms``."""
        parts = {}
        for name in self.heads:
            t = targets[:, self.column[name]]
            loss = self._head_loss(name, logits[name], t)
            if targets_b is not None and lam < 1.0:
                loss = lam * loss + (1 - lam) * self._head_loss(name, logits[name], targets_b[:, self.column[name]])
            parts[name] = loss
        weighted = [w * parts[n] for n, w in zip(self.heads, self.loss_weights)]
        if self.log_variances is None:
            total = sum(weighted)
        else:
            s = self.log_variances
            total = sum(torch.exp(-s[i]) * loss + s[i] for i, loss in enumerate(weighted))
        start = 0
        for term in self.soft_terms if soft is not None else ():
            block = soft[:, start:start + term.width]
            start += term.width
            valid = ~torch.isnan(block[:, 0])  # a row without this term's target: NaN
            if valid.any():
                parts[term.name] = term({name: x[valid] for name, x in logits.items()}, block[valid])
            else:  # a zero that keeps every head in the graph (DDP expects each parameter's gradient)
                parts[term.name] = sum(x.sum() * 0.0 for x in logits.values())
            total = total + term.weight * parts[term.name]
        return total, parts

    def balance(self) -> Dict[str, float]:
        """Each head's learned weight exp(-s_h) (``loss.balance=uncertainty``; none otherwise), for metrics.csv."""
        if self.log_variances is None:
            return {}
        return {f"balance_{h}": float(torch.exp(-v)) for h, v in zip(self.heads, self.log_variances.detach())}


class PersonConsistency(nn.Module):
    """KL(person's target || photo's prediction) at temperature T (scaled by T^2, so that its gradients keep their
    size as T changes), summed over the heads; ``columns``: each head's columns in the person targets
    (``person_targets``); ``MultiHeadLoss`` passes only the rows that have a target."""

    name = "consistency"

    def __init__(self, columns: Dict[str, slice], weight: float, temperature: float):
        super().__init__()
        self.columns, self.weight, self.temperature = dict(columns), weight, temperature
        self.width = max(s.stop for s in self.columns.values())

    def forward(self, logits: Dict[str, torch.Tensor], person: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        return sum(F.kl_div((logits[name].float() / t).log_softmax(1), person[:, cols], reduction="batchmean") * t * t
                   for name, cols in self.columns.items())


class TeacherAgreement(nn.Module):
    """KL(teachers' class probabilities || the model's), summed over ``heads``, whose kinds give class
    probabilities (heads.py: the classes cut from a value head's distribution too); ``columns``: each head's
    columns in the teacher targets (``teacher_targets``); ``MultiHeadLoss`` passes only the rows a teacher predicted."""

    name = "teacher"

    def __init__(self, heads: Sequence[HeadConfig], weight: float):
        super().__init__()
        self.heads, self.weight = list(heads), weight
        widths = np.cumsum([0] + [len(h.classes) for h in self.heads])
        self.columns = {h.name: slice(int(a), int(b)) for h, a, b in zip(self.heads, widths[:-1], widths[1:])}
        self.width = int(widths[-1])

    def forward(self, logits: Dict[str, torch.Tensor], teacher: torch.Tensor) -> torch.Tensor:
        return sum(F.kl_div(kind(h).probabilities(logits[h.name].float(), h.thresholds).clamp_min(1e-8).log(),
                            teacher[:, self.columns[h.name]], reduction="batchmean") for h in self.heads)


def person_targets(persons: np.ndarray, source: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Per row, the mean of ``probabilities`` (one row per ``source`` row: a person's unmasked photos) over the
    source rows of the same person, for that person's other rows; NaN for the source rows themselves and for
    persons without one."""
    out = np.full((len(persons), probabilities.shape[1]), np.nan, dtype=np.float32)
    mean = pd.DataFrame(probabilities).groupby(persons[source]).mean()
    have = ~source & np.isin(persons, mean.index)
    out[have] = mean.loc[persons[have]].to_numpy(dtype=np.float32)
    return out


def batch_mixer(aug: AugmentConfig, seed: int) -> Optional[Callable]:
    """``augment.mix`` as the callable ``train_one_epoch`` takes (``mix_batch`` with its own random stream), or
    None when mixing is off."""
    if aug.mix == "none":
        return None
    return functools.partial(mix_batch, aug=aug, gen=np.random.default_rng(seed))


def mix_batch(x: torch.Tensor, y: torch.Tensor, aug: AugmentConfig, gen: np.random.Generator):
    """(mixed images, targets, partner targets or None, lam) per ``augment.mix``."""
    if aug.mix == "none" or gen.random() >= aug.mix_prob or len(x) < 2:
        return x, y, None, 1.0
    perm = torch.from_numpy(gen.permutation(len(x)))
    h, w = x.shape[-2:]
    if aug.mix == "mixup":
        lam = float(gen.beta(aug.mix_alpha, aug.mix_alpha))
        return lam * x + (1 - lam) * x[perm], y, y[perm], lam
    x = x.clone()
    if aug.mix == "cutmix_vertical":
        # Left half of one photo, right half of another: both halves keep a face's layout.
        x[..., w // 2:] = x[perm][..., w // 2:]
        return x, y, y[perm], (w // 2) / w
    lam = float(gen.beta(aug.mix_alpha, aug.mix_alpha))
    ch, cw = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
    cy, cx = int(gen.integers(h)), int(gen.integers(w))
    y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, h)
    x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, w)
    x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return x, y, y[perm], 1 - (y1 - y0) * (x1 - x0) / (h * w)

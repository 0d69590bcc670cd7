"""Learning age from years, not only from three bins (``heads[i].loss`` for the age head).

- ``ce``: softmax over the groups (<30, 30-59, 60+): a 29- and an 18-year-old are the same class.
- ``ordinal``: CORAL-style cumulative logits, one per threshold, P(group > k); the order of the groups is built in.
- ``dldl``: a distribution over years 0..99 (DLDL-v2): KL divergence to a Gaussian around the true age, plus the
  L1 error of the expected age; a 31-year-old is close to 29, far from 59.
- ``regression``: the age in years (smooth L1, in decades).

Whatever the head outputs, ``class_probabilities`` turns it into probabilities of the groups that sum to 1 and
agree with the bins; the report, the 18-class product, CAM targets, the dashboard and predict all use those.
``expected_years`` gives the predicted age where the head predicts years (dldl, regression).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from multitask.config import YEAR_LOSSES

YEARS = 100  # dldl: ages 0..99
SIGMA = 3.0  # dldl: spread of the target distribution, in years; regression: spread of the group probabilities
DECADE = 10.0


def output_size(loss: str, n_classes: int) -> int:
    return {"ce": n_classes, "ordinal": n_classes - 1, "dldl": YEARS, "regression": 1}[loss]


def uses_years(loss: str) -> bool:
    """Does this loss train on the age in years (rather than the group)?"""
    return loss in YEAR_LOSSES


def class_probabilities(loss: str, logits: torch.Tensor, thresholds: Sequence[int]) -> torch.Tensor:
    """(N, groups) probabilities from a head's raw outputs; rows sum to 1, and the most likely group is the one
    the outputs point at (the group of the expected age, or the last threshold passed)."""
    logits = logits.float()
    if loss == "ce":
        return logits.softmax(1)
    if loss == "ordinal":
        above = torch.sigmoid(logits)  # P(group > k), k = 0..K-2
        # rank-consistent even if the logits are not: a running minimum (written out, not cummin, so that the
        # decoding exports to ONNX inside the graph)
        above = torch.stack([above[:, :k + 1].amin(1) for k in range(above.shape[1])], 1)
        ones, zeros = torch.ones_like(above[:, :1]), torch.zeros_like(above[:, :1])
        return torch.cat([ones, above], 1) - torch.cat([above, zeros], 1)
    if loss == "dldl":  # the probability of each group's years, as a product with a constant 0/1 matrix
        return logits.softmax(1) @ group_members(thresholds, logits.device)
    # regression: a Gaussian around the predicted age, cut at the bins (its CDF written with erf, for export)
    mean = expected_years(loss, logits)
    cuts = torch.tensor([float(t) - 0.5 for t in thresholds], device=logits.device)
    cdf = 0.5 * (1 + torch.special.erf((cuts[None] - mean[:, None]) / (SIGMA * 2 ** 0.5)))
    cdf = torch.cat([torch.zeros_like(mean[:, None]), cdf, torch.ones_like(mean[:, None])], 1)
    return cdf[:, 1:] - cdf[:, :-1]


def group_members(thresholds: Sequence[int], device=None) -> torch.Tensor:
    """YEARS x groups: 1 where a year (0..99) falls in the group."""
    years = torch.arange(YEARS, device=device)[:, None]
    edges = torch.tensor([0, *thresholds, YEARS], device=device)
    return ((years >= edges[:-1][None]) & (years < edges[1:][None])).float()


def expected_years(loss: str, logits: torch.Tensor) -> Optional[torch.Tensor]:
    if loss == "dldl":
        return (logits.float().softmax(1) * torch.arange(YEARS, device=logits.device)).sum(1)
    if loss == "regression":
        return logits.float()[:, 0] * DECADE + 40.0
    return None


def age_loss(loss: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample loss of an ordinal / dldl / regression head. ``target``: the group (ordinal) or the age in
    years (dldl, regression); rows without a label are filtered out by the caller."""
    logits = logits.float()
    if loss == "ordinal":
        levels = torch.arange(logits.shape[1], device=logits.device)
        above = (target[:, None] > levels[None]).float()
        return F.binary_cross_entropy_with_logits(logits, above, reduction="none").sum(1)
    years = target.float().clamp(0, YEARS - 1)
    if loss == "dldl":
        grid = torch.arange(YEARS, device=logits.device, dtype=torch.float32)
        wanted = torch.exp(-0.5 * ((grid[None] - years[:, None]) / SIGMA) ** 2)
        wanted = wanted / wanted.sum(1, keepdim=True)
        log_p = logits.log_softmax(1)
        kl = (wanted * (wanted.clamp_min(1e-12).log() - log_p)).sum(1)
        return kl + (expected_years(loss, logits) - years).abs() / DECADE
    return F.smooth_l1_loss(expected_years(loss, logits) / DECADE, years / DECADE, reduction="none")

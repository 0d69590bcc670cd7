"""Head kinds: how a head learns, how wide its layer is and how its outputs are read.

Each head of the config names its kind (``heads[i].kind``). Whatever the kind, ``probabilities`` turns the head's
raw outputs into class probabilities that sum to 1 and agree with the classes the outputs point at; the report,
the joint label, CAM targets, the dashboard, predict and the export read only those, plus ``value`` (e.g. the
age in years) where the kind predicts one. A new kind is one entry in ``KINDS``: nothing else in the package
branches on a kind or on a head's name.

- ``ce``: softmax over the classes (for the age head a 29- and an 18-year-old are the same class).
- ``ordinal``: CORAL-style cumulative logits, one per threshold, P(class > k): the order of the classes is built in.
- ``dldl``: a distribution over the values 0..99 (DLDL-v2): KL divergence to a Gaussian around the true value plus
  the L1 error of the expected value; a 31-year-old is close to 29, far from 59.
- ``regression``: the value itself (smooth L1, in decades around 40).

Kinds that predict a value learn from the head's ``value_column`` (e.g. ``age``) and cut their prediction into the
classes at the head's ``thresholds``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from multitask.errors import ConfigError

if TYPE_CHECKING:  # config imports this module to check heads; at run time the dependency is one way
    from multitask.config import Config, HeadConfig

YEARS = 100  # dldl: values 0..99
SIGMA = 3.0  # dldl: spread of the target distribution; regression: spread of the class probabilities
DECADE = 10.0


@dataclass(frozen=True)
class HeadKind:
    doc: str  # one line for the config reference
    outputs: Callable[[int], int]  # the head layer's width for a head of this many classes
    probabilities: Callable[[torch.Tensor, Sequence[int]], torch.Tensor]  # (raw outputs, thresholds) -> N x classes
    # Per-photo loss of (raw outputs, targets); None: cross-entropy with label smoothing, class weights and focal
    # weighting (losses.py), the only kind the class weights and ``prior: training`` apply to
    loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    # The predicted value (N) from raw outputs; a kind with one learns from the head's value_column, not its class
    value: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    value_range: Optional[Tuple[int, int]] = None  # the values the kind can predict; thresholds fall inside
    cam_on_logit: bool = False  # CAM explains the class's logit (a softmax's usual target), else its probability
    softmax_outputs: bool = False  # the raw outputs are the logits of one distribution (loss.person_consistency)
    # Extra scores the report adds for heads of this kind (report.HEAD_METRICS), where the head declares what
    # they need (``absent`` for on_accuracy, ``value_column`` for value_mae)
    metrics: Tuple[str, ...] = ()

    @property
    def cross_entropy(self) -> bool:
        return self.loss is None


def softmax(logits: torch.Tensor, thresholds: Sequence[int]) -> torch.Tensor:
    return logits.float().softmax(1)


def ordinal_probabilities(logits: torch.Tensor, thresholds: Sequence[int]) -> torch.Tensor:
    above = torch.sigmoid(logits.float())  # P(class > k), k = 0..K-2
    # rank-consistent even if the logits are not: a running minimum (written out, not cummin, so that the
    # decoding exports to ONNX inside the graph)
    above = torch.stack([above[:, :k + 1].amin(1) for k in range(above.shape[1])], 1)
    ones, zeros = torch.ones_like(above[:, :1]), torch.zeros_like(above[:, :1])
    return torch.cat([ones, above], 1) - torch.cat([above, zeros], 1)


def ordinal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    levels = torch.arange(logits.shape[1], device=logits.device)
    above = (target[:, None] > levels[None]).float()
    return F.binary_cross_entropy_with_logits(logits.float(), above, reduction="none").sum(1)


def group_members(thresholds: Sequence[int], device=None) -> torch.Tensor:
    """YEARS x classes: 1 where a value (0..99) falls in the class."""
    years = torch.arange(YEARS, device=device)[:, None]
    edges = torch.tensor([0, *thresholds, YEARS], device=device)
    return ((years >= edges[:-1][None]) & (years < edges[1:][None])).float()


def distribution_value(logits: torch.Tensor) -> torch.Tensor:
    return (logits.float().softmax(1) * torch.arange(YEARS, device=logits.device)).sum(1)


def distribution_probabilities(logits: torch.Tensor, thresholds: Sequence[int]) -> torch.Tensor:
    # the probability of each class's values, as a product with a constant 0/1 matrix
    return logits.float().softmax(1) @ group_members(thresholds, logits.device)


def distribution_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    years = target.float().clamp(0, YEARS - 1)
    grid = torch.arange(YEARS, device=logits.device, dtype=torch.float32)
    wanted = torch.exp(-0.5 * ((grid[None] - years[:, None]) / SIGMA) ** 2)
    wanted = wanted / wanted.sum(1, keepdim=True)
    log_p = logits.float().log_softmax(1)
    kl = (wanted * (wanted.clamp_min(1e-12).log() - log_p)).sum(1)
    return kl + (distribution_value(logits) - years).abs() / DECADE


def regression_value(logits: torch.Tensor) -> torch.Tensor:
    return logits.float()[:, 0] * DECADE + 40.0


def regression_probabilities(logits: torch.Tensor, thresholds: Sequence[int]) -> torch.Tensor:
    # a Gaussian around the predicted value, cut at the thresholds (its CDF written with erf, for export)
    mean = regression_value(logits)
    cuts = torch.tensor([float(t) - 0.5 for t in thresholds], device=logits.device)
    cdf = 0.5 * (1 + torch.special.erf((cuts[None] - mean[:, None]) / (SIGMA * 2 ** 0.5)))
    cdf = torch.cat([torch.zeros_like(mean[:, None]), cdf, torch.ones_like(mean[:, None])], 1)
    return cdf[:, 1:] - cdf[:, :-1]


def regression_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    years = target.float().clamp(0, YEARS - 1)
    return F.smooth_l1_loss(regression_value(logits) / DECADE, years / DECADE, reduction="none")


KINDS = {
    "ce": HeadKind("softmax over the classes", outputs=lambda n: n, probabilities=softmax, cam_on_logit=True,
                   softmax_outputs=True, metrics=("on_accuracy",)),
    "ordinal": HeadKind("cumulative logits P(class > k): the classes' order built in", outputs=lambda n: n - 1,
                        probabilities=ordinal_probabilities, loss=ordinal_loss),
    "dldl": HeadKind("a distribution over the value 0..99 (value_column), cut at the thresholds",
                     outputs=lambda n: YEARS, probabilities=distribution_probabilities, loss=distribution_loss,
                     value=distribution_value, value_range=(0, YEARS - 1), softmax_outputs=True,
                     metrics=("value_mae",)),
    "regression": HeadKind("the value itself (value_column), cut at the thresholds", outputs=lambda n: 1,
                           probabilities=regression_probabilities, loss=regression_loss, value=regression_value,
                           value_range=(0, YEARS - 1), metrics=("value_mae",)),
}


def kind(head: "HeadConfig") -> HeadKind:
    return KINDS[head.kind]


def value_heads(heads: Sequence["HeadConfig"]) -> List["HeadConfig"]:
    """The heads that predict a value (e.g. the age in years), not only a class."""
    return [h for h in heads if kind(h).value is not None]


def check_heads(cfg: "Config") -> None:
    """Each head's kind against what it needs; a ConfigError naming the key."""
    for i, h in enumerate(cfg.heads):
        if h.kind not in KINDS:
            raise ConfigError(f"heads.{i}.kind={h.kind!r}: must be one of {', '.join(KINDS)}")
        k = KINDS[h.kind]
        if h.thresholds and h.classes and len(h.thresholds) != len(h.classes) - 1:
            raise ConfigError(f"heads.{i}.thresholds={list(h.thresholds)}: one cut between each two classes "
                              f"({len(h.classes) - 1} for {list(h.classes)})")
        for key in ("thresholds", "train_thresholds"):
            cuts = getattr(h, key)
            if cuts and any(not a < b for a, b in zip(cuts, cuts[1:])):
                raise ConfigError(f"heads.{i}.{key}={list(cuts)}: each above the one before (every class needs "
                                  "values of its own)")
        if k.value is not None and not (h.value_column and h.thresholds):
            raise ConfigError(f"heads.{i}.kind={h.kind} learns a value: it needs heads.{i}.value_column and "
                              f"heads.{i}.thresholds (head {h.name} has "
                              f"{'no value_column' if not h.value_column else 'no thresholds'})")
        if k.value_range and any(not k.value_range[0] < t <= k.value_range[1] for t in h.thresholds):
            raise ConfigError(f"heads.{i}.thresholds={list(h.thresholds)}: kind={h.kind} cuts values "
                              f"{k.value_range[0]}..{k.value_range[1]}")
        if h.train_thresholds is not None and k.value is not None:
            raise ConfigError(f"heads.{i}.train_thresholds={list(h.train_thresholds)}: heads.{i}.kind={h.kind} "
                              "learns the value, not the classes, so training classes would change nothing; use it "
                              "with ce or ordinal")
        if h.train_thresholds is not None and not h.value_column:
            raise ConfigError(f"heads.{i}.train_thresholds: needs heads.{i}.value_column, the values to cut")
        if h.prior == "training" and (not k.cross_entropy or not cfg.loss.class_weights):
            raise ConfigError(f"heads.{i}.prior=training takes out the class weights a ce head learnt with, and "
                              + (f"heads.{i}.kind={h.kind}" if not k.cross_entropy else "loss.class_weights=false")
                              + " has none; leave it balanced")
        if h.absent is not None and h.classes and h.absent not in h.classes:
            raise ConfigError(f"heads.{i}.absent={h.absent!r}: not one of its classes {list(h.classes)}")

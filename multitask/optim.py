"""The optimizer and the learning rate, from ``OptimConfig`` alone.

The rate of an epoch is a pure function of the epoch and the config (nanoGPT's ``get_lr``): neither an
Adam -> SGD switch nor a resume can shift it.
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch
from torch import nn

from multitask.config import OptimConfig
from multitask.model import MultiHeadNet


def lr_factor(o: OptimConfig, epoch: int, epochs: int) -> float:
    """The learning rate at ``epoch`` relative to the base rate: warmup, then step / cosine / constant."""
    if epoch < o.warmup_epochs:
        return (epoch + 1) / (o.warmup_epochs + 1)
    if o.scheduler == "step":
        return float(o.step_gamma ** (epoch // o.step_every))
    if o.scheduler == "cosine":
        span = max(1, epochs - o.warmup_epochs)
        return float(0.5 * (1 + np.cos(np.pi * (epoch - o.warmup_epochs) / span)) * 0.99 + 0.01)
    return 1.0


def uses_sgd(o: OptimConfig, epoch: int) -> bool:
    return o.optimizer == "sgd" or (o.sgd_after is not None and epoch >= o.sgd_after)


def learning_rates_at(o: OptimConfig, lrs: tuple[float, float], epoch: int, epochs: int) -> tuple[float, float]:
    """(trunk, heads) rates of an epoch of a stage of ``epochs`` epochs, from the base rates ``lrs``."""
    scale = lr_factor(o, epoch, epochs) * (o.sgd_lr_scale if o.sgd_after is not None and uses_sgd(o, epoch) else 1.0)
    return lrs[0] * scale, lrs[1] * scale


def param_groups(model: MultiHeadNet, lr_trunk: float, lr_heads: float, weight_decay: float,
                 loss: Sequence[nn.Parameter] = ()) -> List[dict]:
    """The trunk's and the heads' groups; ``loss``: the loss's own parameters (``loss.balance``), learned at the
    heads' rate, without weight decay (it would pull each head's weight towards 1)."""
    groups = [
        {"params": list(model.trunk.parameters()), "lr": lr_trunk, "weight_decay": weight_decay, "name": "trunk"},
        {"params": list(model.heads.parameters()), "lr": lr_heads, "weight_decay": weight_decay, "name": "heads"},
    ]
    if loss:
        groups.append({"params": list(loss), "lr": lr_heads, "weight_decay": 0.0, "name": "loss"})
    return groups


def make_optimizer(o: OptimConfig, model: MultiHeadNet, lrs: tuple[float, float], sgd: bool,
                   loss: Sequence[nn.Parameter] = ()):
    groups = param_groups(model, *lrs, o.weight_decay, loss)
    if sgd:
        return torch.optim.SGD(groups, momentum=o.momentum, nesterov=True)
    cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
    return cls(groups)


def optimizer_for_epoch(o: OptimConfig, model: MultiHeadNet, optimizer, lrs: tuple[float, float], epoch: int,
                        epochs: int, loss: Sequence[nn.Parameter] = ()):
    """(the optimizer for ``epoch`` with its rates set, those rates): a new SGD one the epoch Adam gives way. The
    loss's group follows the heads' rate."""
    if uses_sgd(o, epoch) and not isinstance(optimizer, torch.optim.SGD):
        optimizer = make_optimizer(o, model, lrs, True, loss)
    rates = learning_rates_at(o, lrs, epoch, epochs)
    for group, lr in zip(optimizer.param_groups, (*rates, rates[1])):
        group["lr"] = lr
    return optimizer, rates

"""One stage of one fold: its data and loss, the epochs (resuming from last.pt), the best model kept."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter

from multitask.config import Config, HeadConfig, StageConfig, config_dict, enabled_stages, final_stage, stage
from multitask.data.dataset import PhotoDataset
from multitask.data.sources import DataError, Problem
from multitask.data.table import eval_targets, training_targets
from multitask.distributed import barrier
from multitask.engine import loader_workers, make_loader, mean_over_views, train_one_epoch, weight_average
from multitask.folds import draw_per_person, draw_weights, stage_split
from multitask.heads import kind
from multitask.io import atomic_write_text
from multitask.losses import MultiHeadLoss, batch_mixer, inverse_frequency_weights
from multitask.metrics import score, selection_score
from multitask.model import MultiHeadNet, load_checkpoint
from multitask.optim import make_optimizer, optimizer_for_epoch, uses_sgd
from multitask.training.checkpoints import StageCheckpoints, grad_scaler
from multitask.training.context import Context, dataset, epoch_seed
from multitask.training.evaluate import validation_loader, validation_outputs, write_fold_oof
from multitask.training.soft_targets import person_consistency, stage_soft_targets, teacher_agreement


@dataclass
class StageData:
    """What one stage of one fold trains and validates on, and its loss."""

    stage: StageConfig
    heads: List[HeadConfig]  # the heads the stage trains
    train_rows: pd.DataFrame
    y_train: np.ndarray
    val_rows: pd.DataFrame
    y_val: np.ndarray
    weights: Dict[str, torch.Tensor]  # class weights of its ce heads
    loss_fn: MultiHeadLoss
    train_tf: object  # the stage's augmentation (reseeded every epoch)
    workers: int
    val_loader: DataLoader
    soft: Optional[np.ndarray] = None  # the rows' soft targets, one block per term of loss_fn (stage_soft_targets)


def stage_data(ctx: Context, fold: int, stage_no: int) -> StageData:
    cfg, spec = ctx.cfg, stage(ctx.cfg, stage_no)
    active = [h for h in cfg.heads if not spec.heads or h.name in spec.heads]
    train_rows, val_rows = stage_split(cfg, ctx.table, fold, stage_no)
    if train_rows.empty or val_rows.empty:
        raise DataError([Problem(str(ctx.run.root), f"fold {fold} stage {stage_no}: {len(train_rows)} training "
                                                    f"and {len(val_rows)} validation photos; need both")])
    y_train = training_targets(cfg, train_rows)
    weights = class_weights(cfg, active, y_train, draw_weights(train_rows["person_id"].to_numpy(),
                                                               spec.photos_per_person))
    terms = [person_consistency(cfg, ctx.table, active) if stage_no != enabled_stages(cfg)[0] else None,
             teacher_agreement(cfg, active)]
    loss_fn = stage_loss(cfg, active, weights, [t for t in terms if t is not None]).to(ctx.rt.device)
    train_tf = ctx.pre.train(spec.size)
    y_val = eval_targets(cfg, val_rows)
    workers = loader_workers(cfg.data.workers, ctx.rt.device, ctx.images is not None, ctx.world)
    val_loader = validation_loader(ctx, val_rows, y_val, ctx.pre.eval(size=spec.size), workers)
    return StageData(spec, active, train_rows, y_train, val_rows, y_val, weights, loss_fn, train_tf, workers,
                     val_loader)


def run_stage(ctx: Context, fold: int, stage_no: int, model: MultiHeadNet, lrs: tuple[float, float],
              writer: Optional[SummaryWriter]) -> MultiHeadNet:
    """Train one stage of one fold (resuming from its last.pt if there is one); returns the best model.

    Under torchrun every process trains its share of each epoch's batches (DistributedDataParallel) and
    validates its share of the photos; the predictions are gathered so every process sees the same scores and
    keeps the same best epoch, and rank 0 alone writes."""
    cfg, world = ctx.cfg, ctx.world
    name = f"fold {fold} stage {stage_no}"
    if ctx.run.stage_done(fold, stage_no).exists():
        model.load_state_dict(load_checkpoint(ctx.run.best(fold, stage_no))["model"])
        return model.to(ctx.rt.device)
    data = stage_data(ctx, fold, stage_no)
    # fp16 only for the final stage's model, the one a run keeps: an earlier one seeds the next unrounded
    saver = StageCheckpoints(ctx.run, fold, stage_no, cfg.train.weights_dtype if stage_no == final_stage(cfg)
                             else "fp32", config_dict(cfg))
    model = ctx.rt.place(model)
    data.soft = stage_soft_targets(ctx, fold, model, data, name)  # before a resume loads this stage's weights
    start, best_score, best_epoch, history = 0, -1.0, -1, []
    ckpt = saver.resume()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        start, best_score, best_epoch = ckpt["epoch"] + 1, ckpt["best_score"], ckpt["best_epoch"]
        torch.set_rng_state(ckpt["rng"])
        history = saver.history(start)
        ctx.log(f"{name}: resuming at epoch {start + 1}/{data.stage.epochs}")
    ema, optimizer = training_state(cfg, model, data, lrs, start, ckpt)
    kept = model if ema is None else ema.module  # the weights validated and saved
    net = wrap_for_training(ctx, model)
    scaler = grad_scaler(ctx.rt, ckpt)

    for epoch in range(start, data.stage.epochs):
        was_sgd = isinstance(optimizer, torch.optim.SGD)
        optimizer, rates = optimizer_for_epoch(cfg.optim, model, optimizer, lrs, epoch, data.stage.epochs,
                                               list(data.loss_fn.parameters()))
        if isinstance(optimizer, torch.optim.SGD) and not was_sgd:
            ctx.log(f"{name}: switching to SGD at epoch {epoch + 1}")
        tick = time.perf_counter()
        stats, photos = train_epoch(ctx, data, fold, stage_no, epoch, net, optimizer, scaler, ema)
        scores = score(data.heads, {h.name: data.y_val[:, i] for i, h in enumerate(cfg.heads)},
                       validation_outputs(ctx, kept, data.val_loader)[0])
        row = epoch_row(epoch, rates, stats, scores, time.perf_counter() - tick)
        history.append(row)
        value = selection_score(scores)
        improved = value > best_score
        if improved:
            best_score, best_epoch = value, epoch + 1
        if world.main:
            saver.save({"model": model.state_dict(), "ema": None if ema is None else ema.state_dict(),
                        "optimizer": optimizer.state_dict(), "sgd": isinstance(optimizer, torch.optim.SGD),
                        "scaler": None if scaler is None else scaler.state_dict(),
                        "epoch": epoch, "best_score": best_score, "best_epoch": best_epoch,
                        "loss": data.loss_fn.state_dict()},
                       history, kept if improved else None)
            log_scalars(writer, f"fold{fold}/stage{stage_no}", row)
        ctx.log(f"{name} epoch {epoch + 1}/{data.stage.epochs}  " + epoch_line(row, scores, improved)
                + f"  ({ctx.clock.tick(photos + len(data.val_rows))})")
    return finish_stage(ctx, fold, stage_no, model, data.val_rows, data.y_val, data.workers, best_epoch, best_score)


def training_state(cfg: Config, model: MultiHeadNet, data: StageData, lrs: tuple[float, float], start: int,
                   ckpt: Optional[dict]):
    """(the weight average or None, the optimizer) for a stage starting at epoch ``start``, from last.pt
    (``ckpt``) on a resume, as is the loss's own state (``loss.balance``); the model and its average keep the
    stage's class weights."""
    model.keep_class_weights(data.weights)
    ema = weight_average(model, cfg.optim.ema_decay)
    if ckpt is not None and data.loss_fn.log_variances is not None:
        data.loss_fn.load_state_dict(ckpt["loss"])
    if ema is not None and ckpt is not None:
        ema.load_state_dict(ckpt["ema"])
        ema.module.keep_class_weights(data.weights)
    optimizer = make_optimizer(cfg.optim, model, lrs, uses_sgd(cfg.optim, start), list(data.loss_fn.parameters()))
    if ckpt is not None and ckpt.get("sgd", False) == uses_sgd(cfg.optim, start):
        optimizer.load_state_dict(ckpt["optimizer"])
    return ema, optimizer


def train_epoch(ctx: Context, data: StageData, fold: int, stage_no: int, epoch: int, net: nn.Module, optimizer,
                scaler, ema) -> tuple[dict, int]:
    """(the epoch's training statistics, photos trained): the persons' photos drawn for the epoch, in the order
    and with the augmentation of the epoch's seed."""
    cfg = ctx.cfg
    seed = epoch_seed(cfg, fold, stage_no, epoch)
    drawn = draw_per_person(data.train_rows["person_id"].to_numpy(), data.stage.photos_per_person, seed)
    train_ds = dataset(ctx, data.train_rows.iloc[drawn], data.y_train[drawn], data.train_tf,
                       None if data.soft is None else data.soft[drawn])
    loader = epoch_loader(ctx, train_ds, data.train_tf, seed, data.workers)
    stats = train_one_epoch(net, loader, data.loss_fn, optimizer, ctx.rt, epoch + 1,
                            batch_mixer(cfg.augment, seed + ctx.world.rank), scaler,
                            cfg.train.progress and ctx.world.main,
                            desc=f"fold {fold} stage {stage_no} epoch {epoch + 1}", ema=ema)
    stats.update(data.loss_fn.balance())
    stats["images_per_s"] *= ctx.world.size  # every process trained as many photos
    return stats, len(train_ds)


def epoch_row(epoch: int, rates: tuple[float, float], stats: dict, scores: dict, seconds: float) -> dict:
    """The epoch's row of metrics.csv."""
    return {"epoch": epoch + 1, "lr_trunk": rates[0], "lr_heads": rates[1], **stats,
            **{f"val_f1_{k}": v["f1_macro"] for k, v in scores.items()},
            **{f"val_acc_{k}": v["accuracy"] for k, v in scores.items()}, "seconds": seconds}


def epoch_line(row: dict, scores: dict, improved: bool) -> str:
    f1s = "  ".join(f"{k} {v['f1_macro']:.3f}" for k, v in scores.items())
    return (f"loss {row['loss']:.3f}  val F1 {f1s}  lr {row['lr_heads']:.1e}  {row['images_per_s']:.0f} img/s  "
            f"{row['seconds']:.0f}s" + ("  *" if improved else ""))


def class_weights(cfg: Config, active: List[HeadConfig], y_train: np.ndarray, drawn: np.ndarray
                  ) -> Dict[str, torch.Tensor]:
    """Per head trained with cross-entropy, the inverse class frequency in the training rows, each row counted by
    its chance ``drawn`` of being in an epoch; none with loss.class_weights off."""
    column = {h.name: i for i, h in enumerate(cfg.heads)}
    return ({h.name: inverse_frequency_weights(y_train[:, column[h.name]], len(h.classes), drawn)
             for h in active if kind(h).cross_entropy} if cfg.loss.class_weights else {})


def stage_loss(cfg: Config, active: List[HeadConfig], weights: Dict[str, torch.Tensor],
               soft_terms: Sequence[nn.Module] = ()) -> MultiHeadLoss:
    """The loss over the stage's heads, with ``class_weights`` and the terms on soft targets."""
    column = {h.name: i for i, h in enumerate(cfg.heads)}
    return MultiHeadLoss([h.name for h in active], [h.loss_weight for h in active], cfg.loss, weights,
                         [h.kind for h in active], column, soft_terms)


def wrap_for_training(ctx: Context, model: MultiHeadNet) -> nn.Module:
    """The module the training steps call: DistributedDataParallel under torchrun (BatchNorm statistics over
    all processes with train.sync_bn), compiled with train.compile. ``model`` stays the plain network."""
    net: nn.Module = model
    if ctx.world.active:
        if ctx.cfg.train.sync_bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        device = ctx.rt.device
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(net) if ctx.cfg.train.compile else net


def epoch_loader(ctx: Context, train_ds: PhotoDataset, train_tf, seed: int, workers: int):
    """One epoch's shuffled batches, from the epoch's seed only (so a resume replays the same order); under
    torchrun each process gets its share."""
    world, batch = ctx.world, ctx.cfg.data.batch_size
    train_tf.set_random_seed(seed + world.rank)
    drop_last = len(train_ds) > batch * world.size
    sampler = (DistributedSampler(train_ds, world.size, world.rank, shuffle=True, seed=seed, drop_last=drop_last)
               if world.active else None)
    return make_loader(train_ds, batch, workers, ctx.rt.device, shuffle=True, seed=seed, drop_last=drop_last,
                       sampler=sampler)


def log_scalars(writer: SummaryWriter, prefix: str, row: dict) -> None:
    for k, v in row.items():
        if k != "epoch":
            writer.add_scalar(f"{prefix}/{k}", v, row["epoch"])
    writer.flush()


def finish_stage(ctx: Context, fold: int, stage_no: int, model: MultiHeadNet, val_rows, y_val, workers: int,
                 best_epoch: int, best_score: float) -> MultiHeadNet:
    """The stage's best model back in ``model``; the fold's out-of-fold predictions from it (final stage);
    done.json; last.pt removed."""
    run, world = ctx.run, ctx.world
    barrier(world)  # every process reads the best.pt rank 0 wrote
    model.load_state_dict(load_checkpoint(run.best(fold, stage_no))["model"])
    if stage_no == final_stage(ctx.cfg):
        # From the weights as saved and with predict's test-time views, so that predict reproduces oof.csv and
        # the report scores what predict gives (the epochs above are compared on the plain photo only).
        views = ctx.cfg.predict.views()
        probs, values = mean_over_views(views, lambda scale, flip: validation_outputs(
            ctx, model, validation_loader(ctx, val_rows, y_val, ctx.pre.eval(scale, flip), workers)))
        if world.main:
            write_fold_oof(ctx, fold, val_rows, y_val, probs, values, views=len(views))
    if world.main:
        atomic_write_text(run.stage_done(fold, stage_no),
                          json.dumps({"best_epoch": best_epoch, "best_score": best_score}))
        run.last(fold, stage_no).unlink(missing_ok=True)  # only needed to resume this stage; best.pt is the model
    return model

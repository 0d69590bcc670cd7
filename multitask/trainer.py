"""The trainer: cross-validation by person; for each fold the two stages, checkpoints, out-of-fold predictions.

Everything is written into the run directory (layout: ``multitask.run``) atomically, so kill -9 at any moment
leaves a run that ``--resume`` continues: finished folds and stages are kept, an interrupted stage restarts from
its last completed epoch.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter

from multitask import allocator
from multitask.config import (Config, ConfigError, HeadConfig, StageConfig, enabled_stages, extra_val_names,
                              final_stage, save_config, stage)
from multitask.data.dataset import PhotoDataset
from multitask.data.photoset import photo_set
from multitask.data.sources import DataError, Problem, age_thresholds
from multitask.data.table import (apply_policy, eval_targets, labeled_source, load_labeled, load_table, resolve_root,
                                  training_targets, with_found_classes)
from multitask.data.transforms import Preprocessing
from multitask.distributed import World, barrier, gather_rows
from multitask.engine import (Runtime, head_outputs, loader_workers, make_loader, mean_over_views, predict_logits,
                              predict_views, precision_note, resolve_device, train_one_epoch, weight_average)
from multitask.folds import (attach_folds, draw_per_person, draw_weights, make_folds, person_constant_heads,
                             stage_split)
from multitask.heads import kind
from multitask.io import atomic_to_csv, atomic_torch_save, atomic_write_text, writable_folder
from multitask.losses import (MultiHeadLoss, PersonConsistency, TeacherAgreement, batch_mixer,
                              inverse_frequency_weights, person_targets)
from multitask.metrics import score, selection_score
from multitask.model import MultiHeadNet, build_model, load_checkpoint
from multitask.optim import make_optimizer, optimizer_for_epoch, uses_sgd
from multitask.run import RunDir, prediction_frame, read_table, subgroup_columns
from multitask.teacher import load_teachers, target_columns, taught_heads, teacher_targets

Log = Callable[[str], None]


# --- one stage of one fold -------------------------------------------------------------------------------


@dataclass
class Context:
    cfg: Config
    run: RunDir
    table: pd.DataFrame  # with fold and _row (row in the image cache)
    images: Optional[np.ndarray]
    pre: Preprocessing
    rt: Runtime
    log: Log
    clock: Clock
    world: World
    teacher: Dict[int, pd.DataFrame]  # per fold to train, its training rows' teacher targets (fold_teacher_targets)


def dataset(ctx: Context, rows: pd.DataFrame, targets: np.ndarray, transform,
            soft: Optional[np.ndarray] = None) -> PhotoDataset:
    return PhotoDataset(rows["path"].tolist(), targets, transform, ctx.pre.framing, ctx.images,
                        rows["_row"].to_numpy() if ctx.images is not None else None, soft)


def epoch_seed(cfg: Config, fold: int, stage: int, epoch: int) -> int:
    return int(np.random.default_rng([cfg.train.seed, fold, stage, epoch]).integers(2**31))


class Clock:
    """Time left for the run, from the photos (training + validation passes) still to go and the pace so far."""

    def __init__(self, planned: int):
        self.planned, self.done, self.start = planned, 0, time.perf_counter()

    def tick(self, photos: int) -> str:
        self.done += photos
        pace = (time.perf_counter() - self.start) / max(self.done, 1)
        return f"~{max(self.planned - self.done, 0) * pace / 60:.1f} min left"


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


@dataclass
class StageCheckpoints:
    """The files of one stage of one fold: best.pt (the weights validated best, in ``dtype``), last.pt (all a
    resume needs, rewritten every epoch) and metrics.csv (one row per epoch)."""

    run: RunDir
    fold: int
    stage_no: int
    dtype: str
    config: dict  # the run's config as it started: a resume checks it

    def resume(self) -> Optional[dict]:
        last = self.run.last(self.fold, self.stage_no)
        return load_checkpoint(last) if last.exists() else None

    def history(self, epochs: int) -> List[dict]:
        return read_table(self.run.metrics(self.fold, self.stage_no), ["epoch"]).to_dict("records")[:epochs]

    def save(self, state: dict, history: List[dict], best: Optional[nn.Module]) -> None:
        """``state``: the epoch's model, ema, optimizer, epoch, best_score and best_epoch; ``best``: the weights to
        keep when the epoch scored best."""
        if best is not None:
            atomic_torch_save({"model": saved_weights(best, self.dtype), "epoch": state["epoch"],
                               "score": state["best_score"]}, self.run.best(self.fold, self.stage_no))
        atomic_to_csv(pd.DataFrame(history), self.run.metrics(self.fold, self.stage_no))
        atomic_torch_save({**state, "config": self.config, "rng": torch.get_rng_state()},
                          self.run.last(self.fold, self.stage_no))


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
                             else "fp32", fold_config(cfg))
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
                       validate(ctx, kept, data.val_loader)[0])
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


def grad_scaler(rt: Runtime, ckpt: Optional[dict]) -> Optional[torch.amp.GradScaler]:
    """fp16's loss scale (None in other precisions), carried over a resume as the optimizer's state is: a scale
    started over costs the first steps after a resume (skipped while it falls back to a workable value)."""
    if rt.dtype != torch.float16:
        return None
    scaler = torch.amp.GradScaler(rt.device.type)
    if ckpt is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return scaler


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
                         [h.loss for h in active], column, soft_terms)


def person_consistency(cfg: Config, table: pd.DataFrame, active: List[HeadConfig]) -> Optional[PersonConsistency]:
    """loss.person_consistency over the stage's heads that are the same on all of a person's photos and output
    one distribution (gender; age under ce or dldl); None when off or there are none."""
    if cfg.loss.person_consistency <= 0:
        return None
    constant = {h.name for h in person_constant_heads(table, cfg.heads)}
    heads = [h for h in active if h.name in constant and kind(h).softmax_outputs]
    widths = np.cumsum([0] + [kind(h).outputs(len(h.classes)) for h in heads])
    columns = {h.name: slice(int(a), int(b)) for h, a, b in zip(heads, widths[:-1], widths[1:])}
    return PersonConsistency(columns, cfg.loss.person_consistency, cfg.loss.consistency_temperature) if heads else None


def teacher_agreement(cfg: Config, active: List[HeadConfig]) -> Optional[TeacherAgreement]:
    """The term that learns the ``teacher`` runs' predictions over the stage's ``taught_heads``; None without
    teachers."""
    heads = taught_heads(active)
    return TeacherAgreement(heads, cfg.loss.teacher_weight) if cfg.teacher and heads else None


def stage_soft_targets(ctx: Context, fold: int, model: MultiHeadNet, data: StageData, name: str
                       ) -> Optional[np.ndarray]:
    """The training rows' soft targets: a block per term of the stage's loss, in its order; None without terms."""
    blocks = []
    for term in data.loss_fn.soft_terms:
        if isinstance(term, PersonConsistency):
            blocks.append(stage_person_targets(ctx, model, data, term))
        else:
            blocks.append(ctx.teacher[fold].loc[data.train_rows.index, target_columns(term.heads)].to_numpy())
            have = int((~np.isnan(blocks[-1][:, 0])).sum())
            ctx.log(f"{name}: teacher predictions for {have} of {len(data.train_rows)} training photos")
    return np.concatenate(blocks, axis=1) if blocks else None


def stage_person_targets(ctx: Context, model: MultiHeadNet, data: StageData, consistency: PersonConsistency
                         ) -> np.ndarray:
    """The training rows' person targets: ``model`` (the previous stage's) on each person's photos of the absent
    class (unmasked), softened by the temperature and averaged per person (``person_targets``)."""
    head = next(h for h in ctx.cfg.heads if h.absent is not None)
    rows = data.train_rows
    source = (rows[head.column] == head.classes.index(head.absent)).to_numpy()
    loader = validation_loader(ctx, rows[source], data.y_train[source], ctx.pre.eval(size=data.stage.size),
                               data.workers)
    parts = model.split(gathered_logits(ctx, model, loader))
    t = consistency.temperature
    probs = np.concatenate([(parts[name] / t).softmax(1).numpy() for name in consistency.columns], axis=1)
    return person_targets(rows["person_id"].to_numpy(), source, probs)


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


def validation_loader(ctx: Context, rows: pd.DataFrame, targets: np.ndarray, transform, workers: int):
    """The photos of ``rows`` in order; under torchrun each process loads its share (``validate`` gathers)."""
    ds = dataset(ctx, rows, targets, transform)
    sampler = DistributedSampler(ds, ctx.world.size, ctx.world.rank, shuffle=False) if ctx.world.active else None
    return make_loader(ds, ctx.cfg.data.batch_size * 2, workers, ctx.rt.device, sampler=sampler)


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
        probs, years = mean_over_views(views, lambda scale, flip: validate(
            ctx, model, validation_loader(ctx, val_rows, y_val, ctx.pre.eval(scale, flip), workers)))
        if world.main:
            write_fold_oof(ctx, fold, val_rows, y_val, probs, years, views=len(views))
    if world.main:
        atomic_write_text(run.stage_done(fold, stage_no),
                          json.dumps({"best_epoch": best_epoch, "best_score": best_score}))
        run.last(fold, stage_no).unlink(missing_ok=True)  # only needed to resume this stage; best.pt is the model
    return model


def gathered_logits(ctx: Context, model: MultiHeadNet, loader) -> torch.Tensor:
    """The model's outputs for a loader's photos, in order; under torchrun each process predicts its share and
    every process gets all rows."""
    logits = predict_logits(model, loader, ctx.rt)
    if ctx.world.active:
        logits = gather_rows(ctx.world, torch.as_tensor(list(loader.sampler)), logits, len(loader.dataset))
    return logits


def validate(ctx: Context, model: MultiHeadNet, loader) -> tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """Class probabilities (and years, for heads that predict them) per head for a loader's photos, in order."""
    return head_outputs(model, gathered_logits(ctx, model, loader))


def saved_weights(model: nn.Module, dtype: str) -> Dict[str, torch.Tensor]:
    """The state_dict to keep in best.pt: floating tensors in fp16 halve every run's size (the weights move by
    at most 1e-3 of their value; loading casts them back)."""
    state = model.state_dict()
    if dtype == "fp32":
        return state
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def fold_config(cfg: Config) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))


def oof_frame(cfg: Config, rows: pd.DataFrame, targets: np.ndarray, probs: Dict[str, np.ndarray],
              years: Optional[Dict[str, np.ndarray]] = None) -> pd.DataFrame:
    """The prediction table of validation rows: identity, true labels, probabilities, predictions, years."""
    keep = [c for c in ("path", "person_id", "fold", "age", "face_found", *subgroup_columns(cfg)) if c in rows]
    return prediction_frame(cfg.heads, rows[keep], probs, targets={h.name: targets[:, i] for i, h in
                                                                   enumerate(cfg.heads)}, years=years)


def write_fold_oof(ctx: Context, fold: int, rows, targets, probs, years, views: int) -> None:
    """fold<k>/oof.csv, with the number of test-time views its probabilities are the mean of."""
    atomic_to_csv(oof_frame(ctx.cfg, rows, targets, probs, years).assign(views=views), ctx.run.fold_oof(fold))


# --- extra validation sets: scored by every fold model, never trained on ---------------------------------


def load_extra_val(cfg: Config, log: Log, typical: Optional[Dict[tuple, tuple]] = None
                   ) -> Dict[str, tuple[pd.DataFrame, np.ndarray]]:
    """name -> (table, prepared images) of each extra validation set, framed like the training photos (the
    training set's ``typical`` face boxes); unreadable files follow data.on_bad_file."""
    sets = {}
    for name, root in zip(extra_val_names(cfg.data), cfg.data.extra_val):
        table, problems = load_labeled(Path(root), age_thresholds(cfg.heads))
        photos = photo_set(cfg, table, log, typical, cache=True)
        apply_policy(problems + photos.unreadable, cfg.data.on_bad_file, f"data.extra_val {root}")
        rows = photos.readable()
        sets[name] = (rows.drop(columns="_row").reset_index(drop=True), photos.selected(rows))
        log(f"extra validation set {name}: {len(rows)} photos from {root}")
    return sets


def score_extra_val(ctx: Context, fold: int, model: MultiHeadNet, sets) -> None:
    """fold<k>/extra_val/<name>.csv: the fold model's probabilities on each extra validation set, with the
    run's test-time views (predict.tta_flip, tta_scales; their number in ``views``), so the report's ensemble row
    is what predict gives."""
    cfg = ctx.cfg
    views = cfg.predict.views()
    for name, (table, images) in sets.items():
        targets = eval_targets(cfg, table)
        probs, years = predict_views(model, images, ctx.pre, views, ctx.rt, cfg.data.batch_size * 2)
        frame = oof_frame(cfg, table.assign(fold=fold), targets, probs, years).assign(views=len(views))
        atomic_to_csv(frame, ctx.run.extra_val(fold, name))


# --- the whole cross-validation --------------------------------------------------------------------------


def prepare_data(cfg: Config, run_dir: Path, log: Log, main: bool = True
                 ) -> tuple[pd.DataFrame, Optional[np.ndarray], Preprocessing]:
    """The table with every photo decoded once (into the cache) and the bad-file policy applied."""
    run = RunDir(run_dir)
    table, problems = load_table(cfg)
    photos = photo_set(cfg, table, log)
    if "face_found" in photos.table:
        sizes = ", ".join(f"{w}x{h}" for w, h in photos.pre.framing.typical) or "none"
        log(f"face found in {int(photos.table['face_found'].sum())} of {len(table)} photos; the others are framed "
            f"with the typical face of their size (known for {sizes}), else centred")
    problems = problems + photos.unreadable
    apply_policy(problems, cfg.data.on_bad_file, str(cfg.data.root or "synthetic data"))
    if problems:
        if main and not run.skipped.exists():
            atomic_to_csv(pd.DataFrame([p.__dict__ for p in problems]), run.skipped)
        log(f"skipped {len(problems)} problem file(s); listed in {run.skipped}")
    return photos.readable(), photos.images, photos.pre


def preflight(cfg: Config, run_dir: Path, world: World) -> None:
    """The start-up checks that need more than the config, made before a new run's folder is written, so that a
    start that fails leaves nothing behind: the device, the model and its weights, the extra validation sets, the
    teacher runs."""
    resolve_device(cfg.train.device, world)
    build_model(cfg.model, cfg.heads)
    for root in cfg.data.extra_val:
        labeled_source(Path(root))
    if cfg.teacher:
        load_teachers(cfg.teacher, taught_heads(cfg.heads), run_dir)


def open_run(cfg: Config, run_dir: Path, log: Log, world: World = World()
             ) -> tuple[Config, pd.DataFrame, Optional[np.ndarray], Preprocessing]:
    """The run's shared files, written once (by rank 0, by the first job): config.yaml, folds.csv, data.csv,
    skipped.csv. Later jobs and resumes read them and never write over them. Returns the config as the run
    trains it (an image folder's class names filled in) and the data, with folds."""
    cfg = with_found_classes(cfg)
    run = RunDir(run_dir)
    if world.main:
        if not run.is_run():
            preflight(cfg, run_dir, world)
        run.root.mkdir(parents=True, exist_ok=True)
        table, images, pre = prepare_data(cfg, run.root, log)  # rank 0 first: it builds the caches
        persons = table.loc[~table["extra"], "person_id"].nunique()
        if cfg.cv.folds > persons and not run.folds.exists():
            raise ConfigError(f"cv.folds={cfg.cv.folds}: the data has {persons} persons to hold out; at most that "
                              "many folds")
    barrier(world)
    if not world.main:
        table, images, pre = prepare_data(cfg, run.root, lambda s: None, main=False)
    if world.main:
        folds = read_table(run.folds, ["person_id", "fold"]) if run.folds.exists() else \
            make_folds(table, cfg.heads, cfg.cv.folds, cfg.cv.seed)
        if not run.config.exists():  # a new run: whether its teachers can teach each fold, before it is a run
            fold_teacher_targets(cfg, run.root, with_folds(cfg, table, folds, run.folds), cfg.cv.planned())
            save_config(cfg, run.config)
        if not run.folds.exists():
            atomic_to_csv(folds, run.folds)
    barrier(world)
    table = with_folds(cfg, table, read_table(run.folds, ["person_id", "fold"]), run.folds)
    if world.main and not run.data.exists():
        atomic_to_csv(table.drop(columns=["_row"]), run.data)
    return cfg, table, images, pre


def with_folds(cfg: Config, table: pd.DataFrame, folds: pd.DataFrame, source: Path) -> pd.DataFrame:
    """The table with each row's fold, without the fold the run leaves out (``cv.leave_out``)."""
    table = attach_folds(table, folds, source)
    return table[table["fold"] != cfg.cv.leave_out] if cfg.cv.leave_out is not None else table


@contextlib.contextmanager
def fold_lock(run: RunDir, fold: int):
    """One job per fold: an exclusive lock on fold<k>/lock for as long as the fold trains. The system drops it
    when the process ends, even by kill -9, so a resume can take the fold again."""
    path = run.lock(fold)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        owner = path.read_text().strip() or "another process"
        raise ConfigError(f"{path}: fold {fold} is being trained by {owner}; each fold is taken by one job") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        os.close(fd)


def folds_to_train(cfg: Config, run_dir: Path) -> List[int]:
    return [k for k in cfg.cv.planned() if not RunDir(run_dir).fold_done(k).exists()]


def run_cv(cfg: Config, run_dir: Path, log: Log = print, world: World = World()) -> None:
    """Train every fold of ``cv.run_folds`` (skipping finished ones) and write the fold results; the report is
    made after. Several jobs may share one run directory, each with its own folds."""
    log = log if world.main else (lambda s: None)
    torch.manual_seed(cfg.train.seed)
    cfg, table, images, pre = open_run(cfg, run_dir, log, world)
    rt = Runtime.from_config(cfg, world)
    todo = folds_to_train(cfg, run_dir)
    run = RunDir(run_dir)
    sizes = {s: [epoch_photos(cfg, table, k, s) for k in todo] for s in enabled_stages(cfg)}
    planned = sum(stage(cfg, s).epochs * sum(n) for s, n in sizes.items())
    teacher = fold_teacher_targets(cfg, run_dir, table, todo)
    ctx = Context(cfg, run, table, images, pre, rt, log, Clock(planned), world, teacher)
    extra_val = load_extra_val(cfg, log, pre.framing.typical) if world.main else {}  # rank 0 alone scores them
    log(f"{len(table)} photos of {table['person_id'].nunique()} persons; device {rt.device}"
        f"{f' x {world.size} processes' if world.active else ''}, "
        f"{precision_note(cfg.train, rt.device, cfg.model.arch, cfg.data.size)}, "
        f"size {cfg.data.size[0]}x{cfg.data.size[1]}; run {run_dir}")
    log(f"{len(todo)} fold(s) to train: " + ", ".join(
        f"stage {s} {stage(cfg, s).epochs} epochs of ~{int(np.mean(n)) if n else 0} photos"
        + stage_size_note(cfg, s) for s, n in sizes.items()) + "; the time left is shown after every epoch")
    for fold in sorted(set(cfg.cv.planned()) - set(todo)):
        log(f"fold {fold}: done, kept")
    if world.main:  # a folder that cannot be written fails here in one line, not in TensorBoard's writer thread
        writable_folder(run.tensorboard)
    writer = SummaryWriter(str(run.tensorboard)) if world.main else None
    try:
        for fold in todo:
            with fold_lock(run, fold) if world.main else contextlib.nullcontext():
                train_fold(ctx, fold, extra_val, writer)
    finally:
        if writer is not None:
            writer.close()


def fold_teacher_targets(cfg: Config, run_dir: Path, table: pd.DataFrame, folds: List[int]
                         ) -> Dict[int, pd.DataFrame]:
    """Each fold's teacher targets for its training rows (``teacher_targets``), read before any fold trains: a fold
    that no teacher model can teach without having trained on its validation people is refused at the start."""
    if not cfg.teacher:
        return {}
    teachers = load_teachers(cfg.teacher, taught_heads(cfg.heads), run_dir)
    targets = {}
    for k in folds:
        targets[k] = teacher_targets(teachers, table[table["fold"] != k], table[table["fold"] == k])
        if targets[k].isna().all(axis=None):
            raise ConfigError(f"teacher={list(cfg.teacher)}: no teacher model predicted fold {k}'s training photos "
                              f"without having trained on its validation people; fold {k}'s teachers are runs made "
                              f"with cv.leave_out={k} (same data, cv.folds and cv.seed)")
    return targets


def epoch_photos(cfg: Config, table: pd.DataFrame, fold: int, stage_no: int) -> int:
    """Photos one epoch of a stage trains and validates on (fewer training photos when it draws per person)."""
    train_rows, val_rows = stage_split(cfg, table, fold, stage_no)
    per_person = stage(cfg, stage_no).photos_per_person
    return round(draw_weights(train_rows["person_id"].to_numpy(), per_person).sum()) + len(val_rows)


def stage_size_note(cfg: Config, stage_no: int) -> str:
    size = stage(cfg, stage_no).size
    return f" at {size[0]}x{size[1]}" if size and list(size) != list(cfg.data.size) else ""


def train_fold(ctx: Context, fold: int, extra_val, writer: Optional[SummaryWriter]) -> None:
    cfg, world = ctx.cfg, ctx.world
    torch.manual_seed(cfg.train.seed + fold)
    model, loaded = build_model(cfg.model, cfg.heads)
    lrs = cfg.optim.learning_rates(loaded)
    if cfg.train.lr_scaling == "linear":
        lrs = (lrs[0] * world.size, lrs[1] * world.size)
    if world.main and not ctx.run.recorded_file.exists():
        atomic_write_text(ctx.run.recorded_file, json.dumps({
            "weights_loaded": loaded, "lr_trunk": lrs[0], "lr_heads": lrs[1], "processes": world.size,
            "batch_per_process": cfg.data.batch_size, "effective_batch": cfg.data.batch_size * world.size,
            "lr_scaling": cfg.train.lr_scaling, "device": str(ctx.rt.device), "precision": str(ctx.rt.dtype or "fp32"),
            "data_root": str(resolve_root(cfg).resolve()),
            "typical_face_boxes": RunDir.typical_face_boxes_record(ctx.pre.framing.typical),
            "config": fold_config(cfg),  # as the run started: a resume checks config.yaml against it
            "allocator": {"set": allocator.state, "large_blocks_mapped": allocator.large_blocks_mapped()},
        }, indent=1))
    ctx.log(f"fold {fold}: trunk {'weights loaded' if loaded else 'random init'}, "
            f"learning rates trunk {lrs[0]:.0e} heads {lrs[1]:.0e}")
    tick = time.perf_counter()
    for stage_no in enabled_stages(cfg):
        model = run_stage(ctx, fold, stage_no, model, lrs, writer)
    if world.main:
        score_extra_val(ctx, fold, model.eval(), extra_val)
        atomic_write_text(ctx.run.fold_done(fold), json.dumps({"seconds": time.perf_counter() - tick}))
        for earlier in enabled_stages(cfg)[:-1]:  # they only seed the next stage; the fold's model is the last's
            ctx.run.best(fold, earlier).unlink(missing_ok=True)
    barrier(world)

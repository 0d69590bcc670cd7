"""Cross-validation grouped by person: for each fold, the two stages, checkpoints, out-of-fold predictions.

Run directory layout (the contract with resume, predict, explain and the dashboard):

    config.yaml  folds.csv  data.csv  skipped.csv
    fold<k>/stage<s>/  best.pt  metrics.csv  done.json  (last.pt while the stage trains)
    fold<k>/oof.csv  fold<k>/done.json
    oof.csv  report.md  report.json  plots/  tb/

Every file is written atomically, so kill -9 at any moment leaves a run that ``--resume`` continues: finished
folds and stages are kept, an interrupted stage restarts from its last completed epoch.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedGroupKFold
from torch.utils.tensorboard import SummaryWriter

from multitask.config import Config, HeadConfig, StageConfig, extra_val_names, save_config
from multitask.data.dataset import PhotoDataset, cached_images, prepare_all, preparation
from multitask.data.sources import DataError, Problem
from multitask.data.table import apply_policy, load_labeled, load_table
from multitask.data.transforms import Prepare, eval_transform, train_transform
from multitask.engine import (head_probabilities, loader_workers, make_loader, predict_logits,
                              resolve_device, resolve_precision, train_one_epoch)
from multitask.io import atomic_to_csv, atomic_torch_save, atomic_write_text
from multitask.losses import MultiHeadLoss, inverse_frequency_weights
from multitask.metrics import score, selection_score
from multitask.model import MultiHeadNet, build_model, learning_rates, param_groups
from multitask.tasks import age_group

Log = Callable[[str], None]


# --- folds -----------------------------------------------------------------------------------------------


def person_constant_heads(table: pd.DataFrame, heads: List[HeadConfig]) -> List[HeadConfig]:
    """Heads whose label is the same on every photo of a person (gender, age; not mask)."""
    return [h for h in heads if table.groupby("person_id")[h.column].nunique().max() <= 1]


def make_folds(table: pd.DataFrame, heads: List[HeadConfig], n_folds: int, seed: int) -> pd.DataFrame:
    """person_id -> fold, by StratifiedGroupKFold: grouped by person, stratified on the person's labels that do
    not vary between their photos (gender x age for faces). Extra stage-1 sources get no fold (-1)."""
    main = table[~table["extra"]]
    strat_heads = person_constant_heads(main, heads)
    strat = np.zeros(len(main), dtype=np.int64)
    for h in strat_heads:
        strat = strat * len(h.classes) + main[h.column].to_numpy()
    n_people = main["person_id"].nunique()
    if n_people < n_folds:
        raise DataError([Problem("data", f"{n_people} persons cannot make {n_folds} folds")])
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = {}
    for k, (_, val) in enumerate(splitter.split(main, strat, groups=main["person_id"])):
        for pid in main["person_id"].iloc[val].unique():
            fold[pid] = k
    folds = pd.DataFrame({"person_id": list(fold), "fold": list(fold.values())})
    extra = table.loc[table["extra"], "person_id"].unique()
    return pd.concat([folds, pd.DataFrame({"person_id": extra, "fold": -1})], ignore_index=True)


def attach_folds(table: pd.DataFrame, folds: pd.DataFrame, source: Path) -> pd.DataFrame:
    merged = table.merge(folds.astype({"person_id": str}), on="person_id", how="left")
    missing = merged.loc[merged["fold"].isna(), "person_id"].unique()
    if len(missing):
        raise DataError([Problem(str(source), f"persons not in the run's folds (did the data change?): "
                                               f"{list(missing[:10])}")])
    return merged.astype({"fold": int})


# --- one stage of one fold -------------------------------------------------------------------------------


@dataclass
class Context:
    cfg: Config
    run_dir: Path
    table: pd.DataFrame  # with fold and _row (row in the image cache)
    images: Optional[np.ndarray]
    prepare: Prepare
    device: torch.device
    dtype: Optional[torch.dtype]
    log: Log
    clock: Clock


def stage_rows(table: pd.DataFrame, stage: StageConfig, heads: List[HeadConfig]) -> pd.Series:
    keep = pd.Series(True, index=table.index)
    by_name = {h.name: h for h in heads}
    for name, cls in stage.only.items():
        h = by_name[name]
        keep &= table[h.column] == h.classes.index(cls)
    return keep


def training_targets(cfg: Config, rows: pd.DataFrame) -> np.ndarray:
    """Per-head targets for training: the age head may use its own thresholds (e.g. 58+ learned as 60+)."""
    cols = []
    for h in cfg.heads:
        values = rows[h.column].to_numpy(dtype=np.int64)
        if h.column == "age_group" and cfg.data.train_age_thresholds:
            values = age_group(rows["age"].to_numpy(dtype=np.int64), cfg.data.train_age_thresholds)
        cols.append(values)
    return np.stack(cols, axis=1)


def eval_targets(cfg: Config, rows: pd.DataFrame) -> np.ndarray:
    return np.stack([rows[h.column].to_numpy(dtype=np.int64) for h in cfg.heads], axis=1)


def dataset(ctx: Context, rows: pd.DataFrame, targets: np.ndarray, transform) -> PhotoDataset:
    return PhotoDataset(rows["path"].tolist(), targets, transform, ctx.prepare, ctx.images,
                        rows["_row"].to_numpy() if ctx.images is not None else None)


def lr_factor(epoch: int, cfg: Config, epochs: int) -> float:
    o = cfg.optim
    if epoch < o.warmup_epochs:
        return (epoch + 1) / (o.warmup_epochs + 1)
    if o.scheduler == "step":
        return float(o.step_gamma ** (epoch // o.step_every))
    if o.scheduler == "cosine":
        span = max(1, epochs - o.warmup_epochs)
        return float(0.5 * (1 + np.cos(np.pi * (epoch - o.warmup_epochs) / span)) * 0.99 + 0.01)
    return 1.0


def make_optimizer(cfg: Config, model: MultiHeadNet, lrs: tuple[float, float], sgd: bool):
    groups = param_groups(model, *lrs, cfg.optim.weight_decay)
    if sgd or cfg.optim.optimizer == "sgd":
        scale = cfg.optim.sgd_lr_scale if sgd else 1.0
        for g in groups:
            g["lr"] *= scale
        return torch.optim.SGD(groups, momentum=cfg.optim.momentum, nesterov=True)
    cls = torch.optim.AdamW if cfg.optim.optimizer == "adamw" else torch.optim.Adam
    return cls(groups)


def make_scheduler(cfg: Config, optimizer, epochs: int, epoch: int):
    """LambdaLR positioned at ``epoch`` (its lr is the one for that epoch)."""
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, cfg, epochs))
    if epoch:
        sched.last_epoch = epoch - 1
        sched.step()
    return sched


def epoch_seed(cfg: Config, fold: int, stage: int, epoch: int) -> int:
    return int(np.random.default_rng([cfg.train.seed, fold, stage, epoch]).integers(2**31))


def stage_split(cfg: Config, t: pd.DataFrame, fold: int, stage_no: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows, validation rows) of one stage of one fold."""
    keep = stage_rows(t, getattr(cfg, f"stage{stage_no}"), cfg.heads)
    train_rows = t[keep & (t["fold"] != fold) & (~t["stage1_only"] | (stage_no == 1))]
    if cfg.data.drop_train_ages and "age" in t:
        train_rows = train_rows[~train_rows["age"].isin(cfg.data.drop_train_ages)]
    return train_rows, t[keep & (t["fold"] == fold)]


class Clock:
    """Time left for the run, from the photos (training + validation passes) still to go and the pace so far."""

    def __init__(self, planned: int):
        self.planned, self.done, self.start = planned, 0, time.perf_counter()

    def tick(self, photos: int) -> str:
        self.done += photos
        pace = (time.perf_counter() - self.start) / max(self.done, 1)
        return f"~{max(self.planned - self.done, 0) * pace / 60:.1f} min left"


def run_stage(ctx: Context, fold: int, stage_no: int, model: MultiHeadNet, lrs: tuple[float, float],
              writer: SummaryWriter) -> MultiHeadNet:
    """Train one stage of one fold (resuming from its last.pt if there is one); returns the best model."""
    cfg = ctx.cfg
    stage: StageConfig = getattr(cfg, f"stage{stage_no}")
    out = ctx.run_dir / f"fold{fold}" / f"stage{stage_no}"
    active = [h for h in cfg.heads if not stage.heads or h.name in stage.heads]
    if (out / "done.json").exists():
        model.load_state_dict(torch.load(out / "best.pt", map_location="cpu", weights_only=True)["model"])
        return model.to(ctx.device)

    train_rows, val_rows = stage_split(cfg, ctx.table, fold, stage_no)
    if train_rows.empty or val_rows.empty:
        raise DataError([Problem(str(ctx.run_dir), f"fold {fold} stage {stage_no}: {len(train_rows)} training and "
                                                   f"{len(val_rows)} validation photos; need both")])
    y_train = training_targets(cfg, train_rows)
    column = {h.name: i for i, h in enumerate(cfg.heads)}
    class_weights = ({h.name: inverse_frequency_weights(y_train[:, column[h.name]], len(h.classes)) for h in active}
                     if cfg.loss.class_weights else None)
    loss_fn = MultiHeadLoss([h.name for h in active], [h.loss_weight for h in active], cfg.loss,
                            class_weights).to(ctx.device)
    train_tf = train_transform(cfg.data, cfg.augment)
    train_ds = dataset(ctx, train_rows, y_train, train_tf)
    y_val = eval_targets(cfg, val_rows)
    workers = loader_workers(cfg.data.workers, ctx.device, ctx.images is not None)
    val_loader = make_loader(dataset(ctx, val_rows, y_val, eval_transform(cfg.data)), cfg.data.batch_size * 2,
                             workers, ctx.device)

    model = model.to(ctx.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    sgd_at = cfg.optim.sgd_after
    start, best_score, best_epoch, history = 0, -1.0, -1, []
    last = out / "last.pt"
    if last.exists():
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        start, best_score, best_epoch = ckpt["epoch"] + 1, ckpt["best_score"], ckpt["best_epoch"]
        torch.set_rng_state(ckpt["rng"])
        history = pd.read_csv(out / "metrics.csv").to_dict("records")[:start]
        ctx.log(f"fold {fold} stage {stage_no}: resuming at epoch {start + 1}/{stage.epochs}")
    use_sgd = sgd_at is not None and start >= sgd_at
    optimizer = make_optimizer(cfg, model, lrs, use_sgd)
    scheduler = make_scheduler(cfg, optimizer, stage.epochs, start)
    if last.exists():
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
    scaler = torch.amp.GradScaler() if ctx.dtype == torch.float16 else None

    for epoch in range(start, stage.epochs):
        if sgd_at is not None and epoch == sgd_at and not use_sgd:
            use_sgd = True
            optimizer = make_optimizer(cfg, model, lrs, True)
            scheduler = make_scheduler(cfg, optimizer, stage.epochs, epoch)
            ctx.log(f"fold {fold} stage {stage_no}: switching to SGD at epoch {epoch + 1}")
        seed = epoch_seed(cfg, fold, stage_no, epoch)
        train_tf.set_random_seed(seed)
        loader = make_loader(train_ds, cfg.data.batch_size, workers, ctx.device, shuffle=True, seed=seed,
                             drop_last=len(train_ds) > cfg.data.batch_size)
        tick = time.perf_counter()
        stats = train_one_epoch(model, loader, loss_fn, optimizer, ctx.device, ctx.dtype, cfg.train.channels_last,
                                column, cfg.augment, np.random.default_rng(seed), epoch + 1, scaler,
                                cfg.train.progress, desc=f"fold {fold} stage {stage_no} epoch {epoch + 1}")
        lrs = [g["lr"] for g in optimizer.param_groups]
        scheduler.step()
        probs = head_probabilities(model, predict_logits(model, val_loader, ctx.device, ctx.dtype,
                                                         cfg.train.channels_last))
        targets = {h.name: y_val[:, column[h.name]] for h in cfg.heads}
        scores = score(active, targets, probs)
        value = selection_score(scores)
        row = {"epoch": epoch + 1, "lr_trunk": lrs[0], "lr_heads": lrs[1], **stats,
               **{f"val_f1_{k}": v["f1_macro"] for k, v in scores.items()},
               **{f"val_acc_{k}": v["accuracy"] for k, v in scores.items()},
               "seconds": time.perf_counter() - tick}
        history.append(row)
        improved = value > best_score
        if improved:
            best_score, best_epoch = value, epoch + 1
            atomic_torch_save({"model": model.state_dict(), "epoch": epoch, "score": value}, out / "best.pt")
            if stage_no == final_stage(cfg):
                write_fold_oof(ctx, fold, val_rows, y_val, probs)
        atomic_to_csv(pd.DataFrame(history), out / "metrics.csv")
        atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "lr_scheduler": scheduler.state_dict(), "epoch": epoch, "config": fold_config(cfg),
                           "best_score": best_score, "best_epoch": best_epoch, "rng": torch.get_rng_state()}, last)
        tag = f"fold{fold}/stage{stage_no}"
        for k, v in row.items():
            if k != "epoch":
                writer.add_scalar(f"{tag}/{k}", v, epoch + 1)
        writer.flush()
        f1s = "  ".join(f"{k} {v['f1_macro']:.3f}" for k, v in scores.items())
        left = ctx.clock.tick(len(train_ds) + len(val_rows))
        ctx.log(f"fold {fold} stage {stage_no} epoch {epoch + 1}/{stage.epochs}  loss {stats['loss']:.3f}  "
                f"val F1 {f1s}  lr {lrs[1]:.1e}  {stats['images_per_s']:.0f} img/s  {row['seconds']:.0f}s"
                + ("  *" if improved else "") + f"  ({left})")
    atomic_write_text(out / "done.json", json.dumps({"best_epoch": best_epoch, "best_score": best_score}))
    last.unlink(missing_ok=True)  # optimizer state is only needed to resume this stage; best.pt is the model
    model.load_state_dict(torch.load(out / "best.pt", map_location="cpu", weights_only=True)["model"])
    return model


def fold_config(cfg: Config) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))


def final_stage(cfg: Config) -> int:
    return 2 if cfg.stage2.enabled else 1


def final_heads(cfg: Config) -> List[HeadConfig]:
    stage = getattr(cfg, f"stage{final_stage(cfg)}")
    return [h for h in cfg.heads if not stage.heads or h.name in stage.heads]


def oof_frame(cfg: Config, rows: pd.DataFrame, targets: np.ndarray, probs: Dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per photo: identity, true labels, every head's probabilities and prediction."""
    keep = [c for c in ("path", "person_id", "fold", "age", "face_found") if c in rows]
    df = rows[keep].reset_index(drop=True).copy()
    for i, h in enumerate(cfg.heads):
        if h.name not in probs:
            continue
        df[f"true_{h.name}"] = targets[:, i]
        for j, c in enumerate(h.classes):
            df[f"p_{h.name}_{c}"] = probs[h.name][:, j]
        df[f"pred_{h.name}"] = probs[h.name].argmax(1)
    return df


def write_fold_oof(ctx: Context, fold: int, rows, targets, probs) -> None:
    atomic_to_csv(oof_frame(ctx.cfg, rows, targets, probs), ctx.run_dir / f"fold{fold}" / "oof.csv")


# --- extra validation sets: scored by every fold model, never trained on ---------------------------------


def load_extra_val(cfg: Config, log: Log) -> Dict[str, tuple[pd.DataFrame, np.ndarray]]:
    """name -> (table, prepared images) of each extra validation set; unreadable files follow data.on_bad_file."""
    sets = {}
    for name, root in zip(extra_val_names(cfg.data), cfg.data.extra_val):
        table, problems = load_labeled(Path(root), cfg.data.age_thresholds)
        prepare, face_found = preparation(cfg.data, table["path"].tolist(), log)
        if face_found is not None:
            table = table.assign(face_found=face_found)
        images, unreadable = cached_images(table["path"].tolist(), prepare, Path(cfg.data.cache_dir), log)
        apply_policy(problems + unreadable, cfg.data.on_bad_file, f"data.extra_val {root}")
        keep = ~table["path"].isin({p.path for p in unreadable}).to_numpy()
        sets[name] = (table[keep].reset_index(drop=True), np.asarray(images)[keep])
        log(f"extra validation set {name}: {int(keep.sum())} photos from {root}")
    return sets


def score_extra_val(ctx: Context, fold: int, model: MultiHeadNet, sets) -> None:
    """fold<k>/extra_val/<name>.csv: the fold model's probabilities on each extra validation set."""
    cfg = ctx.cfg
    for name, (table, images) in sets.items():
        targets = eval_targets(cfg, table)
        ds = PhotoDataset(table["path"].tolist(), targets, eval_transform(cfg.data), ctx.prepare, images,
                          np.arange(len(table)))
        loader = make_loader(ds, cfg.data.batch_size * 2, 0, ctx.device)
        probs = head_probabilities(model, predict_logits(model, loader, ctx.device, ctx.dtype,
                                                         cfg.train.channels_last))
        frame = oof_frame(cfg, table.assign(fold=fold), targets, probs)
        atomic_to_csv(frame, ctx.run_dir / f"fold{fold}" / "extra_val" / f"{name}.csv")


# --- the whole cross-validation --------------------------------------------------------------------------


def prepare_data(cfg: Config, run_dir: Path, log: Log) -> tuple[pd.DataFrame, Optional[np.ndarray], Prepare]:
    """The table with every photo decoded once (into the cache) and the bad-file policy applied."""
    table, problems = load_table(cfg)
    paths = table["path"].tolist()
    prepare, face_found = preparation(cfg.data, paths, log)
    if face_found is not None:
        table = table.assign(face_found=face_found)
        log(f"face found in {int(face_found.sum())} of {len(paths)} photos; the others use the centre crop")
    if cfg.data.cache:
        images, unreadable = cached_images(paths, prepare, Path(cfg.data.cache_dir), log)
    else:
        images, unreadable = None, prepare_all(paths, prepare)
    problems = problems + unreadable
    apply_policy(problems, cfg.data.on_bad_file, str(cfg.data.root or "synthetic data"))
    table = table.assign(_row=np.arange(len(table)))
    if problems:
        atomic_to_csv(pd.DataFrame([p.__dict__ for p in problems]), run_dir / "skipped.csv")
        log(f"skipped {len(problems)} problem file(s); listed in {run_dir / 'skipped.csv'}")
        bad = {p.path for p in unreadable}
        table = table[~table["path"].isin(bad)]
    return table, images, prepare


def run_cv(cfg: Config, run_dir: Path, log: Log = print) -> None:
    """Train every fold (skipping finished ones) and write the fold results; the report is made after."""
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    table, images, prepare = prepare_data(cfg, run_dir, log)
    save_config(cfg, run_dir / "config.yaml")  # after the data: image folders fill in their class names
    folds_path = run_dir / "folds.csv"
    if folds_path.exists():
        folds = pd.read_csv(folds_path, dtype={"person_id": str})
    else:
        folds = make_folds(table, cfg.heads, cfg.cv.folds, cfg.cv.seed)
        atomic_to_csv(folds, folds_path)
    table = attach_folds(table, folds, folds_path)
    atomic_to_csv(table.drop(columns=["_row"]), run_dir / "data.csv")
    device = resolve_device(cfg.train.device)
    dtype = resolve_precision(cfg.train.precision, device)
    todo = [k for k in (cfg.cv.run_folds or range(cfg.cv.folds)) if not (run_dir / f"fold{k}" / "done.json").exists()]
    stages = [s for s in (1, 2) if getattr(cfg, f"stage{s}").enabled]
    sizes = {s: [sum(map(len, stage_split(cfg, table, k, s))) for k in todo] for s in stages}
    planned = sum(getattr(cfg, f"stage{s}").epochs * sum(n) for s, n in sizes.items())
    ctx = Context(cfg, run_dir, table, images, prepare, device, dtype, log, Clock(planned))
    extra_val = load_extra_val(cfg, log)
    log(f"{len(table)} photos of {table['person_id'].nunique()} persons; device {device}, "
        f"precision {dtype or 'fp32'}, size {cfg.data.size[0]}x{cfg.data.size[1]}; run {run_dir}")
    log(f"{len(todo)} fold(s) to train: " + ", ".join(
        f"stage {s} {getattr(cfg, f'stage{s}').epochs} epochs of ~{int(np.mean(n)) if n else 0} photos"
        for s, n in sizes.items()) + "; the time left is shown after every epoch")
    writer = SummaryWriter(str(run_dir / "tb"))
    try:
        for fold in cfg.cv.run_folds or range(cfg.cv.folds):
            if (run_dir / f"fold{fold}" / "done.json").exists():
                log(f"fold {fold}: done, kept")
                continue
            torch.manual_seed(cfg.train.seed + fold)
            model, loaded = build_model(cfg.model, cfg.heads)
            lrs = learning_rates(cfg.optim, loaded)
            log(f"fold {fold}: trunk {'weights loaded' if loaded else 'random init'}, "
                f"learning rates trunk {lrs[0]:.0e} heads {lrs[1]:.0e}")
            tick = time.perf_counter()
            for stage_no in (1, 2):
                if getattr(cfg, f"stage{stage_no}").enabled:
                    model = run_stage(ctx, fold, stage_no, model, lrs, writer)
            score_extra_val(ctx, fold, model.eval(), extra_val)
            atomic_write_text(run_dir / f"fold{fold}" / "done.json",
                              json.dumps({"seconds": time.perf_counter() - tick}))
    finally:
        writer.close()


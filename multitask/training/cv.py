"""The cross-validation: config -> the run's shared files (once) -> every fold to train, each stage in order.

Everything is written into the run directory (layout: ``multitask.run``) atomically, so kill -9 at any moment
leaves a run that ``--resume`` continues: finished folds and stages are kept, an interrupted stage restarts from
its last completed epoch. Several jobs may share one run directory, each with its own folds (a lock per fold).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import pandas as pd
import torch
from torch.utils.tensorboard import SummaryWriter

from multitask import allocator
from multitask.config import Config, ConfigError, enabled_stages, save_config, stage
from multitask.data.photoset import photo_set
from multitask.data.table import apply_policy, labeled_source, load_table, resolve_root, with_found_classes
from multitask.data.transforms import Preprocessing
from multitask.distributed import World, barrier
from multitask.engine import Runtime, precision_note, resolve_device
from multitask.folds import attach_folds, draw_weights, make_folds, stage_split
from multitask.io import atomic_to_csv, atomic_write_text, writable_folder
from multitask.model import build_model
from multitask.run import RunDir, read_table
from multitask.teacher import load_teachers, taught_heads
from multitask.training.context import Clock, Context, Log
from multitask.training.extra_val import load_extra_val, score_extra_val
from multitask.training.soft_targets import fold_teacher_targets
from multitask.training.stage import run_stage


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
    if world.main:
        ctx.run.record_start(cfg, weights_loaded=loaded, learning_rates=lrs, processes=world.size,
                             device=str(ctx.rt.device), precision=str(ctx.rt.dtype or "fp32"),
                             data_root=resolve_root(cfg).resolve(), typical=ctx.pre.framing.typical,
                             allocator={"set": allocator.state, "large_blocks_mapped": allocator.large_blocks_mapped()})
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

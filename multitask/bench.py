"""``python -m multitask.bench``: throughput and latency on this machine, side by side in one run.

(a) model-only training step on random tensors; (b) the full training pipeline from disk with the project's
defaults (cache, precision=auto, channels_last); (c) the same pipeline in the plain style (fp32, NCHW, decode
every photo every epoch, no cache); (d) inference; (e) one Grad-CAM grid (3 heads x 4 layers) against one
single-layer GradCAM call. Prints a table and writes bench.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def cli() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m multitask.bench", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="128x96,224x224", help="H x W training sizes to measure")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="batches per measurement")
    p.add_argument("--out", type=Path, default=Path("bench.json"))
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.precision=fp32")
    return p


if __name__ == "__main__":
    cli().parse_args()  # --help and usage errors answer before torch and the rest are imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pytorch_grad_cam import GradCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

from multitask.config import load_config  # noqa: E402
from multitask.cv import training_targets  # noqa: E402
from multitask.data.dataset import PhotoDataset, cached_images  # noqa: E402
from multitask.data.table import load_table  # noqa: E402
from multitask.data.transforms import Prepare, eval_transform, train_transform  # noqa: E402
from multitask.engine import (configure_threads, loader_workers, make_loader, predict_logits, resolve_precision,  # noqa: E402
                              train_one_epoch)
from multitask.explain import cam_grid  # noqa: E402
from multitask.losses import MultiHeadLoss  # noqa: E402
from multitask.model import build_model, param_groups  # noqa: E402


def timed(fn, warmup: int = 1, repeat: int = 3) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def setup(cfg):
    model, _ = build_model(cfg.model, cfg.heads)
    loss = MultiHeadLoss([h.name for h in cfg.heads], [1.0] * len(cfg.heads), cfg.loss)
    opt = torch.optim.Adam(param_groups(model, 1e-3, 1e-3, 0.0))
    return model, loss, opt


def model_only(cfg, batch: int, steps: int, dtype, channels_last: bool) -> float:
    """(a) images/s of forward + backward + step on random tensors."""
    model, loss_fn, opt = setup(cfg)
    model.train()
    x = torch.randn(batch, 3, *cfg.data.size)
    y = torch.stack([torch.randint(0, len(h.classes), (batch,)) for h in cfg.heads], 1)
    column = {h.name: i for i, h in enumerate(cfg.heads)}
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    def step():
        ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
        with ctx:
            loss, _ = loss_fn(model.split(model(x)), y, column)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return batch / timed(step, 1, steps)


def pipeline(cfg, table, images, batch: int, steps: int, dtype, channels_last: bool, cached: bool) -> float:
    """(b)/(c) images/s of whole epochs' batches: loading, augmentation, forward, backward, step."""
    model, loss_fn, opt = setup(cfg)
    rows = table.head(batch * steps)
    ds = PhotoDataset(rows["path"].tolist(), training_targets(cfg, rows), train_transform(cfg.data, cfg.augment),
                      Prepare.from_config(cfg.data), images if cached else None,
                      rows["_row"].to_numpy() if cached else None)
    device = torch.device("cpu")
    workers = loader_workers(cfg.data.workers, device, cached)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    column = {h.name: i for i, h in enumerate(cfg.heads)}
    run = lambda: train_one_epoch(model, make_loader(ds, batch, workers, device, shuffle=True), loss_fn, opt,  # noqa
                                  device, dtype, channels_last, column, cfg.augment, np.random.default_rng(0), 1,
                                  progress=False)
    run_small = lambda: train_one_epoch(  # noqa: E731  warm-up on one batch
        model, make_loader(torch.utils.data.Subset(ds, range(batch)), batch, 0, device), loss_fn, opt, device,
        dtype, channels_last, column, cfg.augment, np.random.default_rng(0), 1, progress=False)
    run_small()
    return len(ds) / timed(run, 0, 1)


def inference(cfg, batch: int, dtype, channels_last: bool) -> float:
    model, _ = build_model(cfg.model, cfg.heads)
    n = batch * 3
    ds = PhotoDataset([""] * n, np.zeros(n), eval_transform(cfg.data), None,
                      np.random.randint(0, 255, (n, *Prepare.from_config(cfg.data).size, 3), dtype=np.uint8),
                      np.arange(n))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = make_loader(ds, batch, 0, torch.device("cpu"))
    return n / timed(lambda: predict_logits(model, loader, torch.device("cpu"), dtype, channels_last), 1, 1)


def cam_latency(cfg) -> tuple[float, float]:
    model, _ = build_model(cfg.model, cfg.heads)
    model.eval()
    x = torch.randn(1, 3, *cfg.data.size)
    grid = timed(lambda: cam_grid(model, x, "gradcam"), 1, 5)

    def single():
        with GradCAM(model=model, target_layers=[model.trunk.layer4]) as cam:
            cam(x, [ClassifierOutputTarget(0)])

    return grid, timed(single, 1, 5)


def main(argv=None) -> int:
    p = cli()
    a = p.parse_args(argv)
    results = {"threads": configure_threads(load_config(a.overrides).train), "batch": a.batch, "sizes": {}}
    print(f"{'size':>9} | {'(a) model':>10} | {'(b) ours':>10} | {'(c) plain':>10} | {'(d) infer':>10} | "
          f"{'(b)/(a)':>7} | {'(b)/(c)':>7} | {'(e) grid':>9} | {'1 CAM':>7} | {'ratio':>5}")
    for size in a.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        cfg = load_config(a.overrides + [f"data.size=[{h},{w}]", f"data.synthetic_people={max(40, a.batch * a.steps // 7 + 1)}"])
        table, _ = load_table(cfg)
        table = table.assign(_row=np.arange(len(table)))
        tick = time.perf_counter()
        images, _ = cached_images(table["path"].tolist(), Prepare.from_config(cfg.data), Path(cfg.data.cache_dir),
                                  log=lambda s: None)
        cache_s = time.perf_counter() - tick
        dtype = resolve_precision(cfg.train.precision, torch.device("cpu"))
        r = {
            "precision": str(dtype or "fp32"),
            "a_model_img_s": model_only(cfg, a.batch, a.steps, dtype, cfg.train.channels_last),
            "b_pipeline_img_s": pipeline(cfg, table, images, a.batch, a.steps, dtype, cfg.train.channels_last, True),
            "c_plain_img_s": pipeline(cfg, table, images, a.batch, a.steps, None, False, False),
            "d_inference_img_s": inference(cfg, a.batch * 2, dtype, cfg.train.channels_last),
            "cache_build_s": cache_s,
        }
        r["e_cam_grid_s"], r["e_single_cam_s"] = cam_latency(cfg)
        r["b_over_a"] = r["b_pipeline_img_s"] / r["a_model_img_s"]
        r["b_over_c"] = r["b_pipeline_img_s"] / r["c_plain_img_s"]
        r["e_ratio"] = r["e_cam_grid_s"] / r["e_single_cam_s"]
        results["sizes"][size] = r
        print(f"{size:>9} | {r['a_model_img_s']:>10.1f} | {r['b_pipeline_img_s']:>10.1f} | {r['c_plain_img_s']:>10.1f}"
              f" | {r['d_inference_img_s']:>10.1f} | {r['b_over_a']:>7.2f} | {r['b_over_c']:>7.2f} | "
              f"{r['e_cam_grid_s'] * 1000:>7.0f}ms | {r['e_single_cam_s'] * 1000:>5.0f}ms | {r['e_ratio']:>5.2f}")
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"images/s (a, b, c, d); precision {results['sizes'][size]['precision']}, {results['threads']} threads, "
          f"batch {a.batch}; peak resident memory of the whole benchmark {results['peak_rss_mb']:.0f} MB")
    a.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

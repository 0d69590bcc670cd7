"""``multitask bench``: throughput and latency on this machine, side by side in one run.

(a) model-only training step on random tensors; (b) the full training pipeline from disk with the project's
defaults (cache, precision=auto, channels_last); (c) the same pipeline in the plain style (fp32, NCHW, decode
every photo every epoch, no cache); (d) inference; (e) one Grad-CAM grid (3 heads x 4 layers) against one
single-layer GradCAM call; (f) the model step under DistributedDataParallel with 1 and 2 gloo processes
(torchrun); (g) the model step under torch.compile (train.compile); inference of the exported graph in eager
PyTorch against ONNX Runtime. Each figure: warm-up runs first (oneDNN picks its kernels on the first calls,
torch.compile compiles), then the median of runs repeated for at least a few seconds, with its spread. Prints a
table and writes bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from multitask.cli import guarded, positive


def cli() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="multitask bench", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="128x96,128x128", help="H x W training sizes to measure (e.g. add 224x224)")
    p.add_argument("--batch", type=positive, default=64)
    p.add_argument("--steps", type=positive, default=4, help="batches per pipeline measurement (one run)")
    p.add_argument("--out", type=Path, default=Path("bench.json"))
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.precision=fp32")
    p.add_argument("--gpu-check", action="store_true", help="instead of the benchmark: the checks to run first on a "
                   "GPU machine (CUDA, a quick run on one GPU, torchrun on two), one line each; on a machine without "
                   "them, their CPU counterparts run and the CUDA ones say they were skipped")
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)  # one process of (f)
    p.add_argument("--allocator-worker", action="store_true", help=argparse.SUPPRESS)  # one side of allocator_effect
    return p


if __name__ == "__main__":
    cli().parse_args()  # --help and usage errors answer before torch and the rest are imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pytorch_grad_cam import GradCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from multitask import allocator, distributed  # noqa: E402
from multitask.config import load_config  # noqa: E402
from multitask.data.dataset import PhotoDataset  # noqa: E402
from multitask.data.photoset import photo_set  # noqa: E402
from multitask.data.table import load_table, training_targets  # noqa: E402
from multitask.data.transforms import Preprocessing  # noqa: E402
from multitask.engine import (Runtime, configure_threads, loader_workers, make_loader,  # noqa: E402
                              precision_note, train_one_epoch)
from multitask.explain import cam_grid  # noqa: E402
from multitask.losses import MultiHeadLoss, batch_mixer  # noqa: E402
from multitask.model import build_model, stage_layers  # noqa: E402
from multitask.bench_commands import (gpu_check, kib, last_line, predict_pace, proc_status,  # noqa: E402
                                      scene_pace, training_memory)
from multitask.optim import param_groups  # noqa: E402


def cpu_facts() -> dict:
    """What decides CPU speed here: the vector extensions torch can use, threads and the CPU's name."""
    flags, name = set(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    return {"cpu": name, "flags": [f for f in wanted if f in flags], "threads": torch.get_num_threads(),
            "torch_fast_bf16": bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())}


def measure(step: Callable[[], int], device: torch.device, warmup: int, min_runs: int = 5,
            min_seconds: float = 6.0) -> dict:
    """images/s of ``step`` (which returns the images it handled): ``warmup`` calls untimed (oneDNN picks its
    kernels on the first ones), then timed calls until ``min_runs`` and ``min_seconds`` are both reached.
    The figure is the median; ``spread`` is (max - min) / median of the per-call rates."""
    start = time.perf_counter()
    images = sum(step() for _ in range(warmup))
    warmup_s = time.perf_counter() - start
    rates, start = [], time.perf_counter()
    while len(rates) < min_runs or time.perf_counter() - start < min_seconds:
        tick = time.perf_counter()
        n = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - tick))
        images += n
    median = float(np.median(rates))
    return {"img_s": median, "spread": float((max(rates) - min(rates)) / median), "runs": len(rates),
            "warmup_s": warmup_s, "images": images}


def setup(cfg, rt: Runtime):
    model, _ = build_model(cfg.model, cfg.heads)
    model = rt.place(model)
    loss = MultiHeadLoss([h.name for h in cfg.heads], [1.0] * len(cfg.heads), cfg.loss).to(rt.device)
    opt = torch.optim.Adam(param_groups(model, 1e-3, 1e-3, 0.0))
    return model, loss, opt


def model_only(cfg, batch: int, rt: Runtime, ddp: bool = False, compiled: bool = False) -> dict:
    """(a) forward + backward + step on random tensors already on the device (``ddp``: wrapped in
    DistributedDataParallel, gradients averaged over the processes every step; ``compiled``: torch.compile,
    as train.compile does, its compile time in the warm-up)."""
    model, loss_fn, opt = setup(cfg, rt)
    model.train()
    net = DistributedDataParallel(model) if ddp else model
    net = torch.compile(net) if compiled else net
    x = rt.input(torch.randn(batch, 3, *cfg.data.size))
    y = torch.stack([torch.randint(0, len(h.classes), (batch,)) for h in cfg.heads], 1).to(rt.device)

    def step() -> int:
        with rt.autocast():
            logits = model.split(net(x))
        loss, _ = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return batch

    return measure(step, rt.device, warmup=3)


def pipeline(cfg, table, images, batch: int, steps: int, rt: Runtime, cached: bool) -> dict:
    """(b)/(c) ``steps`` batches read from the cache (or decoded from disk), augmented, trained on."""
    model, loss_fn, opt = setup(cfg, rt)
    rows = table.head(batch * steps)
    pre = Preprocessing.from_config(cfg)
    ds = PhotoDataset(rows["path"].tolist(), training_targets(cfg, rows), pre.train(), pre.framing,
                      images if cached else None, rows["_row"].to_numpy() if cached else None)
    workers = loader_workers(cfg.data.workers, rt.device, cached)

    def epoch() -> int:
        train_one_epoch(model, make_loader(ds, batch, workers, rt.device, shuffle=True), loss_fn, opt, rt, 1,
                        batch_mixer(cfg.augment, seed=0))
        return len(ds)

    return measure(epoch, rt.device, warmup=1, min_runs=3)


def inference(cfg, batch: int, rt: Runtime) -> dict:
    model, _ = build_model(cfg.model, cfg.heads)
    model = rt.place(model).eval()
    x = torch.randn(batch, 3, *cfg.data.size)

    def step() -> int:
        with torch.inference_mode(), rt.autocast():
            model(rt.input(x))
        return batch

    return measure(step, rt.device, warmup=3)


def onnx_vs_eager(cfg, batch: int) -> dict:
    """Inference of what ``multitask export`` writes (the model with its heads' probabilities, fp32) in eager
    PyTorch and in ONNX Runtime on the CPU: same batch, same number of threads."""
    import tempfile

    from multitask.export import HeadProbabilities, export_onnx

    try:
        import onnxruntime as ort
    except ImportError:
        return {"summary": "ONNX Runtime not installed (pip install 'multitask[export]'): not measured"}
    model, _ = build_model(cfg.model, cfg.heads)
    graph = HeadProbabilities([model.eval()], [h.name for h in cfg.heads], flip=False).eval()
    x = torch.randn(batch, 3, *cfg.data.size)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(graph, x[:2], path)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}

    def eager_step() -> int:
        with torch.inference_mode():
            graph(x)
        return batch

    eager = measure(eager_step, torch.device("cpu"), warmup=3)
    onnx = measure(lambda: (session.run(None, feed), batch)[1], torch.device("cpu"), warmup=3)
    return {"eager": eager, "onnxruntime": onnx, "speedup": onnx["img_s"] / eager["img_s"], "threads": threads,
            "summary": f"eager fp32 {fmt(eager)}, ONNX Runtime {fmt(onnx)} img/s "
                       f"({onnx['img_s'] / eager['img_s']:.2f}x; batch {batch}, {threads} threads, probabilities "
                       "inside both)"}


GPU_IMAGES_PER_S = 3000  # what one modern GPU trains ResNet18 at, at 224 px, in mixed precision (the order of it)


def loader_per_worker(cfg, table, images, batch: int) -> dict:
    """What one data loader worker delivers with no model: cached photo -> training augmentation -> batch
    (``cached``), and the same decoding every photo from its file (``decoded``), in this process, so one core."""
    pre = Preprocessing.from_config(cfg)
    rows = table.head(batch * 4)
    out = {}
    for name, cache in (("cached", images), ("decoded", None)):
        ds = PhotoDataset(rows["path"].tolist(), training_targets(cfg, rows), pre.train(), pre.framing, cache,
                          rows["_row"].to_numpy() if cache is not None else None)
        loader = make_loader(ds, batch, 0, torch.device("cpu"), shuffle=True)
        out[name] = measure(lambda: sum(len(x) for x, _ in loader), torch.device("cpu"), warmup=1, min_runs=3,
                            min_seconds=3)
    need = -(-GPU_IMAGES_PER_S // max(1, int(out["cached"]["img_s"])))
    out["summary"] = (f"cached {fmt(out['cached'])}, decoded from the files {fmt(out['decoded'])} img/s per worker: a "
                      f"GPU training at {GPU_IMAGES_PER_S} img/s needs about {need} workers fed from the cache "
                      "(data.workers)")
    return out


def cam_latency(cfg, device: torch.device) -> tuple[float, float]:
    """Seconds for one 3-head x 4-layer CAM grid and for one single-layer GradCAM call (medians)."""
    model, _ = build_model(cfg.model, cfg.heads)
    model = model.to(device).eval()
    x = torch.randn(1, 3, *cfg.data.size, device=device)
    deepest = list(stage_layers(model, tuple(cfg.data.size)).values())[-1]

    def single() -> int:
        with GradCAM(model=model, target_layers=[deepest]) as cam:
            cam(x, [ClassifierOutputTarget(0)])
        return 1

    grid = measure(lambda: (cam_grid(model, x, "gradcam"), 1)[1], device, warmup=2, min_runs=5, min_seconds=2)
    one = measure(single, device, warmup=2, min_runs=5, min_seconds=2)
    return 1 / grid["img_s"], 1 / one["img_s"]


def compiled_vs_eager(cfg, batch: int, rt: Runtime, eager: dict) -> dict:
    """(g) the model step (a) under torch.compile (train.compile) against ``eager``, (a) itself; a compiler
    that cannot run here (no C compiler, an unsupported op) is reported, not raised."""
    try:
        comp = model_only(cfg, batch, rt, compiled=True)
    except Exception as e:  # inductor's failures have many types; one line says which
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return {"eager": eager, "error": f"{type(e).__name__}: {first}",
                "summary": f"eager {fmt(eager)} img/s; torch.compile failed here ({type(e).__name__}: {first})"}
    return {"eager": eager, "compiled": comp, "speedup": comp["img_s"] / eager["img_s"],
            "summary": f"eager {fmt(eager)}, compiled {fmt(comp)} img/s ({comp['img_s'] / eager['img_s']:.2f}x; "
                       f"compiling took {comp['warmup_s']:.0f} s of the first steps)"}


def data_parallel(overrides, size: str, batch: int, processes: int) -> dict:
    """(f) images/s of the model step (a) with DistributedDataParallel over ``processes`` gloo processes started
    by torchrun, each with its share of the cores; all processes together."""
    cores = os.cpu_count() or 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
           "-m", "multitask.bench", "--ddp-worker", "--sizes", size, "--batch", str(batch), *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": str(max(1, cores // processes))})
    lines = [line for line in out.stdout.splitlines() if line.startswith("DDP ")]
    if out.returncode != 0 or not lines:
        return {"img_s": float("nan"), "spread": float("nan"), "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(lines[-1][4:])


def ddp_worker(a) -> int:
    """One torchrun process of data_parallel: rank 0 prints the total rate."""
    world = distributed.from_env()
    distributed.init(world, "cpu")
    try:
        h, w = (int(v) for v in a.sizes.split(",")[0].split("x"))
        cfg = load_config(a.overrides + [f"data.size=[{h},{w}]"])
        torch.set_num_threads(distributed.threads_per_process(world, os.cpu_count() or 1))
        m = model_only(cfg, a.batch, Runtime.on(torch.device("cpu"), cfg), ddp=world.active)
        rates = distributed.gather(world, m["img_s"])
        if world.main:
            print("DDP " + json.dumps({"img_s": float(sum(rates)), "spread": m["spread"], "processes": world.size}))
    finally:
        distributed.shutdown()
    return 0


def allocator_effect(overrides, size: str, batch: int, steps: int) -> dict:
    """The model step (a) and the pipeline (b), each allocator setting in a fresh process: glibc's default, glibc
    keeping freed memory, tcmalloc (where installed): images/s, minor page faults per image, peak memory."""
    out = {}
    for setting in allocator.SETTINGS[::-1]:
        cmd = [sys.executable, "-m", "multitask.bench", "--allocator-worker", "--sizes", size, "--batch", str(batch),
               "--steps", str(steps), *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=allocator.environment(setting))
        lines = [line for line in proc.stdout.splitlines() if line.startswith("ALLOC ")]
        if proc.returncode != 0 or not lines:
            return {"summary": f"not measured ({last_line(proc.stderr, 'no output')[:160]})"}
        out[setting] = json.loads(lines[-1][6:])
    base = out["default"]
    out["summary"] = "; ".join(
        "{} ({}): model step {} img/s ({:.2f}x), {:.0f} page faults per image, pipeline {} img/s ({:.2f}x), peak "
        "{:.0f} MB".format(name, r["state"], fmt(r["model"]), r["model"]["img_s"] / base["model"]["img_s"],
                           r["model"]["faults_per_image"], fmt(r["pipeline"]),
                           r["pipeline"]["img_s"] / base["pipeline"]["img_s"], r["peak_rss_mb"])
        for name, r in out.items())
    return out


def allocator_worker(a) -> int:
    """One setting of allocator_effect: the allocator as MULTITASK_MALLOC says (set by main's guard)."""
    h, w = (int(v) for v in a.sizes.split(",")[0].split("x"))
    cfg = load_config(a.overrides + [f"data.size=[{h},{w}]", "data.synthetic.unmasked=0",
                                     f"data.synthetic.people={max(40, a.batch * a.steps // 7 + 1)}"])
    configure_threads(cfg.train)
    photos = photo_set(cfg, load_table(cfg)[0], log=lambda s: None, cache=True)
    table, images = photos.table, photos.images
    rt = Runtime.on(torch.device("cpu"), cfg)
    result = {}
    for name, run in (("model", lambda: model_only(cfg, a.batch, rt)),
                      ("pipeline", lambda: pipeline(cfg, table, images, a.batch, a.steps, rt, True))):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        m = run()
        m["faults_per_image"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / m["images"]
        result[name] = m
    result["peak_rss_mb"] = kib(proc_status("self")["VmHWM"]) / 1024  # not ru_maxrss: see resident_peaks
    result["state"] = allocator.state
    print("ALLOC " + json.dumps(result))
    return 0


def fmt(m: dict) -> str:
    return f"{m['img_s']:.1f} ±{m['spread'] * 50:.0f}%"


@guarded
def main(argv=None) -> int:
    p = cli()
    a = p.parse_args(argv)
    if a.ddp_worker:
        return ddp_worker(a)
    if a.gpu_check:
        return gpu_check(a.overrides)
    if a.allocator_worker:
        return allocator_worker(a)
    base = load_config(a.overrides)
    configure_threads(base.train)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    results = {**cpu_facts(), "batch": a.batch, "devices": {}}
    print(f"{results['cpu']}: {', '.join(results['flags']) or 'no AVX2'}; {results['threads']} threads; batch "
          f"{a.batch}; images/s as median ±half the spread of repeated runs")
    for device in devices:
        rows = results["devices"][str(device)] = {"precision": {}, "sizes": {}}
        print(f"\n{device}\n{'size':>9} | {'(a) model':>14} | {'(b) ours':>14} | "
              f"{'(c) plain':>14} | {'(d) infer':>14} | {'(b)/(a)':>7} | {'(b)/(c)':>7} | {'(e) grid':>8} | "
              f"{'1 CAM':>6} | {'ratio':>5}")
        for size in a.sizes.split(","):
            h, w = (int(v) for v in size.split("x"))
            cfg = load_config(a.overrides + [f"data.size=[{h},{w}]", "data.synthetic.unmasked=0",
                                             f"data.synthetic.people={max(40, a.batch * a.steps // 7 + 1)}"])
            photos = photo_set(cfg, load_table(cfg)[0], log=lambda s: None, cache=True)
            table, images = photos.table, photos.images
            rt = Runtime.on(device, cfg)
            rows["precision"][size] = precision_note(cfg.train, device, cfg.model.arch, cfg.data.size)
            r = {"a_model": model_only(cfg, a.batch, rt),
                 "b_pipeline": pipeline(cfg, table, images, a.batch, a.steps, rt, True),
                 "c_plain": pipeline(cfg, table, images, a.batch, a.steps, Runtime(device), False),
                 "d_inference": inference(cfg, a.batch * 2, rt)}
            r["e_cam_grid_s"], r["e_single_cam_s"] = cam_latency(cfg, device)
            r["b_over_a"] = r["b_pipeline"]["img_s"] / r["a_model"]["img_s"]
            r["b_over_c"] = r["b_pipeline"]["img_s"] / r["c_plain"]["img_s"]
            rows["sizes"][size] = r
            print(f"{size:>9} | {fmt(r['a_model']):>14} | {fmt(r['b_pipeline']):>14} | {fmt(r['c_plain']):>14} | "
                  f"{fmt(r['d_inference']):>14} | {r['b_over_a']:>7.2f} | {r['b_over_c']:>7.2f} | "
                  f"{r['e_cam_grid_s'] * 1000:>6.0f}ms | {r['e_single_cam_s'] * 1000:>4.0f}ms | "
                  f"{r['e_cam_grid_s'] / r['e_single_cam_s']:>5.2f}")
            if r["b_over_a"] > 1.05:
                print(f"  (b)/(a) = {r['b_over_a']:.2f} > 1.05: the whole pipeline cannot beat its own model step; "
                      "a measurement error (another process running?)")
        size = a.sizes.split(",")[0]
        h, w = (int(v) for v in size.split("x"))
        cfg = load_config(a.overrides + [f"data.size=[{h},{w}]"])
        rt = Runtime.on(device, cfg)
        for s, note in rows["precision"].items():
            print(f"{cfg.model.arch} at {s}: {note}")
        if device.type == "cpu":  # what bf16 autocast buys on this CPU, whatever precision=auto chose
            fp32 = model_only(cfg, a.batch, replace(rt, dtype=None))
            bf16 = model_only(cfg, a.batch, replace(rt, dtype=torch.bfloat16))
            rows["fp32_vs_bf16"] = {"size": size, "fp32": fp32, "bf16": bf16, "speedup": bf16["img_s"] / fp32["img_s"]}
            print(f"model step at {size}: fp32 {fmt(fp32)}, bf16 autocast {fmt(bf16)} img/s "
                  f"({bf16['img_s'] / fp32['img_s']:.2f}x)")
            rows["allocator"] = allocator_effect(a.overrides, size, a.batch, a.steps)
            print(f"allocator at {size}: {rows['allocator']['summary']}")
            rows["onnx"] = onnx_vs_eager(cfg, a.batch * 2)
            print(f"inference at {size} of the exported graph: {rows['onnx']['summary']}")
        if device.type == "cpu":
            photos = photo_set(cfg, load_table(cfg)[0], log=lambda s: None, cache=True)
            table, images = photos.table, photos.images
            rows["loader"] = loader_per_worker(cfg, table, images, a.batch)
            print(f"data loader at {size}, one worker, no model: {rows['loader']['summary']}")
        rows["compile"] = compiled_vs_eager(cfg, a.batch, rt, rows["sizes"][size]["a_model"])
        print(f"model step at {size}, train.compile: {rows['compile']['summary']}")
    size = a.sizes.split(",")[0]
    results["data_parallel"] = {}
    for n in (1, 2):  # on a 2-core CPU no speed-up is expected: the point is that data parallel runs
        results["data_parallel"][n] = r = data_parallel(a.overrides, size, a.batch, n)
        print(f"model step at {size}, DistributedDataParallel over {n} gloo process(es): {fmt(r)} img/s in all"
              + (f" (failed: {r['error']})" if "error" in r else ""))
    results["predict"] = r = predict_pace(a.overrides, size)
    print(f"predict at {size}: {r['summary']}")
    results["scenes"] = r = scene_pace(a.overrides, size)
    print(f"predict --faces all at {size}, 1280x720 scenes: {r['summary']}")
    results["training_memory"] = r = training_memory(a.overrides, size)
    print(f"training memory at {size}: {r['summary']}")
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of the whole benchmark {results['peak_rss_mb']:.0f} MB; wrote {a.out}")
    a.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One epoch of training, one pass of evaluation; device, precision and memory format."""
from __future__ import annotations

import contextlib
import functools
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from multitask.config import Config, ConfigError, TrainConfig
from multitask.data.dataset import ArrayDataset
from multitask.data.transforms import Preprocessing
from multitask.distributed import World, threads_per_process
from multitask.losses import MultiHeadLoss
from multitask.io import atomic_write_text
from multitask.model import MultiHeadNet, for_inference


class NonFiniteLoss(RuntimeError):
    pass


LOG_EVERY = 20  # training steps between reads of the summed losses (each read is a host-device sync)


def resolve_device(name: str, world: World = World()) -> torch.device:
    """cpu, or a GPU: ``cuda`` / ``auto`` give each torchrun process the GPU of its local rank; ``cuda:N`` one
    GPU for a single process."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={name} but no CUDA device is available")
        index = int(name.split(":")[1]) if ":" in name else world.local_rank
        if index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={name}: this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(index)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels once
        return torch.device("cuda", index)
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls in hardware. Without them autocast emulates bf16 and is slower."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, device: torch.device, arch: str = "resnet18",
                      size: Sequence[int] = (96, 96)) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain fp32. ``auto`` on a CPU: bf16 where it has bf16 instructions and a
    training step of this model at this size is measurably faster in bf16 (``bf16_speedup``)."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16":
        raise ConfigError("train.precision=fp16 needs a CUDA device; on CPU use bf16 or auto")
    if precision == "bf16":
        if not cpu_has_fast_bf16():
            warnings.warn("train.precision=bf16: this CPU has no AVX512-BF16/AMX; bf16 is emulated and slow")
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() and bf16_speedup(arch, tuple(size)) > BF16_MIN_SPEEDUP else None


BF16_MIN_SPEEDUP = 1 / 0.95  # bf16 must be this much faster to be taken: a tie keeps fp32's numerics


def cpu_name() -> str:
    import platform

    try:  # the CPU's model name: machines of one architecture differ
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def step_seconds(arch: str, size: Sequence[int], dtype: Optional[torch.dtype]) -> float:
    """The median time of a training step (forward, backward) of ``arch`` on 16 photos of ``size`` here."""
    from multitask.config import HeadConfig, ModelConfig
    from multitask.model import build_model

    net, _ = build_model(ModelConfig(arch=arch), [HeadConfig("timed", "timed", [str(c) for c in range(8)])])
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(16, 3, *size).contiguous(memory_format=torch.channels_last)
    times = []
    for _ in range(6):
        tick = time.perf_counter()
        with autocast(torch.device("cpu"), dtype):
            loss = net(x).float().square().mean()
        loss.backward()
        times.append(time.perf_counter() - tick)
    return float(np.median(times[2:]))  # the first calls pick kernels


@functools.lru_cache(maxsize=None)
def bf16_speedup(arch: str, size: tuple) -> float:
    """How much faster a training step of this model at this size runs under bf16 autocast than in fp32 on this
    CPU (above 1: faster), timed once (a few seconds) and cached per CPU, torch version, threads, model and size.
    The flags do not say: the same instructions gave 1.6x on one CPU and 0.76x on another, and one CPU 1.6x for
    ResNet18 and 0.68x for MobileNetV2."""
    import json

    key = f"{cpu_name()}-{torch.__version__}-{torch.get_num_threads()}-{arch}-{size[0]}x{size[1]}"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "multitask" / "bf16_speedup.json"
    try:
        known = json.loads(cache.read_text()) if cache.exists() else {}
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = step_seconds(arch, size, None) / step_seconds(arch, size, torch.bfloat16)
        try:  # atomic: two processes timing at once, or a kill, never leave half a file
            atomic_write_text(cache, json.dumps(known))
        except OSError:
            pass  # a read-only home only costs the timing again
    return float(known[key])


def precision_note(train: TrainConfig, device: torch.device, arch: str, size: Sequence[int]) -> str:
    """What ``precision=auto`` chose and why, for the training log."""
    dtype = resolve_precision(train.precision, device, arch, size)
    chosen = str(dtype or "fp32").replace("torch.", "")
    if train.precision != "auto" or device.type != "cpu":
        return f"precision {chosen} ({train.precision})"
    if not cpu_has_fast_bf16():
        return f"precision {chosen} (auto: this CPU has no bf16 instructions)"
    speedup = bf16_speedup(arch, tuple(size))
    return (f"precision {chosen} (auto: a {arch} step at {size[0]}x{size[1]} ran {speedup:.2f}x the fp32 speed in "
            f"bf16 here, {torch.get_num_threads()} threads)")


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def configure_threads(cfg: TrainConfig, world: World = World()) -> int:
    """Intra-op threads: ``train.threads``, else this process's share of the cores (see threads_per_process);
    two processes each taking every core run several times slower than one."""
    threads = cfg.threads or threads_per_process(world, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return threads


def loader_workers(requested: int, device: torch.device, cached: bool, world: World = World()) -> int:
    """-1: no worker processes on CPU with the cache (augmenting small cached arrays costs less than the cores a
    worker would take from the arithmetic); otherwise up to 8 per process from its share of the cores, leaving
    one to the process itself."""
    if requested >= 0:
        return requested
    if device.type == "cpu" and cached:
        return 0
    return max(0, min(8, (os.cpu_count() or 1) // max(1, world.local_size) - 1))


def unwrap(model: torch.nn.Module) -> MultiHeadNet:
    """The MultiHeadNet inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def make_loader(dataset, batch_size: int, workers: int, device: torch.device, shuffle: bool = False,
                seed: int = 0, drop_last: bool = False, sampler=None) -> DataLoader:
    """Batches in a seeded order; a ``sampler`` (a DistributedSampler under torchrun) decides the order instead."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, generator=gen, pin_memory=device.type == "cuda", persistent_workers=False,
                      drop_last=drop_last)


@dataclass(frozen=True)
class Runtime:
    """Where and how the network runs: the device, the autocast dtype (None: plain fp32), the memory format."""

    device: torch.device
    dtype: Optional[torch.dtype] = None
    channels_last: bool = False

    @classmethod
    def from_config(cls, cfg: Config, world: World = World()) -> "Runtime":
        return cls.on(resolve_device(cfg.train.device, world), cfg)

    @classmethod
    def on(cls, device: torch.device, cfg: Config) -> "Runtime":
        """The run's precision (for its model at its size) and memory format on a device already chosen."""
        dtype = resolve_precision(cfg.train.precision, device, cfg.model.arch, cfg.data.size)
        return cls(device, dtype, cfg.train.channels_last)

    def autocast(self):
        return autocast(self.device, self.dtype)

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


Mix = Callable[[torch.Tensor, torch.Tensor], tuple]  # (x, y) -> (x, y, partner targets or None, lam)


def weight_average(model: MultiHeadNet, decay: float) -> Optional[AveragedModel]:
    """An exponential moving average of ``model``'s weights and BatchNorm statistics (None when decay is 0)."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True) if decay > 0 else None


def train_one_epoch(model: torch.nn.Module, loader: DataLoader, loss_fn: MultiHeadLoss, optimizer, rt: Runtime,
                    epoch: int, mix: Optional[Mix] = None, scaler=None, progress: bool = False,
                    desc: str = "train", ema: Optional[AveragedModel] = None) -> Dict[str, float]:
    """One pass over ``loader``; ``ema`` (``weight_average``) follows every step. The losses are summed on the
    device and read every ``LOG_EVERY`` steps (a read waits for the GPU's queue to empty), where a non-finite
    loss is also caught."""
    model.train()
    totals: Dict[str, torch.Tensor] = {}
    seen, start, checked = 0, time.perf_counter(), 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for batch, (x, y, *soft) in enumerate(bar):
        x, y = rt.input(x), y.to(rt.device)
        x, y, y_b, lam = mix(x, y) if mix is not None else (x, y, None, 1.0)
        with rt.autocast():
            logits = unwrap(model).split(model(x))
        loss, parts = loss_fn(logits, y, y_b, lam, soft[0].to(rt.device) if soft else None)
        n = len(x)
        seen += n
        for k, v in {"loss": loss, **{f"loss_{h}": p for h, p in parts.items()}}.items():
            totals[k] = totals.get(k, 0) + v.detach().double() * n
        if (batch + 1) % LOG_EVERY == 0 or batch + 1 == len(loader):
            if not math.isfinite(totals["loss"].item()):
                raise NonFiniteLoss(f"non-finite loss at epoch {epoch}, batch {checked}-{batch}: "
                                    f"{ {k: round(v.item(), 4) for k, v in parts.items()} }; try a lower learning "
                                    "rate")
            checked = batch + 1
            bar.set_postfix(loss=f"{totals['loss'].item() / seen:.3f}")
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        average_over_processes(loss_fn.parameters())
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if ema is not None:
            ema.update_parameters(unwrap(model))
    out = {k: v.item() / max(seen, 1) for k, v in totals.items()}
    out["images_per_s"] = seen / max(time.perf_counter() - start, 1e-9)
    return out


def average_over_processes(params) -> None:
    """The gradients of parameters outside the model (the loss's own, ``loss.balance``) averaged over the
    processes of a distributed run, as DDP averages the model's: every process then takes the same step."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= torch.distributed.get_world_size()


@torch.inference_mode()
def predict_logits(model: MultiHeadNet, loader: DataLoader, rt: Runtime, progress: bool = False,
                   desc: str = "eval") -> torch.Tensor:
    """Concatenated logits for every sample, in loader order."""
    model.eval()
    out = []
    for x, *_ in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        with rt.autocast():
            out.append(model(rt.input(x)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, sum(unwrap(model).head_sizes))


def head_outputs(model: MultiHeadNet, logits: torch.Tensor) -> tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """(per head the class probabilities, per head that predicts them the values) of a batch's logits."""
    return ({k: v.numpy() for k, v in model.probabilities(logits).items()},
            {k: v.numpy() for k, v in model.predicted_values(logits).items()})


def predict_views(model: MultiHeadNet, images: np.ndarray, pre: Preprocessing, views: Sequence[tuple],
                  rt: Runtime, batch_size: int, workers: int = 0, progress: bool = False,
                  desc: str = "") -> tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """(per head the class probabilities, per head that predicts them the values) of prepared photos
    (N x H x W x 3 uint8), averaged over test-time views (``PredictConfig.views``): what predict gives, and
    what the extra validation sets are scored with."""
    fused = rt.place(for_inference(unwrap(model)))

    def one_view(scale: float, flip: bool):
        loader = make_loader(ArrayDataset(images, pre.eval(scale, flip)), batch_size, workers, rt.device)
        logits = predict_logits(fused, loader, rt, progress, desc=f"{desc} view {scale}{' flip' if flip else ''}")
        return head_outputs(fused, logits)

    return mean_over_views(views, one_view)


def mean_over_views(views: Sequence[tuple], one_view: Callable[[float, bool], tuple]
                    ) -> tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """The mean over test-time views of ``one_view(scale, flip)`` -> (probabilities per head, values per head)."""
    probs: Dict[str, np.ndarray] = {}
    values: Dict[str, np.ndarray] = {}
    for scale, flip in views:
        view_probs, view_values = one_view(scale, flip)
        for name, part in view_probs.items():
            probs[name] = probs.get(name, 0) + part / len(views)
        for name, part in view_values.items():
            values[name] = values.get(name, 0) + part / len(views)
    return probs, values

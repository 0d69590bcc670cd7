"""Data-parallel training under ``torchrun``: who this process is, and the few collectives the trainer needs.

``torchrun --nproc-per-node N -m multitask.train ...`` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE set; without torchrun those are absent and this is one process of a world of one, where every
function below is a no-op. Backend: NCCL when each process has a GPU, gloo on CPU. Only rank 0 writes the run
directory; every rank reads it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and logs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def from_env() -> World:
    """The world torchrun describes in the environment (a world of one without it)."""
    env = os.environ
    size = int(env.get("WORLD_SIZE", "1"))
    return World(int(env.get("RANK", "0")), size, int(env.get("LOCAL_RANK", "0")),
                 int(env.get("LOCAL_WORLD_SIZE", str(size))))


def init(world: World, device_type: str) -> None:
    """Join the process group (once); NCCL for GPUs, gloo for CPUs. torchrun gives the rendezvous. With NCCL,
    this process's GPU (its local rank's) is made current first and named to the group: object collectives such
    as ``broadcast`` run on the current device, so without it every rank would use cuda:0."""
    if not world.active or dist.is_initialized():
        return
    if device_type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")


def elastic_marker(out_dir: str) -> Optional[Path]:
    """Where a torchrun job notes its run folder, so that the workers torchrun restarts (``--max-restarts``)
    continue that run instead of starting another; None outside torchrun."""
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    return Path(out_dir) / f".torchrun-{job}" if job else None


def elastic_run(out_dir: str, world: World) -> Optional[Path]:
    """On rank 0 of a restarted torchrun job (TORCHELASTIC_RESTART_COUNT > 0): the run folder its first workers
    started; None otherwise."""
    marker = elastic_marker(out_dir)
    if not world.main or marker is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        return None
    return Path(marker.read_text().strip()) if marker.is_file() else None


def remember_elastic_run(out_dir: str, run_dir: Path) -> None:
    marker = elastic_marker(out_dir)
    if marker is not None and not marker.exists():
        from multitask.io import atomic_write_text

        atomic_write_text(marker, f"{run_dir}\n")


def forget_elastic_run(out_dir: str) -> None:
    marker = elastic_marker(out_dir)
    if marker is not None:
        marker.unlink(missing_ok=True)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def broadcast(world: World, value: Any) -> Any:
    """Rank 0's value, on every rank (any picklable object)."""
    if not world.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(world: World, value: Any) -> List[Any]:
    """Every rank's value, in rank order, on every rank."""
    if not world.active:
        return [value]
    out: List[Any] = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def gather_rows(world: World, indices: torch.Tensor, rows: torch.Tensor, total: int) -> torch.Tensor:
    """Rows computed on shards of a data set (``indices`` say which), put back in data set order on every rank.
    A DistributedSampler pads the last shard by repeating items; repeats are dropped here."""
    if not world.active:
        return rows
    parts = gather(world, (indices.cpu(), rows.cpu()))
    out = torch.zeros(total, rows.shape[1], dtype=rows.dtype)
    for idx, part in parts:
        out[idx] = part
    return out


TORCHRUN_DEFAULT_THREADS = "1"  # what torchrun puts in OMP_NUM_THREADS when it starts several processes


def threads_per_process(world: World, cpu_count: int) -> int:
    """This process's share of the machine's cores: OMP_NUM_THREADS when the user set it (several fold jobs on
    one machine: give each cores / jobs), else the cores over torchrun's local processes. torchrun sets
    OMP_NUM_THREADS=1 itself when it starts several processes per machine and the user did not; that value is
    taken as its default, not a choice (train.threads=1 asks for one thread)."""
    omp = os.environ.get("OMP_NUM_THREADS")
    torchrun_default = world.local_size > 1 and omp == TORCHRUN_DEFAULT_THREADS
    if omp and omp.isdigit() and int(omp) > 0 and not torchrun_default:
        return int(omp)
    return max(1, cpu_count // max(1, world.local_size))

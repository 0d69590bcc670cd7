"""Scaling out: data parallel under torchrun (2 gloo processes on CPU), fold jobs side by side on one run
directory, and threads sized per process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from multitask.distributed import World, threads_per_process
from multitask.report import main as report_main
from multitask.train import main as train_main

from conftest import tiny_overrides

# Two processes on a 2-core machine: one thread each, or they slow each other down several times over.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "multitask.train", *args]


def train(*args: str) -> list[str]:
    return [sys.executable, "-m", "multitask.train", *args]


def create_run(args: list[str], capsys) -> Path:
    """`train ... --create-only` (in this process: it trains nothing) -> the run directory it printed."""
    assert train_main([*args, "--create-only"]) == 0
    return Path(capsys.readouterr().out.strip().splitlines()[-1])


def the_run(out: Path) -> Path:
    runs = [p for p in (out / "runs").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs  # one run directory, however many processes
    return runs[0]


def test_each_process_takes_its_share_of_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads_per_process(World(0, 4, 0, 4), 16) == 4
    assert threads_per_process(World(), 16) == 16
    assert threads_per_process(World(0, 8, 0, 4), 2) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # several fold jobs on one box: the user gives each its share
    assert threads_per_process(World(), 16) == 3


def test_torchruns_own_thread_default_is_not_taken_for_the_users(monkeypatch):
    """torchrun puts OMP_NUM_THREADS=1 in its workers' environment when it starts several per machine."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads_per_process(World(0, 2, 0, 2), 16) == 8  # torchrun's default: the cores are shared out
    assert threads_per_process(World(), 16) == 1  # one process, no torchrun: the user's own setting
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_per_process(World(0, 2, 0, 2), 16) == 3  # any other value under torchrun: the user's


def test_nccl_makes_the_ranks_gpu_current_before_the_first_collective(monkeypatch, tmp_path):
    """No GPU here: the calls are recorded. Each rank's GPU is set, then the group joined naming it, then the run
    folder broadcast (an object collective, which runs on the current device)."""
    import torch
    import torch.distributed as dist

    from multitask import distributed, engine, train

    calls = []
    monkeypatch.setattr(engine, "configure_threads", lambda *args: 1)  # this test process keeps its threads
    monkeypatch.setattr(distributed, "from_env", lambda: World(3, 8, 1, 4))
    monkeypatch.setattr(train, "torch_cuda", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(f"set_device {d}"))
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: calls.append(f"init_process_group {backend} {kw.get('device_id')}"))

    def broadcast(world, value):
        calls.append("broadcast")
        raise SystemExit(0)  # enough: the order is pinned

    monkeypatch.setattr(distributed, "broadcast", broadcast)
    monkeypatch.setattr(distributed, "shutdown", lambda: None)
    with pytest.raises(SystemExit):
        train.main([f"out_dir={tmp_path}", "train.device=auto"])
    assert calls == ["set_device cuda:1", "init_process_group nccl cuda:1", "broadcast"]


def test_workers_restarted_by_torchrun_continue_the_run_their_first_start_made(faces_root, tmp_path,
                                                                             monkeypatch):
    """torchrun --max-restarts N starts the workers again with the same arguments and TORCHELASTIC_RESTART_COUNT
    raised: they continue the run folder of the job's first start instead of making another (in one process here:
    the first start is cut short after writing the run folder, as a killed worker would be)."""
    args = [*tiny_overrides(faces_root, tmp_path), "cv.run_folds=[0]", "name=elastic"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert train_main([*args, "--create-only"]) == 0
    first = the_run(tmp_path)
    assert (tmp_path / "runs" / ".torchrun-job7").read_text().strip() == str(first)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert train_main(args) == 0
    assert the_run(tmp_path) == first and (first / "report.json").exists()
    assert not (tmp_path / "runs" / ".torchrun-job7").exists()  # finished: nothing left for a restart
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # a new job: a new run
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job8")
    assert train_main(args) == 0
    assert len(list((tmp_path / "runs").glob("elastic-*"))) == 2


DP_ARGS = ["cv.folds=2", "stage2.epochs=3", "name=dp"]  # a 2-fold run, long enough to be killed in fold 1


@pytest.fixture(scope="module")
def torchrun_killed_and_resumed(faces_root, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-process torchrun run (2 x 16 photos a step) whose rank 1 is killed with SIGKILL in fold 1's stage 2,
    then resumed under torchrun: (the run directory, the resuming launch). One launch pair serves the resume
    test and the comparison with a single process: every torchrun launch costs seconds of start-up."""
    out = tmp_path_factory.mktemp("torchrun")
    args = tiny_overrides(faces_root, out) + DP_ARGS + ["data.batch_size=16"]
    proc = subprocess.Popen(torchrun(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ONE_THREAD,
                            start_new_session=True)
    deadline, victim = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None and victim is None:
        runs = list((out / "runs").glob("dp-*"))
        if runs and (runs[0] / "fold1" / "stage2" / "last.pt").exists():
            workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            victim = max(map(int, workers)) if workers else None  # a worker (rank 1), not torchrun itself
        time.sleep(0.2)
    assert victim is not None, proc.stderr.read().decode()[-2000:]
    os.kill(victim, signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    run = the_run(out)
    assert not (run / "fold1" / "done.json").exists()
    resumed = subprocess.run(torchrun("--resume", str(run)), capture_output=True, text=True, timeout=600,
                             env=ONE_THREAD)
    return run, resumed


@pytest.mark.slow
def test_kill_9_of_one_rank_then_resume_under_torchrun_finishes(torchrun_killed_and_resumed):
    run, out = torchrun_killed_and_resumed
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fold 0: done, kept" in out.stdout and "1 fold(s) to train" in out.stdout
    report = json.loads((run / "report.json").read_text())
    assert sorted(report["folds"]) == ["0", "1"]


@pytest.mark.slow
def test_two_gloo_processes_train_like_one_with_the_same_effective_batch(torchrun_killed_and_resumed, faces_root,
                                                                          tmp_path):
    run2, resumed = torchrun_killed_and_resumed
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    one = subprocess.run(train(*tiny_overrides(faces_root, tmp_path), *DP_ARGS), capture_output=True, text=True,
                         timeout=600, env=ONE_THREAD)  # tiny_overrides' batch: 32 = 2 x 16
    assert one.returncode == 0, one.stderr[-2000:]
    run1 = the_run(tmp_path)
    assert (run1 / "folds.csv").read_text() == (run2 / "folds.csv").read_text()
    files = lambda run: sorted(p.relative_to(run).as_posix() for p in run.rglob("*")  # noqa: E731
                               if p.is_file() and "/tb/" not in f"/{p.relative_to(run).as_posix()}")
    assert files(run1) == files(run2)  # one set of files, written once
    assert len(list((run2 / "tb").glob("events.*"))) == 2  # rank 0 alone logs: a file per launch
    recorded = json.loads((run2 / "run.json").read_text())
    assert recorded["processes"] == 2 and recorded["effective_batch"] == 32
    assert "16 x 2 processes = 32" in (run2 / "report.md").read_text()
    f1 = lambda run, fold: json.loads((run / "report.json").read_text())["folds"][fold]  # noqa: E731
    # Same data, same effective batch, different sharding and augmentation draws (and fold 1 resumed after the
    # kill). On 24 tiny synthetic people only the mask head learns in 3 epochs (gender and age sit near chance,
    # where one epoch flips them between 0.33 and 0.64), so the mask head is compared: within 0.25.
    for fold in ("0", "1"):
        assert abs(f1(run1, fold)["mask"]["f1_macro"] - f1(run2, fold)["mask"]["f1_macro"]) <= 0.25, fold


@pytest.mark.slow
def test_fold_jobs_side_by_side_make_the_same_report_as_one_job(faces_root, tmp_path, capsys):
    run = create_run(tiny_overrides(faces_root, tmp_path / "par") + ["cv.folds=2", "name=jobs"], capsys)
    assert (run / "config.yaml").exists() and (run / "folds.csv").exists() and not list(run.glob("fold[0-9]*"))
    jobs = [subprocess.Popen(train("--resume", str(run), "--folds", str(k)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ONE_THREAD) for k in (0, 1)]
    outs = [j.communicate(timeout=600) for j in jobs]
    assert all(j.returncode == 0 for j in jobs), [o[1][-1500:] for o in outs]
    assert not (run / "report.json").exists() or all("fold" in o[0] for o in outs)
    assert report_main([str(run)]) == 0  # in this process: it only reads the folds' files

    seq_args = tiny_overrides(faces_root, tmp_path / "seq") + ["cv.folds=2", "name=jobs"]
    seq = subprocess.run(train(*seq_args), capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert seq.returncode == 0, seq.stderr
    seq_run = the_run(tmp_path / "seq")
    assert (seq_run / "folds.csv").read_text() == (run / "folds.csv").read_text()
    parallel, sequential = (json.loads((r / "report.json").read_text()) for r in (run, seq_run))
    for key in ("folds", "mean", "std", "pooled"):
        assert parallel[key] == sequential[key], key
    pd.testing.assert_frame_equal(pd.read_csv(run / "oof.csv"), pd.read_csv(seq_run / "oof.csv"))


@pytest.mark.slow
def test_a_fold_taken_twice_is_an_error_not_a_race(faces_root, tmp_path, capsys):
    run = create_run(tiny_overrides(faces_root, tmp_path) + ["cv.folds=2", "stage2.epochs=200", "name=twice"], capsys)
    first = subprocess.Popen(train("--resume", str(run), "--folds", "0"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=ONE_THREAD)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "fold0" / "stage1" / "metrics.csv").exists():
            time.sleep(0.1)  # the first job holds fold 0 and is training it
        assert first.poll() is None, first.stderr.read().decode()[-1500:]
        second = train_main(["--resume", str(run), "--folds", "0"])  # in this process: it trains nothing
        err = capsys.readouterr().err
    finally:
        first.kill()
        first.wait()
    assert second == 2 and "fold 0 is being trained by pid" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (run / "fold0" / "done.json").exists()

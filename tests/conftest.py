"""Shared fixtures: a small synthetic data set made once per session, and a tiny CPU config."""
from __future__ import annotations

import os

# make test runs the suite in pytest-xdist workers: each takes its share of the cores (torch and the commands the
# tests start read OMP_NUM_THREADS), or the workers slow each other down several times over. One process: 2 threads.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
else:
    os.environ.setdefault("OMP_NUM_THREADS", "2")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from multitask.config import load_config  # noqa: E402
from multitask.data.synth import generate  # noqa: E402


# Tests that share one of these costly fixtures run in the same worker (make test's --dist loadgroup), which builds
# it once; the other session fixtures take seconds and are built by each worker that needs them.
SHARED_IN_ONE_WORKER = ("learned_run", "torchrun_killed_and_resumed")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        for name in SHARED_IN_ONE_WORKER:
            if name in item.fixturenames:
                item.add_marker(pytest.mark.xdist_group(name))


@pytest.fixture(scope="session")
def faces_root(tmp_path_factory) -> Path:
    """24 synthetic people (168 photos) at 96x128, competition layout. Treat as read-only."""
    return generate(tmp_path_factory.mktemp("synth") / "faces", people=24, size=(96, 128), seed=3)


@pytest.fixture(scope="session")
def mask_folders_root(faces_root, tmp_path_factory) -> Path:
    """The session's photos as a folder per mask class, named as the most common public real-mask set names them
    (with_mask/, mask_weared_incorrect/, without_mask/): the layout of extra validation sets."""
    out = tmp_path_factory.mktemp("maskfolders") / "masked"
    names = {"mask1": "with_mask", "mask2": "with_mask", "incorrect_mask": "mask_weared_incorrect",
             "normal": "without_mask"}
    for person in sorted((faces_root / "images").iterdir()):
        for photo, folder in names.items():
            (out / folder).mkdir(parents=True, exist_ok=True)
            shutil.copy(person / f"{photo}.jpg", out / folder / f"{person.name}_{photo}.jpg")
    return out


@pytest.fixture
def faces_copy(faces_root, tmp_path) -> Path:
    """A writable copy, for tests that break the data on purpose."""
    return Path(shutil.copytree(faces_root, tmp_path / "faces"))


def manifest_csv(table: pd.DataFrame, root: Path, name: str) -> Path:
    """``table`` (absolute ``path``s, all under ``root``) written as the manifest ``root/<name>.csv``, its paths
    relative to it: a manifest's photos must lie inside its folder. ``name``: unique for the test (``root`` may be
    the session's shared faces, which no other test lists at their top)."""
    csv = Path(root) / f"{name}.csv"
    table.assign(path=[os.path.relpath(p, root) for p in table["path"]]).to_csv(csv, index=False)
    return csv


def probs_of(df: pd.DataFrame) -> np.ndarray:
    """Every probability column of a prediction table."""
    return df[[c for c in df.columns if c.startswith("p_")]].to_numpy()


def tiny_overrides(root: Path, tmp_path: Path) -> list[str]:
    return [f"data.root={root}", "data.source=competition", "data.crop=null", "data.size=[40,32]",
            "data.batch_size=32", f"data.cache_dir={tmp_path / 'cache'}", f"out_dir={tmp_path / 'runs'}",
            "cv.folds=3", "stage1.epochs=1", "stage2.epochs=1", "train.device=cpu", "train.progress=false",
            # the real-photo augmentation is measured on real photos; tiny synthetic runs test the machinery
            "augment.degrade=0", "augment.color=0", "augment.affine=0"]


@pytest.fixture
def tiny_config(faces_root, tmp_path):
    """Factory: the tiny CPU config on the session's synthetic faces, plus any overrides."""
    return lambda *extra: load_config(tiny_overrides(faces_root, tmp_path) + list(extra))


@pytest.fixture(scope="session")
def trained_run(faces_root, mask_folders_root, tmp_path_factory) -> Path:
    """A tiny 3-fold run on the session's synthetic faces, trained once for predict/explain/dashboard tests;
    it scores the mask folders as an extra validation set. In fp32: under bf16 (precision=auto picks it on a CPU
    with bf16 instructions) a photo's result depends on the batch it ran in, so predict reproduced oof.csv
    only to 4e-3, not the 1e-4 the predict tests hold it to."""
    from multitask.training.cv import run_cv
    from multitask.report import write_report

    tmp = tmp_path_factory.mktemp("trained")
    cfg = load_config(tiny_overrides(faces_root, tmp) + ["stage2.epochs=2", "data.size=[48,40]",
                                                         f"data.extra_val=[{mask_folders_root}]",
                                                         "train.precision=fp32"])
    run = tmp / "runs" / "tiny"
    run_cv(cfg, run, log=lambda s: None)
    write_report(run)
    return run


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory) -> Path:
    """A model trained long enough to be right on synthetic faces (fold 0 of 3, 200 people, 96x72 px of the
    face region, 8 epochs): for the learning and CAM sanity tests. Without the real-photo augmentation, which
    the synthetic photos do not need (it would double the epochs needed), and in fp32, the same numerics on every
    CPU (bf16 is emulated, and slow, without AVX512-BF16). About 1.5 minutes on 2 cores."""
    from multitask.training.cv import run_cv
    from multitask.report import write_report

    tmp = tmp_path_factory.mktemp("learned")
    root = generate(tmp / "faces", people=200, size=(96, 128), seed=5)
    cfg = load_config(tiny_overrides(root, tmp) + [
        "data.size=[96,72]", "data.crop=[72,60]", "cv.run_folds=[0]", "stage1.epochs=2", "stage2.epochs=8",
        "augment.degrade=0", "augment.color=0", "augment.affine=0", "train.precision=fp32"])
    run = tmp / "runs" / "learned"
    run_cv(cfg, run, log=lambda s: None)
    write_report(run)
    return run

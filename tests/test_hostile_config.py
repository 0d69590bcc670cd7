"""Hostile config values and start-up failures: one line naming the key or file, exit 2, no traceback, and no run
folder left behind (nothing was trained, nothing to resume)."""
from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest

from multitask.train import main as train_main

from conftest import tiny_overrides
from test_bad_inputs import no_traceback, run_main

# overrides -> what the one line must say
CONFIG_VALUES = {
    "only: a class the head does not have": (["stage1.only={mask: bogus}"],
                                             "stage1.only.mask='bogus': not a class of head mask"),
    "only: key:value without a space": (["stage1.only={mask:bogus}"], "write 'key: value'"),
    "a head without classes": (["heads.0.classes=[]"], "heads.0.classes=[]: a head needs its class names"),
    "a head beyond the list": (["heads.5.kind=dldl"], "heads has 3 entries (heads.0 to heads.2)"),
    "negative training seed": (["train.seed=-1"], "train.seed=-1: must be >= 0"),
    "negative fold seed": (["cv.seed=-1"], "cv.seed=-1: must be >= 0"),
    "a batch of one photo": (["data.size=[8,8]", "data.batch_size=1"], "data.batch_size=1: must be >= 2"),
    "a size no memory holds": (["data.size=[100000,100000]"], "data.size=[100000, 100000]: two sizes of 8 to 4096"),
    "a negative test-time scale": (["predict.tta_scales=[-1]"], "predict.tta_scales=[-1.0]: scales between 0.25"),
    "a zero test-time scale": (["predict.tta_scales=[0]"], "predict.tta_scales=[0.0]: scales between 0.25"),
    "an empty age group": (["heads.2.thresholds=[30,30]"], "heads.2.thresholds=[30, 30]: each above the one before"),
    "a run outside out_dir": (["name=../escape"], "name='../escape': letters, digits"),
    "a missing YAML file": (["nosuch.yaml"], "nosuch.yaml: no such config file"),
    "a list entry by name": (["heads.x.kind=ce"], "heads is a list: heads.x needs an entry number, heads.0 to heads.2"),
    "a head without its name": (["heads=[{column: mask, classes: [a, b]}]"],
                                "heads.0.name: missing; this setting has no default"),
    "an infinite learning rate": (["optim.lr_heads=inf"], "optim.lr_heads=inf: must be a finite number"),
    "an infinite loss weight": (["loss.person_consistency=inf"],
                                "loss.person_consistency=inf: must be a finite number"),
    "an infinite test-time scale": (["predict.tta_scales=[.inf]"], "predict.tta_scales=[inf]: must be a finite"),
    "a NaN head weight": (["heads.0.loss_weight=nan"], "heads.0.loss_weight=nan: must be a finite number"),
}


def test_a_yaml_file_whose_top_level_is_a_list_is_one_line(tmp_path, capsys):
    (tmp_path / "list.yaml").write_text("- data: {}\n- model: {}\n")
    out = run_main(train_main, capsys, f"out_dir={tmp_path / 'runs'}", tmp_path / "list.yaml")
    no_traceback(out)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "list.yaml: a config file maps settings to values (key: value); its top level is a list" in out.stderr


@pytest.mark.parametrize("case", CONFIG_VALUES)
def test_a_bad_config_value_is_one_line_and_no_run_folder(case, tmp_path, capsys):
    overrides, message = CONFIG_VALUES[case]
    out = run_main(train_main, capsys, f"out_dir={tmp_path / 'runs'}", *overrides)
    no_traceback(out)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def start(faces_root, tmp_path, capsys, *overrides):
    out = run_main(train_main, capsys, *tiny_overrides(faces_root, tmp_path), *overrides)
    no_traceback(out)
    assert "--resume" not in out.stderr  # nothing to continue
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir()), "a run folder was left"
    return out


@pytest.mark.parametrize("overrides, message", [
    (["train.device=cuda"], "train.device=cuda but no CUDA device is available"),
    (["model.arch=resnet999"], "model.arch=resnet999: not a torchvision classifier"),
    (["model.pretrained=/no/such/weights.pt"], "model.pretrained=/no/such/weights.pt: file does not exist"),
    (["cv.folds=100"], "cv.folds=100: the data has 24 persons to hold out"),
    (["train.sync_bn=true", "train.device=cpu"], "train.sync_bn=true shares BatchNorm statistics between GPUs"),
    (["data.extra_val=[/no/such/set]"], "/no/such/set: does not exist"),
])
def test_a_start_that_fails_leaves_no_run_folder(overrides, message, faces_root, tmp_path, capsys):
    out = start(faces_root, tmp_path, capsys, *overrides)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_an_unsafe_weights_file_or_a_set_without_masks_fails_the_start_cleanly(faces_root, tmp_path, capsys):
    import pickle

    unsafe = tmp_path / "weights.pt"
    unsafe.write_bytes(pickle.dumps({"fc.weight": print}))
    out = start(faces_root, tmp_path, capsys, f"model.pretrained={unsafe}")
    assert out.returncode == 2 and "weights.pt: not a checkpoint or state_dict this project can read safely" in out.stderr
    folders = tmp_path / "classes"
    for name in ("cats", "dogs"):
        (folders / name).mkdir(parents=True)
    out = start(faces_root, tmp_path, capsys, f"data.extra_val=[{folders}]")
    assert out.returncode == 2 and "not a labeled face set" in out.stderr


def test_imagenet_weights_that_cannot_be_fetched_fail_the_start_cleanly(faces_root, tmp_path, capsys, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    out = start(faces_root, tmp_path, capsys, "model.pretrained=imagenet")
    assert out.returncode == 2 and "model.pretrained=imagenet: the ImageNet weights for resnet18" in out.stderr


def test_out_dir_that_is_a_file_and_a_cache_where_nothing_can_be_written(faces_root, tmp_path, capsys):
    (tmp_path / "afile.txt").write_text("mine")
    out = run_main(train_main, capsys, *tiny_overrides(faces_root, tmp_path), f"out_dir={tmp_path / 'afile.txt'}")
    no_traceback(out)
    assert out.returncode == 2 and "afile.txt: is a file, not a folder" in out.stderr
    assert (tmp_path / "afile.txt").read_text() == "mine"
    out = run_main(train_main, capsys, *tiny_overrides(faces_root, tmp_path), "data.cache_dir=/proc/nope")
    no_traceback(out)
    assert out.returncode == 3 and "/proc/nope" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def teacher_cases(tmp_path, faces_root) -> dict:
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile.txt").write_text("mine")
    return {  # teacher=[...] -> what the one line says
        "/no/such/run": "teacher=/no/such/run: not a run directory (no config.yaml), nor a folder of runs",
        str(tmp_path / "empty"): "empty: not a run directory (no config.yaml), nor a folder of runs",
        str(tmp_path / "afile.txt"): "afile.txt: not a run directory",
        str(faces_root): "not a run directory (no config.yaml), nor a folder of runs",
        str(tmp_path / "runs"): "runs: not a run directory",  # out_dir: it would hold only the new run itself
    }


@pytest.mark.parametrize("create_only", [True, False])
def test_every_check_of_a_start_runs_before_the_run_folder_exists(faces_root, tmp_path, capsys, create_only):
    """--create-only fails where the training would: on teachers that cannot teach and on a value column the data
    does not have, with no run folder left."""
    flag = ["--create-only"] if create_only else []
    for teacher, message in teacher_cases(tmp_path, faces_root).items():
        out = start(faces_root, tmp_path, capsys, f"teacher=[{teacher}]", *flag)
        assert out.returncode == 2 and message in out.stderr, (teacher, out.stderr)
    for head in (["heads.2.kind=dldl"], ["heads.2.train_thresholds=[30,58]"]):
        out = start(faces_root, tmp_path, capsys, *head, "heads.2.value_column=nonexistent", *flag)
        assert out.returncode == 2 and "heads.2.value_column=nonexistent: not a column of the data" in out.stderr


@pytest.mark.slow
def test_a_teacher_that_cannot_teach_a_fold_fails_create_only(trained_run, faces_root, tmp_path, capsys):
    """The session's run trained on every fold's people: refused for a student on the same people before the
    student's folder exists."""
    out = start(faces_root, tmp_path, capsys, f"teacher=[{trained_run}]", "--create-only")
    assert out.returncode == 2 and "no teacher model predicted fold 0's training photos" in out.stderr
    import shutil

    import yaml

    unfinished = Path(shutil.copytree(trained_run, tmp_path / "unfinished"))
    for oof in unfinished.rglob("oof.csv"):
        oof.unlink()
    other = Path(shutil.copytree(trained_run, tmp_path / "other_heads"))
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["heads"][1]["classes"] = ["m", "f"]
    (other / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    for teacher, message in ((unfinished, "no fold has finished (no fold<k>/oof.csv)"),
                             (other, "its head gender is not this run's")):
        out = start(faces_root, tmp_path, capsys, f"teacher=[{teacher}]", "--create-only")
        assert out.returncode == 2 and message in out.stderr, out.stderr


def test_a_heads_old_loss_key_names_its_new_name(tmp_path, capsys):
    """heads.N.loss was the head's kind: the old key is one line naming heads.N.kind, on the command line, in a YAML
    file and in a run's saved config."""
    out = run_main(train_main, capsys, f"out_dir={tmp_path / 'runs'}", "heads.2.loss=dldl")
    no_traceback(out)
    assert out.returncode == 2 and "heads.2.loss is now heads.2.kind" in out.stderr
    (tmp_path / "heads.yaml").write_text("heads:\n  - {name: mask, column: mask, classes: [a, b], loss: ce}\n")
    out = run_main(train_main, capsys, f"out_dir={tmp_path / 'runs'}", tmp_path / "heads.yaml")
    assert out.returncode == 2 and "heads.yaml: heads.0.loss is now heads.0.kind (the head's kind: ce)" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
    from multitask.config import ConfigError, load_config, to_yaml

    old_run = tmp_path / "config.yaml"
    old_run.write_text(to_yaml(load_config([])).replace("kind: ce", "loss: ce"))
    with pytest.raises(ConfigError, match="config.yaml: heads.0.loss is now heads.0.kind"):
        load_config(base=old_run)

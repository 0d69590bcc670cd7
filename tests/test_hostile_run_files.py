"""A damaged run folder: every command that reads it names the file and the problem in one line, exit 2."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from multitask.predict import main as predict_main
from multitask.report import main as report_main
from multitask.train import main as train_main

from test_bad_inputs import no_traceback, run_main

pytestmark = pytest.mark.slow


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("lock")))


def edit_config(run: Path, change) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    change(cfg)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def predicted(run, faces_root, tmp_path, capsys):
    person = sorted((faces_root / "images").iterdir())[0]
    out = run_main(predict_main, capsys, "--run", run, person, "--out", tmp_path / "out", "--folds", 0)
    no_traceback(out)
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    return out


def poison(checkpoint: Path, value: float) -> None:
    """One weight of the first layer set to ``value``, as a diverged training leaves it."""
    state = torch.load(checkpoint)
    state["model"]["trunk.conv1.weight"][0, 0, 0, 0] = value
    torch.save(state, checkpoint)


DAMAGE = {  # name -> (how the run is damaged, what the one line says)
    "corrupt run.json": (lambda r: (r / "run.json").write_text('{"data_root": '), "run.json: not valid JSON"),
    "run.json a list": (lambda r: (r / "run.json").write_text("[1, 2]"), "run.json: expected a JSON object"),
    "empty config.yaml": (lambda r: (r / "config.yaml").write_text(""), "config.yaml: not a run's config"),
    "best.pt holding a list": (lambda r: torch.save([1, 2], r / "fold0" / "stage2" / "best.pt"),
                               "best.pt: not a checkpoint of this project"),
    "the arch edited": (lambda r: edit_config(r, lambda c: c["model"].update(arch="resnet34")),
                        "best.pt: does not fit the model"),
    "a class added to a head": (lambda r: edit_config(r, lambda c: c["heads"][0]["classes"].append("scarf")),
                                "best.pt: does not fit the model"),
    "weights full of NaN": (lambda r: poison(r / "fold0" / "stage2" / "best.pt", float("nan")),
                            "best.pt: tensor trunk.conv1.weight holds NaN or infinite values"),
    "an infinite weight": (lambda r: poison(r / "fold0" / "stage2" / "best.pt", float("inf")),
                           "best.pt: tensor trunk.conv1.weight holds NaN or infinite values"),
    "a run of version 0.1": (lambda r: edit_config(r, lambda c: c["data"].update(age_thresholds=[30, 60])),
                             "config.yaml: a run of multitask 0.1 (age thresholds under data:, not on the age head); "
                             "read it with multitask 0.1.0 or train it again"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_predict_names_the_damaged_file(case, run, faces_root, tmp_path, capsys):
    damage, message = DAMAGE[case]
    damage(run)
    out = predicted(run, faces_root, tmp_path, capsys)
    assert out.returncode == 2 and message in out.stderr, out.stderr


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "fold1" / "done.json").write_text("{oops"), "done.json: not valid JSON"),
    (lambda r: pd.read_csv(r / "fold0" / "oof.csv").drop(columns=["true_mask"]).to_csv(r / "fold0" / "oof.csv"),
     "oof.csv: missing column(s) ['true_mask']"),
    (lambda r: (r / "fold0" / "stage2" / "metrics.csv").write_text("a,b\n1,2\n"),
     "metrics.csv: missing column(s) ['epoch', 'loss']"),
    (lambda r: (r / "fold0" / "oof.csv").write_bytes(b"\x00\xff\xfe garbage"), "oof.csv: not a table"),
])
def test_report_names_the_damaged_file(damage, message, run, capsys):
    damage(run)
    out = run_main(report_main, capsys, run)
    no_traceback(out)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_resume_names_a_garbage_folds_file(run, capsys):
    shutil.rmtree(run / "fold2")  # a fold left to train
    (run / "folds.csv").write_text("person_id,fold\n000001,zero\n")
    out = run_main(train_main, capsys, "--resume", run)
    no_traceback(out)
    assert out.returncode == 2 and "folds.csv: column fold holds values that are not fold numbers" in out.stderr
    (run / "folds.csv").write_text("who,where\n")
    out = run_main(train_main, capsys, "--resume", run)
    assert out.returncode == 2 and "folds.csv: missing column(s) ['person_id', 'fold']" in out.stderr


def test_resume_after_the_size_was_edited_is_refused(run, capsys):
    shutil.rmtree(run / "fold2")  # a fold left to train
    edit_config(run, lambda c: c["data"].update(size=[64, 48]))
    out = run_main(train_main, capsys, "--resume", run)
    no_traceback(out)
    assert out.returncode == 2 and "edited since the run started (data.size: [48, 40] -> [64, 48])" in out.stderr
    edit_config(run, lambda c: c["predict"].update(tta_flip=False))  # how to use the models: free to change
    edit_config(run, lambda c: c["data"].update(size=[48, 40]))
    assert run_main(train_main, capsys, "--resume", run, "--show-config").returncode == 0


@pytest.mark.parametrize("command", ["explain", "export"])
def test_weights_that_are_not_finite_are_refused_by_every_command(command, run, faces_root, tmp_path, capsys):
    from multitask.explain import main as explain_main
    from multitask.export import main as export_main

    poison(run / "fold0" / "stage2" / "best.pt", float("nan"))
    photo = next((faces_root / "images").rglob("mask1.jpg"))
    args = {"explain": (explain_main, "--run", run, "--fold", 0, photo, "--out", tmp_path / "o"),
            "export": (export_main, "--run", run, "--folds", 0, "--out", tmp_path / "o", "--format", "torchscript")}
    out = run_main(args[command][0], capsys, *args[command][1:])
    no_traceback(out)
    assert out.returncode == 2 and "trunk.conv1.weight holds NaN or infinite values" in out.stderr
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_the_system_will_not_let_us_read_is_a_system_error(run, faces_root, tmp_path, capsys,
                                                                        monkeypatch):
    import errno

    import multitask.model

    def refused(path, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(multitask.model.torch, "load", refused)
    out = predicted(run, faces_root, tmp_path, capsys)
    assert out.returncode == 3 and "permission denied at" in out.stderr and "best.pt" in out.stderr

"""A model file to take anywhere: the exported graph gives predict's probabilities, decoding included."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from multitask import load_run
from multitask.config import HeadConfig, ModelConfig, load_config
from multitask.data.transforms import Preprocessing
from multitask.export import HeadProbabilities, main as export_main
from multitask.model import build_model
from multitask.predict import predict
from multitask.trainer import run_cv

from conftest import tiny_overrides

ort = pytest.importorskip("onnxruntime")


def run_onnx(path: Path, batch: np.ndarray) -> dict:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {session.get_inputs()[0].name: batch})))


def network_batch(run: Path, paths) -> np.ndarray:
    """The photos as the run's validation transform makes them: what preprocessing.json describes."""
    cfg = load_config(base=run / "config.yaml")
    pre = Preprocessing.from_config(cfg)
    return torch.stack([pre.eval()(image=pre.prepare(Path(p)))["image"] for p in paths]).numpy()


@pytest.fixture(scope="module")
def fp32_runs(faces_root, tmp_path_factory):
    """A ce run of two folds whose mask head predicts with the training prior, and a one-fold dldl run; fp32,
    so that the graph and predict compute the same numbers on any CPU."""
    runs = {}
    for name, extra in {"ce": ["cv.run_folds=[0,1]", "heads.0.prior=training"],
                        "dldl": ["cv.run_folds=[0]", "heads.2.loss=dldl"]}.items():
        tmp = tmp_path_factory.mktemp(name)
        cfg = load_config(tiny_overrides(faces_root, tmp) + ["train.precision=fp32", *extra])
        run_cv(cfg, tmp / name, log=lambda s: None)
        runs[name] = tmp / name
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ce", "dldl"])
def test_the_onnx_graph_gives_predicts_probabilities(kind, fp32_runs, faces_root, tmp_path):
    run = fp32_runs[kind]
    assert export_main(["--run", str(run), "--out", str(tmp_path / "export")]) == 0
    person = sorted((faces_root / "images").iterdir())[0]
    expected = predict(run, person, tmp_path / "pred", progress=False, log=lambda s: None)
    got = run_onnx(tmp_path / "export" / "model.onnx", network_batch(run, expected["path"]))
    for head, classes in {"mask": ["worn", "incorrect", "not_worn"], "gender": ["male", "female"],
                          "age": ["<30", "30-59", "60+"]}.items():
        np.testing.assert_allclose(got[f"p_{head}"], expected[[f"p_{head}_{c}" for c in classes]], atol=1e-4)
    if kind == "dldl":
        np.testing.assert_allclose(got["years_age"], expected["years_age"], atol=0.01)  # predict rounds to 0.01
    else:
        assert "years_age" not in got
    info = json.loads((tmp_path / "export" / "preprocessing.json").read_text())
    assert info["input"]["shape"] == ["N", 3, 40, 32] and info["views_in_graph"] == ["plain", "mirrored"]
    assert info["outputs"]["p_mask"]["classes"] == ["worn", "incorrect", "not_worn"]
    assert info["folds"] == ([0, 1] if kind == "ce" else [0])
    assert info["outputs"]["p_mask"]["prior"] == ("training" if kind == "ce" else "balanced")


@pytest.mark.slow
def test_torchscript_export_loads_without_the_project_and_matches(fp32_runs, faces_root, tmp_path):
    path = load_run(fp32_runs["dldl"]).export(tmp_path / "ts", format="torchscript")
    batch = network_batch(fp32_runs["dldl"], sorted((faces_root / "images").iterdir())[0].glob("*.jpg"))
    onnx_path = load_run(fp32_runs["dldl"]).export(tmp_path / "onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still the file many can load
        scripted = torch.jit.load(str(path))(torch.from_numpy(batch))
    np.testing.assert_allclose(scripted[0].numpy(), run_onnx(onnx_path, batch)["p_mask"], atol=1e-5)


@pytest.mark.parametrize("loss", ["ce", "ordinal", "dldl", "regression"])
def test_every_age_decoding_is_inside_the_graph(loss, tmp_path):
    heads = [HeadConfig("mask", "mask", ["worn", "incorrect", "not_worn"]),
             HeadConfig("age", "age_group", ["<30", "30-59", "60+"], loss=loss)]
    model, _ = build_model(ModelConfig(arch="resnet18"), heads)
    model.eval()
    graph = HeadProbabilities([model], ["mask", "age"], flip=False)
    x = torch.randn(3, 3, 48, 40)
    torch.onnx.export(graph, (x,), input_names=["image"], output_names=graph.output_names(), dynamo=True,
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}}).save(str(tmp_path / "m.onnx"))
    x5 = torch.randn(5, 3, 48, 40)  # another batch size than the export's
    got = run_onnx(tmp_path / "m.onnx", x5.numpy())
    with torch.no_grad():
        logits = model(x5)
        want = model.probabilities(logits)
        years = model.years(logits)
    np.testing.assert_allclose(got["p_age"], want["age"].numpy(), atol=1e-5)
    np.testing.assert_allclose(got["p_mask"], want["mask"].numpy(), atol=1e-5)
    assert ("years_age" in got) == (loss in ("dldl", "regression"))
    if "years_age" in got:
        np.testing.assert_allclose(got["years_age"], years["age"].numpy(), rtol=1e-5)


def test_an_earlier_export_is_not_replaced_without_overwrite(fp32_runs, tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "model.onnx").write_text("mine")
    assert export_main(["--run", str(fp32_runs["dldl"]), "--out", str(out)]) == 2
    assert "holds an earlier export (model.onnx); give another folder or --overwrite" in capsys.readouterr().err
    assert (out / "model.onnx").read_text() == "mine"

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
from multitask.training.cv import run_cv

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
    return torch.stack([pre.eval()(image=pre.framing(Path(p)))["image"] for p in paths]).numpy()


@pytest.fixture(scope="module")
def fp32_run(faces_root, tmp_path_factory) -> Path:
    """Two folds whose mask and gender heads are ce (the mask deciding with the training prior) and whose age head
    is dldl (a distribution over years); fp32, so that the graph and predict compute the same numbers on any CPU."""
    tmp = tmp_path_factory.mktemp("fp32")
    cfg = load_config(tiny_overrides(faces_root, tmp) + ["train.precision=fp32", "cv.run_folds=[0,1]",
                                                         "heads.0.prior=training", "heads.2.kind=dldl"])
    run_cv(cfg, tmp / "run", log=lambda s: None)
    return tmp / "run"


@pytest.mark.slow
def test_the_onnx_graph_gives_predicts_probabilities_for_ce_and_dldl_heads(fp32_run, faces_root, tmp_path):
    assert export_main(["--run", str(fp32_run), "--out", str(tmp_path / "export")]) == 0
    person = sorted((faces_root / "images").iterdir())[0]
    expected = predict(fp32_run, person, tmp_path / "pred", progress=False, log=lambda s: None)
    got = run_onnx(tmp_path / "export" / "model.onnx", network_batch(fp32_run, expected["path"]))
    for head, classes in {"mask": ["worn", "incorrect", "not_worn"], "gender": ["male", "female"],
                          "age": ["<30", "30-59", "60+"]}.items():
        np.testing.assert_allclose(got[f"p_{head}"], expected[[f"p_{head}_{c}" for c in classes]], atol=1e-4)
    np.testing.assert_allclose(got["value_age"], expected["value_age"], atol=0.01)  # predict rounds to 0.01
    info = json.loads((tmp_path / "export" / "preprocessing.json").read_text())
    assert info["input"]["shape"] == ["N", 3, 40, 32] and info["views_in_graph"] == ["plain", "mirrored"]
    assert info["outputs"]["p_mask"] == {"head": "mask", "classes": ["worn", "incorrect", "not_worn"],
                                         "prior": "training"}
    assert info["folds"] == [0, 1] and info["outputs"]["value_age"]["value_column"] == "age"


@pytest.mark.slow
def test_torchscript_export_loads_without_the_project_and_matches(fp32_run, faces_root, tmp_path):
    model = load_run(fp32_run, folds=[0])
    path = model.export(tmp_path / "ts", format="torchscript")
    onnx_path = model.export(tmp_path / "onnx")
    batch = network_batch(fp32_run, sorted((faces_root / "images").iterdir())[0].glob("*.jpg"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still the file many can load
        scripted = torch.jit.load(str(path))(torch.from_numpy(batch))
    np.testing.assert_allclose(scripted[0].numpy(), run_onnx(onnx_path, batch)["p_mask"], atol=1e-5)


def test_every_head_kinds_decoding_is_inside_the_graph(tmp_path):
    """One model with a head of every loss: the graph's outputs are the model's own probabilities and years."""
    classes = ["<30", "30-59", "60+"]
    heads = [HeadConfig("mask", "mask", ["worn", "incorrect", "not_worn"])]
    heads += [HeadConfig(f"age_{kind}", "age_group", classes, kind=kind) for kind in ("ordinal", "dldl", "regression")]
    model, _ = build_model(ModelConfig(arch="resnet18"), heads)
    model.eval()
    graph = HeadProbabilities([model], [h.name for h in heads], flip=False)
    x = torch.randn(3, 3, 48, 40)
    torch.onnx.export(graph, (x,), input_names=["image"], output_names=graph.output_names(), dynamo=True,
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}}).save(str(tmp_path / "m.onnx"))
    x5 = torch.randn(5, 3, 48, 40)  # another batch size than the export's
    got = run_onnx(tmp_path / "m.onnx", x5.numpy())
    with torch.no_grad():
        logits = model(x5)
        want, values = model.probabilities(logits), model.predicted_values(logits)
    for h in heads:
        np.testing.assert_allclose(got[f"p_{h.name}"], want[h.name].numpy(), atol=1e-5)
    assert sorted(k for k in got if k.startswith("value_")) == ["value_age_dldl", "value_age_regression"]
    for name, y in values.items():
        np.testing.assert_allclose(got[f"value_{name}"], y.numpy(), rtol=1e-5)


@pytest.mark.slow
def test_an_earlier_export_is_not_replaced_without_overwrite(fp32_run, tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "model.onnx").write_text("mine")
    assert export_main(["--run", str(fp32_run), "--out", str(out)]) == 2
    assert "not empty; give a new folder, or --overwrite to replace what an earlier export wrote there" in \
        capsys.readouterr().err
    assert (out / "model.onnx").read_text() == "mine"

"""The trunk + heads model: architectures, CAM layers, and where pretrained weights come from."""
from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
import torchvision

from multitask.config import HeadConfig, ModelConfig, load_config
from multitask.model import MultiHeadNet, WeightsError, build_model, for_inference, stage_layers

HEADS = load_config().heads


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0"])
def test_any_torchvision_classifier_gets_the_heads_and_four_cam_layers(arch):
    model, loaded = build_model(ModelConfig(arch=arch), HEADS)
    assert not loaded
    logits = model.eval()(torch.randn(2, 3, 64, 48))
    assert logits.shape == (2, 8)
    assert {k: v.shape for k, v in model.split(logits).items()} == {
        "mask": (2, 3), "gender": (2, 2), "age": (2, 3)}
    layers = stage_layers(model, (64, 48))
    assert len(layers) == 4
    if arch.startswith("resnet"):
        assert list(layers) == ["layer1", "layer2", "layer3", "layer4"]


def test_a_state_dict_file_is_loaded_into_the_trunk_and_sets_the_learning_rates(tmp_path):
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    model, loaded = build_model(ModelConfig(pretrained=str(tmp_path / "r18.pth")), HEADS)
    assert loaded
    assert torch.equal(model.trunk.conv1.weight, reference.conv1.weight)
    cfg = load_config()
    assert cfg.optim.learning_rates(weights_loaded=True) == (1e-4, 6e-4)  # a trained trunk moves 6x slower
    assert cfg.optim.learning_rates(weights_loaded=False) == (1e-3, 1e-3)  # from random init the trunk learns as fast
    cfg.optim.lr_heads = 2e-3
    assert cfg.optim.learning_rates(weights_loaded=True) == (1e-4, 2e-3)


def test_mobilenet_features_without_classifier_load(tmp_path):
    """The shape of ImageNet trunk files shipped as features only (classifier keys missing)."""
    state = {k: v for k, v in torchvision.models.mobilenet_v2().state_dict().items() if k.startswith("features.")}
    torch.save(state, tmp_path / "mnv2.pth")
    _, loaded = build_model(ModelConfig(arch="mobilenet_v2", pretrained=str(tmp_path / "mnv2.pth")), HEADS)
    assert loaded


def test_weights_for_another_architecture_are_refused_naming_the_file(tmp_path):
    torch.save(torchvision.models.mobilenet_v2().state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="wrong.pth.*does not fit torchvision resnet18"):
        build_model(ModelConfig(pretrained=str(tmp_path / "wrong.pth")), HEADS)
    (tmp_path / "junk.pth").write_bytes(b"nonsense")
    with pytest.raises(WeightsError, match="junk.pth: not a checkpoint or state_dict this project can read safely"):
        build_model(ModelConfig(pretrained=str(tmp_path / "junk.pth")), HEADS)
    with pytest.raises(WeightsError, match="does not exist"):
        build_model(ModelConfig(pretrained=str(tmp_path / "nowhere.pth")), HEADS)


def test_missing_imagenet_weights_offline_stop_with_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as e:
        build_model(ModelConfig(pretrained="imagenet"), HEADS)
    msg = str(e.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in msg
    assert "model.pretrained=none" in msg


def test_imagenet_weights_are_read_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model, loaded = build_model(ModelConfig(pretrained="imagenet"), HEADS)
    assert loaded and torch.equal(model.trunk.conv1.weight, reference.conv1.weight)


def two_heads(prior: str) -> MultiHeadNet:
    heads = [HeadConfig("mask", "mask", ["worn", "incorrect", "not_worn"], prior=prior),
             HeadConfig("gender", "gender", ["male", "female"])]
    return MultiHeadNet(torch.nn.Flatten(), 4, heads)


def test_the_training_prior_takes_the_class_weights_out_of_the_probabilities():
    """Weighted by w, a head learns p(c|x) * w_c; with prior: training its probabilities are divided by w_c again
    (a class never trained on gets 0), and a balanced head's are its softmax."""
    weights = {"mask": torch.tensor([0.25, 2.0, 0.0]), "gender": torch.tensor([0.5, 1.5])}
    x = torch.randn(5, 4)
    for prior in ("balanced", "training"):
        model = two_heads(prior)
        model.keep_class_weights(weights)
        logits = model.split(model(x))
        probs = model.probabilities(model(x))
        assert torch.allclose(probs["gender"], logits["gender"].softmax(1))
        if prior == "balanced":
            assert torch.allclose(probs["mask"], logits["mask"].softmax(1))
            continue
        expected = logits["mask"].softmax(1) * torch.tensor([4.0, 0.5, 0.0])
        assert torch.allclose(probs["mask"], expected / expected.sum(1, keepdim=True), atol=1e-6)
        assert probs["mask"][:, 2].eq(0).all() and torch.allclose(probs["mask"].sum(1), torch.ones(5))


def test_class_weights_are_saved_with_the_model():
    trained = two_heads("training")
    trained.keep_class_weights({"mask": torch.tensor([0.25, 2.0, 2.0])})
    state = trained.state_dict()
    assert state["heads.mask.class_weights"].tolist() == [0.25, 2.0, 2.0]
    loaded = two_heads("training")
    loaded.load_state_dict(state)
    assert loaded.heads["mask"].class_weights.tolist() == [0.25, 2.0, 2.0]


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_the_model_predicts_with_its_batch_norms_folded_into_the_convolutions(arch):
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(arch=arch, pretrained="none"), load_config([]).heads)
    model.train()
    for _ in range(3):  # running statistics that are not the identity
        model(torch.randn(8, 3, 64, 48) * 2 + 0.5)
    model.eval()
    fused = for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.trunk.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.trunk.modules())  # the original is untouched
    x = torch.randn(4, 3, 64, 48)
    with torch.no_grad():
        for head, p in model.probabilities(model(x)).items():
            np.testing.assert_allclose(fused.probabilities(fused(x))[head].numpy(), p.numpy(), atol=1e-5)

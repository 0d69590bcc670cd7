"""A torchvision trunk shared by one linear head per task.

The network returns the heads' logits concatenated (``MultiHeadNet.split`` cuts them apart), so Grad-CAM, TTA
and ensembling see one plain tensor.
"""
from __future__ import annotations

import copy
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torchvision
from torch import nn

from multitask.config import HeadConfig, ModelConfig
from multitask.errors import BadInput
from multitask.heads import kind, value_heads


class WeightsError(BadInput, RuntimeError):
    """Pretrained weights were asked for and cannot be had."""


class MultiHeadNet(nn.Module):
    """A trunk and one linear head per task. Each head's raw outputs follow its kind (heads.py);
    ``probabilities`` turns them into class probabilities, whatever the kind. Each head keeps the class weights it
    was last trained with (a buffer, saved with the weights), so that a head with ``prior: training`` can take
    them out."""

    def __init__(self, trunk: nn.Module, features: int, heads: Sequence[HeadConfig], dropout: float = 0.0):
        super().__init__()
        self.trunk = trunk
        self.head_configs = list(heads)
        self.head_names = [h.name for h in heads]
        self.head_sizes = [kind(h).outputs(len(h.classes)) for h in heads]
        self.heads = nn.ModuleDict(
            {h.name: nn.Sequential(nn.Dropout(dropout), nn.Linear(features, n)) for h, n in zip(heads, self.head_sizes)})
        for h, head in zip(heads, self.heads.values()):
            head.register_buffer("class_weights", torch.ones(len(h.classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.trunk(x)
        return torch.cat([self.heads[n](f) for n in self.head_names], dim=1)

    def split(self, logits: torch.Tensor) -> Dict[str, torch.Tensor]:
        return dict(zip(self.head_names, torch.split(logits, self.head_sizes, dim=1)))

    def head_config(self, name: str) -> HeadConfig:
        return self.head_configs[self.head_names.index(name)]

    def head_offset(self, name: str) -> int:
        i = self.head_names.index(name)
        return sum(self.head_sizes[:i])

    def keep_class_weights(self, weights: Dict[str, torch.Tensor]) -> None:
        """Record the class weights a stage trains these heads with."""
        for name, w in weights.items():
            self.heads[name].class_weights.copy_(w)

    def head_probabilities(self, name: str, outputs: torch.Tensor) -> torch.Tensor:
        """Class probabilities of one head from its raw outputs (N x its output size)."""
        head = self.head_config(name)
        if head.prior == "training":
            # A loss weighted by w_c learns p(c|x) * w_c (normalised); dividing by w_c gives back the training
            # photos' frequencies. A class never seen in training (weight 0) gets probability 0.
            w = self.heads[name].class_weights.float()
            outputs = outputs.float() + torch.where(w > 0, -w.log(), torch.full_like(w, -torch.inf))
        return kind(head).probabilities(outputs, head.thresholds)

    def probabilities(self, logits: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {name: self.head_probabilities(name, part) for name, part in self.split(logits).items()}

    @property
    def value_heads(self) -> List[str]:
        """The heads that predict a value (e.g. the age in years), not only a class."""
        return [h.name for h in value_heads(self.head_configs)]

    def predicted_values(self, logits: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The predicted value (e.g. the age in years) of each of the ``value_heads``."""
        parts = self.split(logits)
        return {name: kind(self.head_config(name)).value(parts[name]) for name in self.value_heads}


def _strip_classifier(net: nn.Module) -> int:
    """Replace the classifier's last Linear with Identity in place; returns its input width."""
    last = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ValueError(f"{type(net).__name__}: no Linear classifier to replace")
    parent_name, _, child = last.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    features = getattr(parent, child).in_features
    setattr(parent, child, nn.Identity())
    return features


def imagenet_weights(arch: str):
    try:
        return torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError) as e:
        raise WeightsError(f"model.arch={arch}: torchvision has no ImageNet weights for it ({e})") from e


def _load_imagenet(arch: str) -> nn.Module:
    weights = imagenet_weights(arch)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return torchvision.models.get_model(arch, weights=weights)
    except Exception as e:  # offline: URLError/OSError; a corrupt cache file: RuntimeError
        raise WeightsError(
            f"model.pretrained=imagenet: the ImageNet weights for {arch} are not in the torch hub cache "
            f"({cached}) and could not be downloaded ({type(e).__name__}: {e}).\n"
            f"On a connected machine, run: python -c \"import torchvision; torchvision.models.get_model("
            f"'{arch}', weights='DEFAULT')\" and copy {cached.name} into {cached.parent} (or set TORCH_HOME); "
            f"or use model.pretrained=none, or model.pretrained=PATH to a state_dict file.") from e


def load_checkpoint(path: Path) -> dict:
    """A checkpoint or state_dict file, read with weights_only=True (tensors and plain data only: a pickle that
    would run code is refused). Any failure is one WeightsError line naming the file."""
    if not Path(path).is_file():
        raise WeightsError(f"{path}: file does not exist")
    try:
        with warnings.catch_warnings():  # torch's warnings on a bad file suggest turning the safety off
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        if e.errno is None:  # a damaged file, said as one below
            raise WeightsError(f"{path}: not a checkpoint or state_dict this project can read safely "
                               f"({type(e).__name__}); it was not loaded") from None
        raise OSError(e.errno, e.strerror, str(path)) from None  # the system refused: permission, ...
    except Exception as e:  # corrupt, truncated, or code inside: never loaded another way
        raise WeightsError(f"{path}: not a checkpoint or state_dict this project can read safely "
                           f"({type(e).__name__}); it was not loaded") from None


def check_finite(state: dict, path: Path) -> None:
    """Weights with a NaN or an infinity (a training that diverged, a damaged file) predict nonsense with
    confidence: refused, naming the first such tensor."""
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise WeightsError(f"{path}: tensor {name} holds NaN or infinite values; these weights cannot predict "
                               "(did the training diverge?)")


def _load_state_dict_file(net: nn.Module, path: Path, arch: str) -> None:
    if not path.is_file():
        raise WeightsError(f"model.pretrained={path}: file does not exist")
    state = load_checkpoint(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # one of our checkpoints, or the torchvision references' format
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state_dict (parameter name -> tensor)")
    check_finite(state, path)
    own = net.state_dict()
    wrong_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if not any(k in own for k in state) or unexpected or wrong_shape:
        raise WeightsError(
            f"{path}: does not fit torchvision {arch}: {len(unexpected)} unexpected key(s) {unexpected[:3]}, "
            f"{len(wrong_shape)} of the wrong shape {wrong_shape[:3]}; is model.arch right?")
    classifier = [k for k in missing if not k.startswith(("fc.", "classifier.", "head.", "heads."))]
    if classifier:
        raise WeightsError(f"{path}: trunk weights missing for {arch}: {classifier[:5]}")
    net.load_state_dict(state, strict=False)


TIMM = "timm/"  # model.arch=timm/<name>: a trunk of timm's (pip install timm)


def _timm():
    try:
        import timm
    except ImportError:
        raise WeightsError("model.arch=timm/...: needs timm (pip install 'multitask[timm]')") from None
    return timm


def _timm_trunk(cfg: ModelConfig) -> tuple[nn.Module, bool]:
    """A timm model without its classifier (it returns pooled features), from timm's local cache with
    model.pretrained=imagenet (never downloaded) or from a state_dict file. Transformers take any input size."""
    timm, name = _timm(), cfg.arch[len(TIMM):]
    if name not in timm.list_models():
        raise WeightsError(f"model.arch={cfg.arch}: not a timm model (timm.list_models() lists them)")
    loaded = cfg.pretrained != "none"
    if cfg.pretrained == "imagenet":
        os.environ["HF_HUB_OFFLINE"] = "1"  # the weights come from the local cache or not at all
        try:
            net = _create_timm(timm, name, pretrained=True)
        except Exception as e:  # not cached: the hub's offline error; a damaged file: its own
            raise WeightsError(f"model.pretrained=imagenet: timm's weights for {name} are not in its local cache "
                               f"({type(e).__name__}); copy them there (HF_HOME) on a connected machine, or give "
                               "model.pretrained=PATH to a state_dict file") from None
    else:
        net = _create_timm(timm, name, pretrained=False)
        if loaded:
            _load_state_dict_file(net, Path(cfg.pretrained), cfg.arch)
    net.reset_classifier(0)
    return net, loaded


def _create_timm(timm, name: str, pretrained: bool) -> nn.Module:
    """A transformer at any input size (its position embedding resampled to the patch grid of each input); a
    ConvNet, which takes any size anyway, has no such argument."""
    try:
        return timm.create_model(name, pretrained=pretrained, dynamic_img_size=True)
    except TypeError:
        return timm.create_model(name, pretrained=pretrained)


def normalization(cfg: ModelConfig) -> tuple[tuple, tuple]:
    """The (mean, std) the trunk's inputs are normalised with: its pretrained config's for a timm model (as timm's
    ``resolve_data_config``; no weights read), ImageNet's for torchvision."""
    from multitask.data.transforms import IMAGENET

    if not cfg.arch.startswith(TIMM):
        return IMAGENET
    timm = _timm()
    pretrained = timm.get_pretrained_cfg(cfg.arch[len(TIMM):])
    config = timm.data.resolve_data_config({}, pretrained_cfg=pretrained.to_dict() if pretrained else {})
    return tuple(config["mean"]), tuple(config["std"])


def build_model(cfg: ModelConfig, heads: Sequence[HeadConfig]) -> tuple[MultiHeadNet, bool]:
    """(model, whether pretrained weights were loaded into the trunk)."""
    if cfg.arch.startswith(TIMM):
        net, loaded = _timm_trunk(cfg)
        return MultiHeadNet(net, net.num_features, heads, cfg.dropout), loaded
    if cfg.arch not in torchvision.models.list_models(module=torchvision.models):
        raise WeightsError(f"model.arch={cfg.arch}: not a torchvision classifier (or timm/<name>, a timm model)")
    if cfg.pretrained == "imagenet":
        net, loaded = _load_imagenet(cfg.arch), True
    else:
        net, loaded = torchvision.models.get_model(cfg.arch, weights=None), False
        if cfg.pretrained != "none":
            _load_state_dict_file(net, Path(cfg.pretrained), cfg.arch)
            loaded = True
    features = _strip_classifier(net)
    return MultiHeadNet(net, features, heads, cfg.dropout), loaded


def for_inference(model: MultiHeadNet) -> MultiHeadNet:
    """A copy of ``model`` to predict with: in eval mode, every batch norm folded into the convolution before it
    (the same function, without a pass over every activation for the norm). A trunk torch.fx cannot trace keeps
    its batch norms."""
    from torch.fx.experimental.optimization import fuse

    fused = copy.deepcopy(model).eval()
    try:
        fused.trunk = fuse(fused.trunk, inplace=True)  # already a copy
    except Exception:  # torch.fx cannot trace it (control flow on shapes, as in a transformer's): kept as it is
        pass
    return fused


def stage_layers(model: MultiHeadNet, image_size: Sequence[int] = (128, 96)) -> "OrderedDict[str, nn.Module]":
    """The trunk's stages, shallow to deep, for per-layer CAMs: a timm model's last four ``feature_info`` stages;
    ResNets' layer1..layer4; otherwise the last block of ``features`` at each of the four deepest spatial
    resolutions."""
    trunk = model.trunk
    if hasattr(trunk, "feature_info"):
        names = [info["module"] for info in trunk.feature_info][-4:]
        return OrderedDict((name, trunk.get_submodule(name)) for name in names)
    if all(hasattr(trunk, f"layer{i}") for i in range(1, 5)):
        return OrderedDict((f"layer{i}", getattr(trunk, f"layer{i}")) for i in range(1, 5))
    blocks = getattr(trunk, "features", None)
    if not isinstance(blocks, nn.Sequential):
        raise ValueError(f"{type(trunk).__name__}: no layer1..4 or features to take CAM layers from")
    cache = model.__dict__.setdefault("_stage_layers", {})  # found by a forward pass: once per input size
    if tuple(image_size) in cache:
        return cache[tuple(image_size)]
    sizes: List[tuple] = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: sizes.append((k, tuple(o.shape[-2:]))))
             for k, b in enumerate(blocks)]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, *image_size))
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    last_at: Dict[tuple, int] = {}
    for k, shape in sizes:
        last_at[shape] = k
    chosen = sorted(last_at.values())[-4:]
    cache[tuple(image_size)] = OrderedDict((f"features.{k}", blocks[k]) for k in chosen)
    return cache[tuple(image_size)]


def cam_reshape(model: MultiHeadNet, image_size: Sequence[int]):
    """For a transformer trunk, pytorch-grad-cam's ``reshape_transform``: its blocks' tokens (N x prefix+HW x C) as
    maps (N x C x H x W) on the patch grid of ``image_size``; None for a trunk whose stages give maps."""
    embed = getattr(model.trunk, "patch_embed", None)
    if embed is None:
        return None
    prefix = getattr(model.trunk, "num_prefix_tokens", 1)
    rows, cols = (image_size[0] // embed.patch_size[0], image_size[1] // embed.patch_size[1])

    def to_maps(tokens: torch.Tensor) -> torch.Tensor:
        grid = tokens if tokens.ndim == 4 else tokens[:, prefix:].reshape(len(tokens), rows, cols, -1)
        return grid.permute(0, 3, 1, 2)
    return to_maps

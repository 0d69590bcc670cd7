"""Class activation maps for every trunk stage x every head, with pytorch-grad-cam.

One forward pass records the activations of all stages; each head then costs one backward pass (gradients of
all stages at once), so a grid of 4 layers x 3 heads costs 1 forward + 3 backwards, not 12 CAM calls.

CLI: ``multitask explain --run RUN_DIR [--fold K] IMAGE_OR_FOLDER --out DIR`` writes one grid PNG per
photo (rows: layers, columns: heads) and ``predictions.csv``.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

from multitask.cli import guarded

METHOD_NAMES = ("gradcam", "gradcam++", "hirescam", "layercam", "xgradcam", "eigencam", "scorecam")


def cli() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="multitask explain", description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--fold", type=int, help="default: the first trained fold")
    p.add_argument("input", type=Path, help="an image or a folder of images")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--method", default="gradcam", choices=sorted(METHOD_NAMES))
    p.add_argument("--target", action="append", default=[], metavar="HEAD=CLASS",
                   help="explain this class instead of the predicted one, e.g. --target mask=incorrect")
    p.add_argument("--faithfulness", action="store_true",
                   help="add per head the confidence change and ROAD score of the deepest layer's CAM")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier explain's files in --out")
    return p


if __name__ == "__main__":
    cli().parse_args()  # --help and usage errors answer before torch and grad-cam are imported

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from pytorch_grad_cam import (EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM)  # noqa: E402
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange  # noqa: E402
from pytorch_grad_cam.metrics.road import ROADCombined  # noqa: E402
from pytorch_grad_cam.utils.image import scale_cam_image, show_cam_on_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

from multitask.config import Config, ConfigError  # noqa: E402
from multitask.data.images import is_image_name, not_an_image  # noqa: E402
from multitask.data.photoset import PhotoSet, photo_set  # noqa: E402
from multitask.data.sources import DataError, Problem, image_files  # noqa: E402
from multitask.data.transforms import Preprocessing  # noqa: E402
from multitask.heads import kind  # noqa: E402
from multitask.io import atomic_to_csv, staged_output  # noqa: E402
from multitask.model import MultiHeadNet, cam_reshape, stage_layers  # noqa: E402
from multitask.run import RunDir, prob_columns  # noqa: E402

METHODS = dict(zip(METHOD_NAMES, (GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM, EigenCAM, ScoreCAM)))


@dataclass
class CamGrid:
    """CAMs of a batch: ``cams[layer][head]`` is B x H x W in [0, 1]; ``probs[head]`` is B x classes;
    ``targets[head]`` the class each head's CAM explains."""

    layers: List[str]
    heads: List[str]
    cams: Dict[str, Dict[str, np.ndarray]]
    probs: Dict[str, np.ndarray]
    targets: Dict[str, np.ndarray]


class HeadProbability:
    """A pytorch-grad-cam target: the probability of class ``cls`` of one head, from the model's outputs for one
    photo (however the head is trained: softmax, ordinal, age distribution or years)."""

    def __init__(self, model: MultiHeadNet, head: str, cls: int):
        self.model, self.head, self.cls = model, head, cls
        self.offset = model.head_offset(head)
        self.size = model.head_sizes[model.head_names.index(head)]

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        part = output[..., self.offset:self.offset + self.size].reshape(-1, self.size)
        return self.model.head_probabilities(self.head, part)[:, self.cls].reshape(output.shape[:-1])


def cam_target(model: MultiHeadNet, head: str, cls: int):
    """What a head's CAM explains: a softmax head's logit of the class (Grad-CAM's usual target); for the other
    kinds, the class probability derived from the head's outputs."""
    if kind(model.head_config(head)).cam_on_logit:
        return ClassifierOutputTarget(model.head_offset(head) + cls)
    return HeadProbability(model, head, cls)


@contextlib.contextmanager
def input_gradients_only(model: torch.nn.Module, x: torch.Tensor):
    """Backward passes need gradients at the layers, not for the weights: skip the weight gradients."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    x.requires_grad_(True)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


# CAMs hook the model's layers for the length of a call, and the dashboard shares its models between sessions
# and threads (overlapping reruns, two tabs): one CAM computation at a time, or the hooks of two calls mix.
CAM_LOCK = threading.RLock()


def cam_grid(model: MultiHeadNet, x: torch.Tensor, method: str = "gradcam",
             target_classes: Optional[Dict[str, int]] = None, heads: Optional[Sequence[str]] = None,
             layers: Optional[Sequence[str]] = None) -> CamGrid:
    """CAMs for a batch of network inputs ``x``; each head explains its predicted class unless
    ``target_classes`` names one. Safe to call from several threads (they take turns)."""
    if method not in METHODS:
        raise ConfigError(f"CAM method {method!r}: choose one of {', '.join(METHODS)}")
    with CAM_LOCK:
        return _cam_grid(model, x, method, target_classes, heads, layers)


def _cam_grid(model: MultiHeadNet, x: torch.Tensor, method: str, target_classes, heads, layers) -> CamGrid:
    model.eval()
    all_layers = stage_layers(model, tuple(x.shape[-2:]))
    layer_names = list(layers or all_layers)
    heads = list(heads or model.head_names)
    cam = METHODS[method](model=model, target_layers=[all_layers[n] for n in layer_names],
                          reshape_transform=cam_reshape(model, tuple(x.shape[-2:])))
    size = (x.shape[-1], x.shape[-2])
    try:
        with input_gradients_only(model, x):
            outputs = cam.activations_and_grads(x)
            activations = [a.float().numpy() for a in cam.activations_and_grads.activations]
            probs = {n: p.detach().float().numpy() for n, p in model.probabilities(outputs).items()}
            cams: Dict[str, Dict[str, np.ndarray]] = {n: {} for n in layer_names}
            chosen = {}
            for head in heads:
                cls = (np.full(len(x), target_classes[head]) if target_classes and head in target_classes
                       else probs[head].argmax(1))
                chosen[head] = cls
                targets = [cam_target(model, head, int(c)) for c in cls]
                grads = [None] * len(layer_names)
                if cam.uses_gradients:
                    cam.activations_and_grads.gradients = []
                    x.grad = None
                    sum(t(o) for t, o in zip(targets, outputs)).backward(retain_graph=True)
                    grads = [g.float().numpy() for g in cam.activations_and_grads.gradients]
                for i, name in enumerate(layer_names):
                    c = cam.get_cam_image(x.detach(), all_layers[name], targets, activations[i], grads[i], False)
                    cams[name][head] = scale_cam_image(np.maximum(c, 0), size)
    finally:
        cam.activations_and_grads.release()
    return CamGrid(layer_names, heads, cams, probs, chosen)


def faithfulness(model: MultiHeadNet, x: torch.Tensor, grid: CamGrid, layer: Optional[str] = None,
                 road_percentiles: Sequence[int] = (20, 40, 60, 80)) -> Dict[str, Dict[str, np.ndarray]]:
    """Per head and image, on ``layer`` (default: the deepest): the change of the target's probability when the
    CAM-weighted photo is fed back (higher: the CAM kept what mattered), and ROAD combined (higher: better)."""
    layer = layer or grid.layers[-1]
    out = {}
    with torch.no_grad():
        for head in grid.heads:
            targets = [HeadProbability(model, head, int(c)) for c in grid.targets[head]]
            cams = grid.cams[layer][head].astype(np.float32)
            change = CamMultImageConfidenceChange()(x, cams, targets, model)
            road = ROADCombined(percentiles=list(road_percentiles))(x, cams, targets, model)
            out[head] = {"confidence_change": np.asarray(change, np.float64).reshape(-1),
                         "road": np.asarray(road, np.float64).reshape(-1)}
    return out


def overlay(rgb: np.ndarray, cam: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """H x W x 3 uint8: the CAM as a heat map over the photo (rgb float in [0, 1])."""
    return show_cam_on_image(rgb.astype(np.float32), cam, use_rgb=True, image_weight=1 - opacity)


def class_name(cfg: Config, head: str, cls: int) -> str:
    return cfg.head(head).classes[cls]


def save_grid_png(cfg: Config, rgb: np.ndarray, grid: CamGrid, i: int, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(grid.layers), len(grid.heads)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.6 * rows), squeeze=False)
    for r, layer in enumerate(grid.layers):
        for c, head in enumerate(grid.heads):
            ax = axes[r][c]
            ax.imshow(overlay(rgb, grid.cams[layer][head][i]))
            cls = int(grid.targets[head][i])
            ax.set_title(f"{head}: {class_name(cfg, head, cls)} {grid.probs[head][i, cls]:.2f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(layer, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def network_input(pre: Preprocessing) -> Callable[[Union[Path, np.ndarray]], torch.Tensor]:
    """Photo file or RGB array -> C x H x W tensor, preprocessed like the run's validation photos."""
    transform = pre.eval()
    return lambda photo: transform(image=pre.framing(photo))["image"]


def network_inputs(photos: PhotoSet, rows: pd.DataFrame) -> tuple[torch.Tensor, List[np.ndarray]]:
    """(network inputs of these rows of a photo set, the photos as shown under the CAMs)."""
    transform = photos.pre.eval()
    x = torch.stack([transform(image=image)["image"] for image in photos.selected(rows)])
    return x, [photos.pre.denormalize(t) for t in x]


EXPLAIN_OUTPUTS = ["predictions.csv", "skipped.csv", "*_cams.png"]


def grid_name(photo: Path, inputs: Path) -> str:
    """The grid's file name: the photo's path under the input folder, folders joined by "__", its suffix kept
    (a/img/face.jpg -> a__img__face.jpg_cams.png), so that no two photos share a grid."""
    rel = Path(photo).relative_to(inputs) if Path(inputs).is_dir() else Path(Path(photo).name)
    return "__".join(rel.parts) + "_cams.png"


def explain_files(run_dir: Path, inputs: Path, out: Path, fold: Optional[int] = None, method: str = "gradcam",
                  target_classes: Optional[Dict[str, int]] = None, batch_size: int = 16,
                  with_faithfulness: bool = False, overwrite: bool = False) -> pd.DataFrame:
    """One CAM grid PNG per photo in ``out`` and predictions.csv; ``out`` must be new or empty unless
    ``overwrite``."""
    run = RunDir(run_dir)
    cfg = run.load_config()
    trained = run.trained_folds(cfg)
    fold = (trained or [0])[0] if fold is None else fold  # no fold at all: load_models names the problem
    model = run.load_models(cfg, [fold], torch.device("cpu"))[fold]
    if not Path(inputs).exists():
        raise DataError([Problem(str(inputs), "does not exist")])
    if Path(inputs).is_file() and not is_image_name(inputs):  # as predict: the same files are photos to both
        raise DataError([Problem(str(inputs), not_an_image())])
    paths = [inputs] if Path(inputs).is_file() else list(image_files(inputs))
    if not paths:
        raise DataError([Problem(str(inputs), "no image files found")])
    with staged_output(out, EXPLAIN_OUTPUTS, overwrite, "explain") as staging:
        return explain_into(cfg, run, model, fold, paths, inputs, staging, method, target_classes, batch_size,
                            with_faithfulness)


def explain_into(cfg: Config, run: RunDir, model: MultiHeadNet, fold: int, paths: List[Path], inputs: Path,
                 out: Path, method: str, target_classes, batch_size: int, with_faithfulness: bool) -> pd.DataFrame:
    """Every output of one explain written into the (staged) folder ``out``."""
    # framed as predict frames them: the run's cache, and under face_crop=detector|aligned each photo's own face
    photos = photo_set(cfg, pd.DataFrame({"path": [str(p) for p in paths]}), lambda s: None,
                       run.typical_face_boxes(), cache=True)
    readable, problems, rows = photos.readable(), photos.unreadable, []
    if readable.empty:
        raise DataError(problems, f"{inputs}: no photo could be explained")
    for start in range(0, len(readable), batch_size):
        batch = readable.iloc[start:start + batch_size]
        x, rgbs = network_inputs(photos, batch)
        good = [Path(p) for p in batch["path"]]
        grid = cam_grid(model, x, method, target_classes)
        faith = faithfulness(model, x, grid) if with_faithfulness else {}
        for i, p in enumerate(good):
            name = grid_name(p, inputs)
            save_grid_png(cfg, rgbs[i], grid, i, out / name, f"{Path(p).name}  ({method}, fold {fold})")
            row = {"path": str(p), "grid": name}
            for head in grid.heads:
                row.update({col: float(p) for col, p in zip(prob_columns(cfg.head(head)), grid.probs[head][i])})
                row[f"{head}_class"] = class_name(cfg, head, int(grid.probs[head][i].argmax()))
                for metric, values in faith.get(head, {}).items():
                    row[f"{head}_{metric}"] = float(values[i])
            rows.append(row)
    if problems:
        atomic_to_csv(pd.DataFrame([p.__dict__ for p in problems]), out / "skipped.csv")
    df = pd.DataFrame(rows)
    atomic_to_csv(df, out / "predictions.csv")
    return df


def parse_targets(items: Sequence[str], cfg: Config) -> Dict[str, int]:
    out = {}
    for item in items:
        head, _, cls = item.partition("=")
        h = cfg.head(head)
        if h is None or cls not in h.classes:
            raise ConfigError(f"--target {item!r}: expected HEAD=CLASS, e.g. mask={cfg.heads[0].classes[0]}")
        out[head] = h.classes.index(cls)
    return out


def photo_faithfulness(models: Dict[int, MultiHeadNet], pre: Preprocessing, photo: np.ndarray, grid: CamGrid
                       ) -> pd.DataFrame:
    """Faithfulness of ``explain_photo``'s deepest-layer CAMs, a row per head, averaged over the models."""
    x = network_input(pre)(photo)[None]
    scores = [faithfulness(m, x, grid) for m in models.values()]
    return pd.DataFrame([{"head": h, **{metric: float(np.mean([s[h][metric] for s in scores]))
                                        for metric in ("confidence_change", "road")}} for h in grid.heads])


def explain_photo(models: Dict[int, MultiHeadNet], pre: Preprocessing, photo: np.ndarray, method: str = "gradcam",
                  target_classes: Optional[Dict[str, int]] = None, layers: Optional[Sequence[str]] = None,
                  framed: bool = False) -> tuple[np.ndarray, CamGrid]:
    """One RGB photo through one model or a fold ensemble: (the photo as the network sees it, CAM grid).

    With several models, probabilities and CAMs are fold means and every fold explains the ensemble's
    predicted class (or the chosen one), so the maps answer for the prediction shown. ``pre``: the run's
    preprocessing (``RunDir.preprocessing``); ``framed``: the photo is already framed (a face cut out of a scene by
    ``FaceFraming.cut``)."""
    x = (pre.eval()(image=photo)["image"] if framed else network_input(pre)(photo))[None]
    with CAM_LOCK:  # the ensemble's forward passes and CAMs as one unit
        return pre.denormalize(x[0]), _explain(models, x, method, target_classes, layers)


def _explain(models: Dict[int, MultiHeadNet], x: torch.Tensor, method: str, target_classes, layers) -> CamGrid:
    if len(models) == 1:
        return cam_grid(next(iter(models.values())), x, method, target_classes, layers=layers)
    with torch.no_grad():
        fold_probs = [{h: p.numpy() for h, p in m.probabilities(m.eval()(x)).items()} for m in models.values()]
    probs = {h: np.mean([f[h] for f in fold_probs], 0) for h in fold_probs[0]}
    targets = {h: int(p.argmax()) for h, p in probs.items()}
    targets.update(target_classes or {})
    grids = [cam_grid(m, x, method, targets, layers=layers) for m in models.values()]
    cams = {layer: {h: np.mean([g.cams[layer][h] for g in grids], 0) for h in grids[0].heads}
            for layer in grids[0].layers}
    return CamGrid(grids[0].layers, grids[0].heads, cams, probs, {h: np.array([c]) for h, c in targets.items()})


@guarded
def main(argv=None) -> int:
    p = cli()
    a = p.parse_args(argv)
    targets = parse_targets(a.target, RunDir(a.run).load_config())
    df = explain_files(a.run, a.input, a.out, a.fold, a.method, targets, with_faithfulness=a.faithfulness,
                       overwrite=a.overwrite)
    print(f"explained {len(df)} photo(s) into {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


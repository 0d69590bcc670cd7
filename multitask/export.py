"""``multitask export --run RUN --out DIR [--format onnx|torchscript] [--folds K,K]``: a model file to take anywhere.

The graph takes a normalised batch (N x 3 x H x W float32, RGB, the trunk's mean/std, dynamic N) and returns each
head's class *probabilities* (``p_<head>``, N x classes) and, for heads that predict a value (the age, in
years), ``value_<head>`` (N): the fold models' mean over the plain and (with ``predict.tta_flip``) mirrored photo, each
head decoded as the run decodes it (ordinal, age distribution, regression, the training prior), so the numbers
are predict's. Beside it, ``preprocessing.json`` says how to turn a photo into that batch and what the outputs
are: the only file a user of the graph needs to read.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from multitask.cli import guarded, parse_folds

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}


def cli() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="multitask export", description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True, help="run directory of multitask train")
    p.add_argument("--out", type=Path, required=True, help="folder for the model file and preprocessing.json")
    p.add_argument("--format", choices=sorted(FORMATS), default="onnx")
    p.add_argument("--folds", type=parse_folds, help="e.g. 0 for one model (default: every trained fold)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    return p


if __name__ == "__main__":
    cli().parse_args()  # --help and usage errors answer before torch is imported

import copy  # noqa: E402
import warnings  # noqa: E402
from typing import List, Sequence  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from multitask.config import ConfigError  # noqa: E402
from multitask.data.transforms import load_size, template_points  # noqa: E402
from multitask.io import atomic_write_text, staged_output  # noqa: E402
from multitask.model import MultiHeadNet  # noqa: E402
from multitask.run import Member, RunDir, final_heads  # noqa: E402

PREPROCESSING = "preprocessing.json"


class HeadProbabilities(nn.Module):
    """Fold models -> per head the mean class probabilities (then the mean values) over the models and views."""

    def __init__(self, models: Sequence[MultiHeadNet], heads: Sequence[str], flip: bool):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.heads, self.flip = list(heads), flip
        self.value_heads = [h for h in self.heads if h in models[0].value_heads]

    def output_names(self) -> List[str]:
        return [f"p_{h}" for h in self.heads] + [f"value_{h}" for h in self.value_heads]

    def forward(self, x: torch.Tensor):
        views = [x, x.flip(3)] if self.flip else [x]
        probs = {h: [] for h in self.heads}
        values = {h: [] for h in self.value_heads}
        for model in self.models:
            for view in views:
                logits = model(view)
                for h, p in model.probabilities(logits).items():
                    if h in probs:
                        probs[h].append(p)
                for h, y in model.predicted_values(logits).items():
                    if h in values:
                        values[h].append(y)
        return tuple([torch.stack(probs[h]).mean(0) for h in self.heads]
                     + [torch.stack(values[h]).mean(0) for h in self.value_heads])


def preprocessing_record(member, graph: HeadProbabilities, model_file: str) -> dict:
    """What a user of the graph must do to a photo, and what the graph returns."""
    cfg = member.cfg
    heads = {h.name: h for h in final_heads(cfg)}
    views = ["plain"] + (["mirrored"] if graph.flip else [])
    scales = [s for s in cfg.predict.tta_scales if s != 1.0]
    mean, std = member.pre.norm  # the trunk's (model.normalization)
    return {
        "model": model_file, "run": member.run.root.name, "arch": cfg.model.arch, "folds": sorted(member.models),
        "input": {"name": "image", "shape": ["N", 3, *cfg.data.size], "dtype": "float32", "channels": "RGB",
                  "value": "(pixel / 255 - mean) / std", "mean": list(mean), "std": list(std)},
        "photo_to_input": [
            {"step": "face region", "face_crop": cfg.data.face_crop, "crop": cfg.data.crop,
             "face_margin": cfg.data.face_margin,
             "how": {"center": "the centre crop (H x W) when the photo is at least that large, else the whole photo",
                     "none": "the whole photo",
                     "detector": "the detected face box widened by face_margin of its size on each side, to the "
                                 "network's aspect ratio; no face: the typical box of the photo's size "
                                 "(typical_face_boxes, key WIDTHxHEIGHT), else the centre crop",
                     "aligned": "the photo warped by the similarity (least squares) that takes the detector's five "
                                "landmarks (left eye, right eye, nose, mouth left, mouth right, as seen) to "
                                "template_points, straight into the resize step's size; no face: the typical face's "
                                "landmarks (typical_face_boxes: box, then landmarks), else the centre crop"
                     }[cfg.data.face_crop],
             **({"template_points": template_points(load_size(cfg.data), cfg.data.face_margin).round(2).tolist()}
                if cfg.data.face_crop == "aligned" else {})},
            {"step": "resize", "size": list(load_size(cfg.data)), "interpolation": "area when shrinking, else linear"},
            {"step": "centre crop", "size": list(cfg.data.size)},
            {"step": "normalise", "mean": list(mean), "std": list(std)},
        ],
        # photos of scenes (predict --faces all): each face found is cut out on its own, then as above from resize
        "face_to_input": {
            "step": "cut one face", "face_margin": cfg.data.face_margin,
            "how": ("the photo warped by the similarity that takes the face's five landmarks to template_points, "
                    "straight into the resize step's size" if cfg.data.face_crop == "aligned" else
                    "the face box (x0, y0, x1, y1 in the photo's pixels, as predict writes it) widened by face_margin "
                    "of its width and height on each side, then grown to the network's aspect ratio (height / "
                    "width) about its centre, rounded to whole pixels; pixels outside the photo repeat its border "
                    "edge"),
            "then": ["resize", "centre crop", "normalise"]},
        "typical_face_boxes": member.run.recorded().get("typical_face_boxes", {}),
        "outputs": {**{f"p_{h}": {"head": h, "classes": list(heads[h].classes), "prior": heads[h].prior,
                                  **({"thresholds": list(heads[h].thresholds)} if heads[h].thresholds else {})}
                       for h in graph.heads},
                    **{f"value_{h}": {"head": h, "value_column": heads[h].value_column} for h in graph.value_heads}},
        "views_in_graph": views,
        "views_not_in_graph": [f"scale {s}" for s in scales],
        "joint_label": {"heads": graph.heads, "sizes": [len(heads[h].classes) for h in graph.heads],
                        "rule": "mixed radix of the heads' argmax, first head most significant (the competition's "
                                "18 classes: 6 * mask + 3 * gender + age)"},
    }


def export_member(member, out: Path, format: str = "onnx", overwrite: bool = False) -> Path:
    """One run's fold models (an ``api.Member``) as one graph in ``out``; returns the model file."""
    if format not in FORMATS:
        raise ConfigError(f"--format {format!r}: must be one of {', '.join(FORMATS)}")
    cfg = member.cfg
    models = [copy.deepcopy(m).float().eval().requires_grad_(False) for m in member.models.values()]
    graph = HeadProbabilities(models, [h.name for h in final_heads(cfg)], any(flip for _, flip in member.views))
    example = torch.zeros(2, 3, *cfg.data.size)
    with staged_output(out, [*FORMATS.values(), PREPROCESSING], overwrite, "export") as staging:
        with warnings.catch_warnings():  # the exporters' notes on tracing and deprecations are not the user's
            warnings.simplefilter("ignore")
            if format == "onnx":
                export_onnx(graph, example, staging / FORMATS[format])
            else:
                torch.jit.trace(graph, example, check_trace=False).save(str(staging / FORMATS[format]))
        atomic_write_text(staging / PREPROCESSING,
                          json.dumps(preprocessing_record(member, graph, FORMATS[format]), indent=1))
    return Path(out) / FORMATS[format]


def export_onnx(graph: HeadProbabilities, example: torch.Tensor, path: Path) -> None:
    import contextlib
    import importlib.util
    import io

    if importlib.util.find_spec("onnxscript") is None:  # torch's exporter needs it
        raise ConfigError("--format onnx needs the onnx exporter: pip install 'multitask[export]' "
                          "(onnx, onnxscript, onnxruntime)")

    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        program = torch.onnx.export(graph, (example,), input_names=["image"], output_names=graph.output_names(),
                                    dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, dynamo=True,
                                    verbose=False)
    program.save(str(path), external_data=False)


@guarded
def main(argv=None) -> int:
    a = cli().parse_args(argv)
    run = RunDir(a.run)
    cfg = run.load_config()
    member = Member(run, cfg, run.load_models(cfg, a.folds, torch.device("cpu")), run.preprocessing(cfg),
                    cfg.predict.views())
    path = export_member(member, a.out, a.format, a.overwrite)
    print(f"exported {member.describe()} to {path} (how to feed it: {a.out / PREPROCESSING})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

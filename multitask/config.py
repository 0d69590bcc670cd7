"""Typed configuration: dataclass defaults, YAML presets from configs/, key=value overrides.

One config object drives a run and is saved resolved into the run directory; everything downstream
(resume, predict, explain, dashboard) reads it from there. Unknown keys and wrong types are errors.

Override syntax (command line): ``section.key=value`` for any field, ``data=NAME`` / ``model=NAME`` to merge
``configs/data/NAME.yaml`` into that section, ``experiment=NAME`` to merge ``configs/experiment/NAME.yaml`` into
the whole config, or a path to any YAML file.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from multitask.errors import ConfigError
from multitask.tasks import FACE_AGE_THRESHOLDS, FACE_CLASSES

def _config_dir() -> Path:
    """The presets: configs/ beside the package in a source tree, multitask/configs in an installed wheel."""
    source = Path(__file__).resolve().parent.parent / "configs"
    return source if source.is_dir() else Path(__file__).resolve().parent / "configs"


CONFIG_DIR = _config_dir()
GROUPS = ("data", "model", "experiment")
INF = float("inf")
PRIORS = ("balanced", "training")  # heads[].prior
ENSEMBLES = ("mean", "vote")  # predict.ensemble: the models' mean probabilities, or their majority vote
FACES = ("all", "largest")  # --faces: every face of a photo, or the photo framed as its training photos were


# Each setting's rule lives beside it (checked at load, so a bad value fails at once with its key, not as a
# traceback or a silent nonsense run later); validate() keeps only the rules across settings.
def one_of(*allowed: str):
    """A setting that takes one of these values; the first is the default."""
    return field(default=allowed[0], metadata={"choices": allowed})


def within(default, low: float, high: float = INF, low_ok: bool = True):
    """A number from ``low`` (included unless ``low_ok`` is false) to ``high``; None, where the default, is not
    checked."""
    return field(default=default, metadata={"range": (low, high, low_ok)})


@dataclass
class HeadConfig:
    name: str  # what reports, predictions (p_<name>_<class>) and --target call the head
    column: str  # column of the data table holding the integer label
    classes: List[str] = field(default_factory=list)  # empty: taken from the data (image folders)
    loss_weight: float = within(1.0, 0)  # the head's share of the summed loss
    # The head's kind, how it learns and decodes (heads.py): ce | ordinal (ordered classes) | dldl | regression (the
    # value of value_column, cut into the classes at thresholds)
    kind: str = "ce"
    value_column: Optional[str] = None  # a numeric column the classes are cut from, e.g. age (in years)
    thresholds: List[int] = field(default_factory=list)  # the cuts of value_column between the classes
    train_thresholds: Optional[List[int]] = None  # training-only cuts, e.g. [30, 58]: 58+ learned as 60+
    absent: Optional[str] = None  # the class meaning "none" (not_worn): reports add "present vs absent" accuracy
    # balanced | training: the class frequencies a ce head's probabilities assume. Trained with
    # loss.class_weights, a head treats its classes as equally common (balanced: good for macro-F1 on photos like
    # the training ones); training takes the weights back out when predicting, so the classes are as common as in
    # the training photos (the competition layout: 5 masks worn of 7 photos) and rare classes are called less.
    prior: str = one_of(*PRIORS)


def face_heads() -> List[HeadConfig]:
    # Declared in the order of the competition's 18-class code: class = 6*mask + 3*gender + age.
    return [
        HeadConfig("mask", "mask", FACE_CLASSES["mask"], absent="not_worn"),
        HeadConfig("gender", "gender", FACE_CLASSES["gender"]),
        HeadConfig("age", "age_group", FACE_CLASSES["age"], value_column="age",
                   thresholds=list(FACE_AGE_THRESHOLDS)),
    ]


@dataclass
class SyntheticConfig:
    people: int = within(100, 1)  # persons drawn (7 photos each) for data.source=synthetic
    size: List[int] = field(default_factory=lambda: [512, 384])  # H x W of generated portraits
    seed: int = within(0, 0, 4294967295)  # the generator's seed: the same seed draws the same faces
    anywhere: bool = False  # faces of any size anywhere in the frame (for data.face_crop=detector)
    # Extra synthetic unmasked persons (one photo each) for stage 1, like data.extra_unmasked for real data: the
    # main set has one unmasked photo per person, too few for stage 1 to learn from in a demo.
    unmasked: int = within(360, 0)


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic, or a layout in data/sources.py: competition, manifest, utkface, ...
    root: Optional[str] = None  # folder (or manifest CSV); synthetic: generated under cache_dir when null
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # the faces drawn for data.source=synthetic
    drop_train_ages: List[int] = field(default_factory=list)  # ages left out of training (not of evaluation)
    # People added to stage 1 training only: UTKFace-style folders (one unmasked photo each), or any labeled face
    # set, e.g. their masks painted by `paint-masks` (stage1.only and stage1.photos_per_person pick the photos).
    extra_unmasked: List[str] = field(default_factory=list)
    extra_unmasked_people: int = within(0, 0)  # at most this many of them, drawn evenly by gender x age (0: all)
    # Labeled sets (competition layout, manifest) added to the training side of every fold, both stages, never
    # validated: e.g. masks painted on extra people by `multitask data paint-masks`.
    extra_train: List[str] = field(default_factory=list)
    extra_train_people: int = within(0, 0)  # at most this many persons of them, drawn evenly by gender x age (0: all)
    # Labeled sets scored at the end of every fold (fold model) and in the report (ensemble), never trained on:
    # a folder per mask class (worn_correctly/, worn_incorrectly/, not_worn/), a manifest or the competition layout.
    # This is where domain shift shows, e.g. real masks when training on painted ones.
    extra_val: List[str] = field(default_factory=list)
    # error: stop and list every problem | skip: leave them out, list in skipped.csv
    on_bad_file: str = one_of("error", "skip")
    crop: Optional[List[int]] = field(default_factory=lambda: [400, 256])  # H x W centre crop; skipped if larger
    # The face region: center (the centre crop above) | none (whole photo) | detector (a face detector's box,
    # widened by face_margin of its size on each side) | aligned (the photo turned, scaled and shifted so that the
    # detector's five landmarks sit on a fixed template: eyes level, at the same place in every photo). Faces are
    # found once and cached; where none is found, the typical face of photos of that size, else the centre crop;
    # flagged face_found=False in data.csv and predictions.csv
    face_crop: str = one_of("center", "none", "detector", "aligned")
    # detector: the box is widened by this much of its size on each side; aligned: the template's face frame
    # leaves this much of its side around it
    face_margin: float = within(0.25, 0, 2)
    size: List[int] = field(default_factory=lambda: [72, 56])  # H x W fed to the network (competition preset: 128x96)
    # photos are prepared this much larger than `size`; training crops at random
    load_margin: float = within(0.125, 0, 1)
    cache: bool = True  # decode + crop + resize once into a memory-mapped array
    cache_dir: str = ".cache/multitask"  # the image cache, the face boxes and generated synthetic faces
    # photos per step (per process under torchrun); at least 2: BatchNorm needs two photos in a training step
    batch_size: int = within(64, 2)
    workers: int = within(-1, -1, 256)  # -1: chosen for the machine


def extra_val_names(data: DataConfig) -> List[str]:
    """A short unique name per ``data.extra_val`` entry (the folder or file name): what reports call the set."""
    names: List[str] = []
    for i, root in enumerate(data.extra_val):
        name = Path(root).stem or f"set{i}"
        names.append(name if name not in names else f"{name}{i}")
    return names


@dataclass
class ModelConfig:
    # any torchvision classifier (resnet18/34/50/101, mobilenet_v2/v3_*, efficientnet_b0..) or timm/<name>, any
    # timm model (pip install 'multitask[timm]'): timm/convnext_atto, timm/vit_tiny_patch16_224, ...
    arch: str = "resnet18"
    pretrained: str = "none"  # none | imagenet (torchvision's or timm's weights, their caches, offline) | a state_dict
    dropout: float = within(0.0, 0, 1)  # before each head


@dataclass
class StageConfig:
    enabled: bool = True  # false: the stage is skipped (one of the stages must train)
    epochs: int = within(6, 1)  # passes over the stage's photos
    heads: List[str] = field(default_factory=list)  # empty: all heads
    only: Dict[str, str] = field(default_factory=dict)  # keep rows whose column has this class, e.g. mask: not_worn
    # H x W this stage trains and validates at; null: data.size. Progressive resizing: a smaller stage 1 (e.g.
    # [128, 128] under data.size [160, 160]) learns from the same cached photos, resized, for fewer pixels per
    # step. The final stage is the run's model, so it stays at data.size (predict and explain use that).
    size: Optional[List[int]] = None
    # Each epoch trains on this many photos of every person, drawn afresh (0: every photo). With only: {} and 1,
    # stage 1 sees every person once per epoch, masked or not, at the cost of the unmasked stage 1.
    photos_per_person: int = within(0, 0)


def default_stages() -> List[StageConfig]:
    # Gender and age first learn from the unmasked photos, then every head from all photos
    return [StageConfig(epochs=4, heads=["gender", "age"], only={"mask": "not_worn"}), StageConfig(epochs=8)]


@dataclass
class OptimConfig:
    optimizer: str = one_of("adam", "adamw", "sgd")  # sgd: with Nesterov momentum (optim.momentum)
    # The trunk's learning rate; null: lr_trunk_pretrained when weights were loaded (model.pretrained imagenet or a
    # file), else lr_scratch
    lr_trunk: Optional[float] = within(None, 0, INF, low_ok=False)
    # the heads' learning rate; null: lr_heads_pretrained or lr_scratch, as above
    lr_heads: Optional[float] = within(None, 0, INF, low_ok=False)
    # A loaded trunk learns slower than its new heads, but faces are far from ImageNet: not much slower
    lr_trunk_pretrained: float = within(1e-4, 0, INF, low_ok=False)
    lr_heads_pretrained: float = within(6e-4, 0, INF, low_ok=False)  # the heads' rate over a loaded trunk
    # trunk and heads from random init: the trunk must learn as fast as the heads
    lr_scratch: float = within(1e-3, 0, INF, low_ok=False)
    weight_decay: float = within(3e-5, 0, 1)  # L2 penalty of every weight
    momentum: float = within(0.9, 0, 1)  # SGD only
    scheduler: str = one_of("cosine", "step", "none")  # the learning rate over a stage's epochs
    step_every: int = within(4, 1)  # scheduler=step: epochs between steps
    step_gamma: float = within(0.5, 0, 1, low_ok=False)  # scheduler=step: the rate is multiplied by this at each step
    warmup_epochs: int = within(0, 0)  # epochs of linearly rising rate before the schedule
    sgd_after: Optional[int] = within(None, 0)  # switch Adam -> SGD after this many epochs of a stage
    sgd_lr_scale: float = within(1.0, 0, INF, low_ok=False)  # SGD learning rates relative to the Adam ones
    # > 0: keep an exponential moving average of the weights, updated every step with this decay, and validate
    # and keep it instead of the raw weights (its horizon is about 1 / (1 - decay) steps: 0.99 for ~100)
    ema_decay: float = within(0.0, 0, 0.9999)

    def learning_rates(self, weights_loaded: bool) -> tuple[float, float]:
        """(trunk, heads): the configured ones, else the defaults for a loaded or a randomly initialised trunk."""
        trunk, heads = ((self.lr_trunk_pretrained, self.lr_heads_pretrained) if weights_loaded
                        else (self.lr_scratch,) * 2)
        return (trunk if self.lr_trunk is None else self.lr_trunk), (heads if self.lr_heads is None else self.lr_heads)


@dataclass
class LossConfig:
    label_smoothing: float = within(0.1, 0, 1)  # ce heads: this much of the target spread over the other classes
    class_weights: bool = True  # per head, inverse class frequency of the training fold
    focal_gamma: float = within(0.0, 0, 10)  # 0: plain cross-entropy
    # > 0: a person's heads that are the same on all their photos (gender, age) also learn, on each of the
    # person's other photos (masked), the previous stage's prediction on the person's photos of the absent class
    # (unmasked): a KL term of this weight, from the second stage trained on
    person_consistency: float = within(0.0, 0)
    consistency_temperature: float = within(2.0, 0, low_ok=False)  # softens both sides of the KL term
    # teacher=[RUN, ...]: the weight of the KL term from the teachers' class probabilities to the model's
    teacher_weight: float = within(1.0, 0)
    # How the heads' losses add up: fixed (each head's loss_weight) | uncertainty (Kendall et al. 2018: each head's
    # weighted loss L also learns a log-variance s, adding exp(-s) L + s: a head whose loss stays high counts less)
    balance: str = one_of("fixed", "uncertainty")


@dataclass
class AugmentConfig:
    hflip: float = within(0.5, 0, 1)  # probability of a mirrored photo
    brightness_contrast: float = within(0.5, 0, 1)  # probability of a random brightness and contrast change
    coarse_dropout: float = within(0.0, 0, 1)  # probability of 1-4 small rectangles blanked out
    # Aimed at the gap between clean painted training photos and real ones (probabilities per photo; how they were
    # chosen on real masked photos: docs/real-masks.md):
    # low resolution, blur, JPEG, sensor noise, low light: real crops are small and rough
    degrade: float = within(0.7, 0, 1)
    color: float = within(0.4, 0, 1)  # hue, saturation, colour cast, grey photos
    # tilt, zoom (up to 1.3x: real crops are often tighter) and shift: real faces are not aligned
    affine: float = within(0.6, 0, 1)
    # none | mixup | cutmix | cutmix_vertical (left/right halves of two photos)
    mix: str = one_of("none", "mixup", "cutmix", "cutmix_vertical")
    mix_alpha: float = within(1.0, 0, INF, low_ok=False)  # the Beta(alpha, alpha) the mixing share is drawn from
    mix_prob: float = within(0.5, 0, 1)  # share of the batches that are mixed


@dataclass
class CVConfig:
    folds: int = within(5, 2)  # cross-validation folds, grouped by person (stratified on gender x age)
    run_folds: List[int] = field(default_factory=list)  # empty: all folds
    seed: int = within(42, 0, 4294967295)  # which persons go to which fold
    # This fold's people take no part (neither trained on nor validated; the other folds train as usual): the run
    # is a teacher for a student's fold leave_out (teacher=[...]), which must never have seen that fold's people
    leave_out: Optional[int] = within(None, 0)

    def trainable(self) -> List[int]:
        """The folds this run can train: every fold but the one left out."""
        return [k for k in range(self.folds) if k != self.leave_out]

    def planned(self) -> List[int]:
        """The folds the run trains: ``run_folds``, else every one it can."""
        return list(self.run_folds) or self.trainable()


@dataclass
class TrainConfig:
    device: str = "auto"  # auto | cpu | cuda (each torchrun process its local rank's GPU) | cuda:N (one process)
    # auto: on a CPU bf16 where a step of this model is measurably faster in it, else fp32; on a GPU bf16, else fp16
    precision: str = one_of("auto", "fp32", "bf16", "fp16")
    channels_last: bool = True  # NHWC memory format (faster convolutions on CPU and GPU)
    # torch intra-op threads; 0: this process's share of the cores (OMP_NUM_THREADS if set)
    threads: int = within(0, 0, 4096)
    # Data parallel (torchrun): data.batch_size is per process, the effective batch is batch_size x processes;
    # linear: learning rates x processes (the usual rule for large batches), none: the rates as configured.
    lr_scaling: str = one_of("none", "linear")
    sync_bn: bool = False  # BatchNorm statistics over all processes (GPUs; small per-GPU batches)
    compile: bool = False  # torch.compile the model for training
    # fp16 | fp32: the fold model kept (final stage's best.pt; fp16: half the disk)
    weights_dtype: str = one_of("fp16", "fp32")
    seed: int = within(42, 0, 4294967295)  # weights, order of photos, augmentation
    progress: bool = True  # progress bars on a terminal


@dataclass
class PredictConfig:
    tta_flip: bool = True  # average each photo with its mirror image
    tta_scales: List[float] = field(default_factory=list)  # extra scales, e.g. [0.9, 1.1]
    ensemble: str = one_of(*ENSEMBLES)  # mean of probabilities | vote
    # Photos of scenes (--faces all): faces whose box is narrower than this (pixels) are listed as too small,
    # with their boxes, and not classified; the detector looks for faces from 20 pixels
    min_face: int = within(32, 1)
    fps: float = within(2.0, 0, low_ok=False)  # videos: frames sampled per second of video

    def views(self, flip: Optional[bool] = None) -> List[tuple]:
        """(scale, flip) test-time views: the plain view, its mirror, and each extra scale (mirrored too);
        ``flip``: instead of tta_flip."""
        flip = self.tta_flip if flip is None else flip
        scales = [1.0] + [s for s in self.tta_scales if s != 1.0]
        return [(s, f) for s in scales for f in ((False, True) if flip else (False,))]


@dataclass
class ReportConfig:
    # Columns of the data (e.g. a manifest's own) whose groups the report scores every head on, beside gender x
    # age group and, where the data has it, race.
    subgroups: List[str] = field(default_factory=list)
    # Heads whose true classes are crossed into one more subgroup (gender x age group); none where one is missing
    cross: List[str] = field(default_factory=lambda: ["gender", "age"])


@dataclass
class Config:
    name: str = "faces"  # runs are written to <out_dir>/<name>-<date>-<time>
    out_dir: str = "runs"  # the folder run directories are created in
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    heads: List[HeadConfig] = field(default_factory=face_heads)
    # Trained in order, each starting from the one before; `stageN.key` is short for `stages.(N-1).key`
    stages: List[StageConfig] = field(default_factory=default_stages)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    # Runs (folders) to distill: every photo of this run that a teacher predicted out of fold (by the fold model
    # that held the photo's person out) also learns the teachers' mean class probabilities (loss.teacher_weight),
    # from the fold models that never trained on the fold's validation people (fold k: runs with cv.leave_out=k)
    teacher: List[str] = field(default_factory=list)

    def head(self, name: str) -> Optional[HeadConfig]:
        """The head called ``name``; None when there is none."""
        return next((h for h in self.heads if h.name == name), None)


def stage(cfg: Config, number: int) -> StageConfig:
    """Stage ``number`` (1-based, as run folders and logs count them)."""
    return cfg.stages[number - 1]


def enabled_stages(cfg: Config) -> List[int]:
    return [n for n, s in enumerate(cfg.stages, 1) if s.enabled]


def final_stage(cfg: Config) -> int:
    """The stage whose best.pt is a fold's model: the last one enabled."""
    return enabled_stages(cfg)[-1]


def _load_yaml(path: Path):
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and OSError alike: name the file
        raise ConfigError(f"{path}: cannot read config file: {e}") from e
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: a config file maps settings to values (key: value); its top level is a "
                          f"{'list' if isinstance(loaded, ListConfig) else type(loaded).__name__}")
    return loaded


def _reason(e: Exception) -> str:
    """OmegaConf's message without its multi-line context: one line."""
    first = str(getattr(e, "msg", None) or e).strip().splitlines()[0]
    if "is not a ListConfig" in first:  # a single value for a list setting
        return "expects a list: key=[a,b] (or key=[a] for one)"
    return first


STAGE_KEY = re.compile(r"stage(\d+)$")  # stageN: stage N of the list, 1-based


def stage_index(key: str, stages: int, origin: str) -> int:
    """The list index of ``stageN``; a ConfigError when there is no stage N."""
    n = int(STAGE_KEY.match(key)[1])
    if not 1 <= n <= stages:
        raise ConfigError(f"{origin}: {key}: there are {stages} stages (stage1 to stage{stages}); to add one, give "
                          "the whole stages list, e.g. in a YAML file")
    return n - 1


RENAMED = {"loss": "kind"}  # head settings renamed: the old name is refused with the new one


def _renamed_head_keys(other, origin: str) -> None:
    """A config file (a preset, a YAML file, a run's saved config) that sets a head's setting by its old name."""
    heads = other.get("heads") if isinstance(other, DictConfig) else None
    for i, head in enumerate(heads if isinstance(heads, ListConfig) else []):
        for old, new in RENAMED.items():
            if isinstance(head, DictConfig) and old in head:
                raise ConfigError(f"{origin}: heads.{i}.{old} is now heads.{i}.{new} (the head's kind: "
                                  f"{head[old]}); rename the key (in a run's config.yaml: "
                                  f"sed -i 's/^  {old}: /  {new}: /' config.yaml)")


def _merge(base, other, origin: str):
    """``other`` merged into ``base``; a mapping the config declares as a value (``stage1.only``) is replaced, not
    merged into, so a preset's or an override's ``only: {}`` clears it. A ``stageN:`` section is merged into
    entry N-1 of ``stages``."""
    _renamed_head_keys(other, origin)
    sections = {}
    if isinstance(other, DictConfig) and "stages" in base:
        sections = {key: other[key] for key in list(other.keys()) if STAGE_KEY.match(str(key))}
        other = OmegaConf.masked_copy(other, [k for k in other.keys() if k not in sections])
    try:
        merged = OmegaConf.merge(base, other)
        _replace_mappings(merged, other)
    except (OmegaConfBaseException, TypeError, ValueError) as e:
        raise ConfigError(f"{origin}: {_reason(e)}") from None
    for key, section in sections.items():
        i = stage_index(key, len(merged.stages), origin)
        merged.stages[i] = _merge(merged.stages[i], section, f"{origin}: {key}")
    return merged


def _replace_mappings(cfg: DictConfig, other) -> None:
    for key, value in other.items():
        node = cfg.get(key)
        if not isinstance(node, DictConfig) or not isinstance(value, (dict, DictConfig)):
            continue
        if OmegaConf.get_type(node) is dict:  # a value of type Dict, not a section of the config
            cfg[key] = value
        else:
            _replace_mappings(node, value)


def _set(cfg, key: str, value: str, origin: str):
    """``a.b=value``; list items by index too (``heads.2.kind=dldl``); ``stageN.key`` is ``stages.(N-1).key``."""
    renamed = re.match(r"heads\.(\d+)\.(\w+)$", key)
    if renamed and renamed[2] in RENAMED:
        raise ConfigError(f"{origin}: heads.{renamed[1]}.{renamed[2]} is now heads.{renamed[1]}.{RENAMED[renamed[2]]}")
    alias = re.match(r"(stage\d+)\.(.+)$", key)
    if alias:
        key = f"stages.{stage_index(alias[1], len(cfg.stages), origin)}.{alias[2]}"
    try:
        parsed = OmegaConf.from_dotlist([f"v={value}"])["v"]
    except Exception as e:  # YAML and interpolation grammar errors alike: name the override
        raise ConfigError(f"{origin}: {_reason(e)}") from None
    if re.search(r"[{,]\s*[\w.-]+:[^\s/]", value):
        raise ConfigError(f"{origin}: YAML reads 'key:value' without a space as one key; write 'key: value'")
    parts = key.split(".")
    for n, part in enumerate(parts):
        node = OmegaConf.select(cfg, ".".join(parts[:n]), default=None) if n else cfg
        if isinstance(node, ListConfig) and not part.isdigit():
            name = ".".join(parts[:n])
            raise ConfigError(f"{origin}: {name} is a list: {name}.{part} needs an entry number, {name}.0 to "
                              f"{name}.{len(node) - 1}")
        if part.isdigit() and isinstance(node, ListConfig) and int(part) >= len(node):
            name = ".".join(parts[:n])
            raise ConfigError(f"{origin}: {name} has {len(node)} entries ({name}.0 to {name}.{len(node) - 1}); to "
                              "add one, give the whole list, e.g. in a YAML file")
    if not any(part.isdigit() for part in key.split(".")):
        return _merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]), origin)
    node = OmegaConf.select(cfg, key, default=None)
    mapping = isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict  # a value, replaced (stage1.only)
    try:
        OmegaConf.update(cfg, key, parsed, merge=not mapping, force_add=False)
        return cfg
    except (OmegaConfBaseException, TypeError, ValueError, IndexError, KeyError) as e:
        raise ConfigError(f"{origin}: {_reason(e)}") from None


def _merge_file(cfg, other, path: Path, item: str, earlier: Dict[str, str]):
    """A preset or YAML file merged in; an earlier ``key=value`` it would silently undo is an error (overrides
    apply in order: the file's value, or its whole list such as ``heads``, would win)."""
    for key, override in earlier.items():
        parts, hit = key.split("."), None
        for n in range(1, len(parts) + 1):  # down the key, until the file has no such entry or sets a value/list
            node = OmegaConf.select(other, ".".join(parts[:n]), default=None)
            if node is None:
                break
            if n == len(parts) or not isinstance(node, DictConfig):
                hit = ".".join(parts[:n])
                break
        if hit is not None:
            raise ConfigError(f"{item}: sets {hit}, which would undo the earlier override {override!r}; give the "
                              f"override after {item}")
    return _merge(cfg, other, str(path))


def load_config(overrides: List[str] = (), base: Optional[Path] = None) -> Config:
    """Compose the default config (or ``base``, e.g. a run's saved config) with presets and overrides."""
    cfg = OmegaConf.structured(Config)
    if base is not None:
        cfg = _merge(cfg, _load_yaml(Path(base)), str(base))
    earlier: Dict[str, str] = {}  # key=value overrides so far: a later file that sets the same key would undo them
    for item in overrides:
        if "=" not in item:
            path = Path(item)
            if path.suffix in (".yaml", ".yml") and path.exists():
                cfg = _merge_file(cfg, _load_yaml(path), path, item, earlier)
                continue
            if path.suffix in (".yaml", ".yml"):
                raise ConfigError(f"{item}: no such config file")
            raise ConfigError(f"override {item!r}: expected key=value, GROUP=NAME or a YAML file")
        key, value = item.split("=", 1)
        if key in GROUPS:
            path = CONFIG_DIR / key / f"{value}.yaml"
            if not path.exists():
                known = sorted(p.stem for p in (CONFIG_DIR / key).glob("*.yaml"))
                raise ConfigError(f"{item}: no preset {path} (known: {', '.join(known)})")
            preset = _load_yaml(path)
            cfg = _merge_file(cfg, preset if key == "experiment" else OmegaConf.create({key: preset}), path, item,
                              earlier)
        else:
            cfg = _set(cfg, key, value, f"override {item!r}")
            earlier[key] = item
    try:
        config: Config = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:  # a required setting left out, e.g. a head without its name
        key = re.sub(r"\[(\d+)\]", r".\1", str(e.full_key))  # heads[0].name -> heads.0.name, as overrides spell it
        raise ConfigError(f"{key}: missing; this setting has no default, give it a value") from None
    validate(config)
    return config


MAX_SIZE = 4096  # pixels per side of data.size, data.crop and stage sizes: beyond it a step no longer fits memory


def check_range(dotted: str, value, low, high, low_ok) -> None:
    if value is not None and (not (low <= value if low_ok else low < value) or value > high):
        bound = f"{'>=' if low_ok else '>'} {low:g}" + (f" and <= {high:n}" if high != INF else "")
        raise ConfigError(f"{dotted}={value!r}: must be {bound}")


def sections(cfg: Config) -> List[tuple[str, object]]:
    """(key prefix, section) of every part of the config whose settings may carry a rule: the config, its
    sections and sub-sections, each head and each stage."""
    def nested(prefix: str, obj) -> List[tuple[str, object]]:
        subs = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
        return [(prefix, obj)] + [part for name, sub in subs if dataclasses.is_dataclass(sub)
                                  for part in nested(f"{prefix}{name}.", sub)]

    return (nested("", cfg) + [part for i, h in enumerate(cfg.heads) for part in nested(f"heads.{i}.", h)]
            + [part for n, s in enumerate(cfg.stages, 1) for part in nested(f"stage{n}.", s)])


def check_ranges(cfg: Config) -> None:
    """Every setting against the rule beside its field (``one_of``, ``within``), then the sizes and scales."""
    for prefix, section in sections(cfg):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            numbers = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                raise ConfigError(f"{prefix}{f.name}={value!r}: must be a finite number")
            if "choices" in f.metadata and value not in f.metadata["choices"]:
                raise ConfigError(f"{prefix}{f.name}={value!r}: must be one of {', '.join(f.metadata['choices'])}")
            if "range" in f.metadata:
                check_range(prefix + f.name, value, *f.metadata["range"])
    sizes = {"data.size": cfg.data.size, "data.crop": cfg.data.crop, "data.synthetic.size": cfg.data.synthetic.size}
    sizes.update({f"stage{n}.size": s.size for n, s in enumerate(cfg.stages, 1)})
    for key, dims in sizes.items():
        if dims is not None and (len(dims) != 2 or min(dims) < 8 or max(dims) > MAX_SIZE):
            raise ConfigError(f"{key}={list(dims)}: two sizes of 8 to {MAX_SIZE} pixels")
    bad_scales = [s for s in cfg.predict.tta_scales if not 0.25 <= s <= 4]
    if bad_scales:
        raise ConfigError(f"predict.tta_scales={list(cfg.predict.tta_scales)}: scales between 0.25 and 4 (1: the "
                          f"photo as it is), not {bad_scales}")


def check_stage_size(cfg: Config, stage_name: str, size: List[int]) -> None:
    """A stage's size against data.size (its shape is checked with the other sizes in ``check_ranges``)."""
    if size[0] > cfg.data.size[0] or size[1] > cfg.data.size[1]:
        raise ConfigError(f"{stage_name}.size={list(size)}: at most data.size {list(cfg.data.size)} (photos are "
                          f"prepared for data.size; a stage may train smaller, not larger)")
    if enabled_stages(cfg) and stage_name == f"stage{final_stage(cfg)}" and list(size) != list(cfg.data.size):
        raise ConfigError(f"{stage_name}.size={list(size)}: the final stage trains the run's model, at data.size "
                          f"{list(cfg.data.size)}; set it to null")


def validate(cfg: Config) -> None:
    from multitask.data.sources import SOURCES  # the table of data layouts
    from multitask.heads import check_heads  # torch: imported when a config is checked, not for --help

    check_ranges(cfg)
    sources = ["synthetic"] + [name for name, s in SOURCES.items() if s.trains]
    if cfg.data.source not in sources:
        raise ConfigError(f"data.source={cfg.data.source!r}: must be one of {', '.join(sources)}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.train.device):
        raise ConfigError(f"train.device={cfg.train.device!r}: must be auto, cpu, cuda or cuda:N")
    names = [h.name for h in cfg.heads]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"heads: need at least one head and unique names, got {names}")
    for i, h in enumerate(cfg.heads):
        if not h.classes and cfg.data.source != "imagefolder":
            raise ConfigError(f"heads.{i}.classes=[]: a head needs its class names (only an image-folder head, "
                              "data.source=imagefolder, takes them from the folders)")
        if len(h.classes) == 1 or len(set(h.classes)) != len(h.classes):
            raise ConfigError(f"heads.{i}.classes={list(h.classes)}: at least two classes, each named once")
    check_heads(cfg)
    if not enabled_stages(cfg):
        raise ConfigError("stages: none enabled; nothing to train")
    for n, stage in enumerate(cfg.stages, 1):
        stage_name = f"stage{n}"
        if not stage.enabled:
            continue
        for key in ("heads", "only"):
            unknown = set(getattr(stage, key)) - set(names)
            if unknown:
                raise ConfigError(f"{stage_name}.{key}: unknown head(s) {sorted(unknown)}; heads are {names}")
        for head, cls in stage.only.items():
            classes = cfg.head(head).classes
            if classes and cls not in classes:
                raise ConfigError(f"{stage_name}.only.{head}={cls!r}: not a class of head {head} "
                                  f"({', '.join(map(str, classes))})")
        if stage.size is not None:
            check_stage_size(cfg, stage_name, stage.size)
    if not re.fullmatch(r"[A-Za-z0-9][\w.+-]*", cfg.name):
        raise ConfigError(f"name={cfg.name!r}: letters, digits, '.', '_', '+' and '-' only, not starting with '.' "
                          "(it names a folder inside out_dir)")
    if cfg.loss.person_consistency > 0 and not any(h.absent for h in cfg.heads):
        raise ConfigError("loss.person_consistency: needs a head with an absent class (heads.N.absent, the mask's "
                          "not_worn), whose photos are the ones the other photos learn from")
    if cfg.loss.person_consistency > 0 and cfg.augment.mix != "none":
        raise ConfigError(f"loss.person_consistency with augment.mix={cfg.augment.mix}: a mixed photo has no one "
                          "person to be consistent with; use one or the other")
    if cfg.teacher and cfg.augment.mix != "none":
        raise ConfigError(f"teacher with augment.mix={cfg.augment.mix}: a mixed photo has no one teacher "
                          "prediction; use one or the other")
    bad_folds = [f for f in cfg.cv.run_folds if not 0 <= f < cfg.cv.folds]
    if bad_folds:
        raise ConfigError(f"cv.run_folds: folds {bad_folds} outside 0..{cfg.cv.folds - 1}")
    if cfg.cv.leave_out is not None:
        if cfg.cv.leave_out >= cfg.cv.folds or cfg.cv.folds < 3:
            raise ConfigError(f"cv.leave_out={cfg.cv.leave_out}: one of folds 0..{cfg.cv.folds - 1}, with at least "
                              f"two others left to train (cv.folds={cfg.cv.folds})")
        if cfg.cv.leave_out in cfg.cv.run_folds:
            raise ConfigError(f"cv.run_folds={list(cfg.cv.run_folds)}: fold {cfg.cv.leave_out} is left out "
                              "(cv.leave_out); it has no people to train or validate")


def config_dict(cfg: Config) -> dict:
    """The config as plain data (dicts and lists), as run.json records it."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: Path) -> None:
    from multitask.io import atomic_write_text

    atomic_write_text(path, to_yaml(cfg))

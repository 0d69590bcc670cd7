"""Preprocessing (deterministic, cacheable) and augmentation presets (albumentations).

A photo goes through ``FaceFraming`` once (decode, crop to the face region, resize to a little more than the network
size); that result is what the cache stores. The training or evaluation transform then runs on it. All three come
from one ``Preprocessing`` built from the run's config, so training, predict, explain and the dashboard see a
photo the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Optional, Sequence

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from multitask.config import AugmentConfig, Config, DataConfig
from multitask.data.images import read_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TYPICAL_BOX_MIN_PHOTOS = 10


def load_size(data: DataConfig) -> tuple[int, int]:
    """Network size plus the margin, an even number of pixels more, so a centre crop is mirror-symmetric."""
    return tuple(s + 2 * round(s * data.load_margin / 2) for s in data.size)


def widen(box, margin: float, aspect: float) -> np.ndarray:
    """A face box grown by ``margin`` of its size on each side, then to ``aspect`` (height / width)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w, h = (x1 - x0) * (1 + 2 * margin), (y1 - y0) * (1 + 2 * margin)
    if h / w < aspect:
        h = w * aspect
    else:
        w = h / aspect
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def crop_box(rgb: np.ndarray, box) -> np.ndarray:
    """The box's pixels; parts outside the photo repeat its border (a face at the edge keeps its framing)."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    pad = max(0, -x0, -y0, x1 - w, y1 - h)
    if pad:
        rgb = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    return rgb[y0 + pad:y1 + pad, x0 + pad:x1 + pad]


@dataclass(frozen=True)
class FaceFraming:
    """Photo file (or RGB array) -> H x W x 3 uint8 at ``size``: the face region, then resize.

    The face region (``data.face_crop``): ``center``: the centre ``crop`` when the photo is large enough;
    ``none``: the whole photo; ``detector``: the detected face box widened by ``face_margin`` (boxes looked up in
    ``boxes``, found once by ``faces.find_faces``; other photos are detected on the spot); where no face is found,
    the ``typical`` box of photos of that size (``with_boxes``), else the centre crop."""

    crop: Optional[tuple[int, int]]
    size: tuple[int, int]
    face_crop: str = "center"
    face_margin: float = 0.25
    boxes: Optional[Mapping[str, Optional[tuple]]] = field(default=None, compare=False, hash=False, repr=False)
    typical: Mapping[tuple[int, int], tuple] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_config(cls, data: DataConfig) -> "FaceFraming":
        return cls(tuple(data.crop) if data.crop else None, load_size(data), data.face_crop, data.face_margin)

    def with_boxes(self, faces) -> "FaceFraming":
        """The same preparation with face boxes looked up by path (a ``faces.find_faces`` table), and the typical
        box of each photo size with at least ``TYPICAL_BOX_MIN_PHOTOS`` found faces (sizes already known keep
        theirs: a trained run's, from its training photos)."""
        found = faces[faces["found"].astype(bool)]
        typical = {(int(w), int(h)): tuple(float(v) for v in group[["x0", "y0", "x1", "y1"]].median())
                   for (w, h), group in found.groupby(["width", "height"]) if len(group) >= TYPICAL_BOX_MIN_PHOTOS}
        boxes = {r.path: (r.x0, r.y0, r.x1, r.y1) if r.found else None for r in faces.itertuples()}
        return replace(self, boxes=boxes, typical={**typical, **self.typical})

    def face_region(self, image, rgb: np.ndarray) -> tuple[Optional[np.ndarray], str]:
        """(the region cropped for this photo under ``face_crop=detector``, where it comes from): its face box
        ("detected"), else the typical box of its size ("typical"), else (None, "centre")."""
        if self.boxes is not None and not isinstance(image, np.ndarray) and str(image) in self.boxes:
            box = self.boxes[str(image)]
        else:
            from multitask.data.faces import detect

            face = detect(rgb)
            box = None if face is None else face.box
        how = "detected"
        if box is None:
            # Portraits of one size are framed alike: a missed (often masked) face is cropped like the found ones,
            # so that the framing is no mask cue.
            box, how = self.typical.get((rgb.shape[1], rgb.shape[0])), "typical"
        if box is None:
            return None, "centre"
        return widen(box, self.face_margin, self.size[0] / self.size[1]), how

    def face_box(self, image, rgb: np.ndarray) -> Optional[np.ndarray]:
        return self.face_region(image, rgb)[0]

    def __call__(self, image) -> np.ndarray:
        rgb = read_rgb(image) if not isinstance(image, np.ndarray) else image
        box = self.face_box(image, rgb) if self.face_crop == "detector" else None
        if box is not None:
            rgb = crop_box(rgb, box)
        elif self.crop is not None and self.face_crop != "none":
            ch, cw = self.crop
            h, w = rgb.shape[:2]
            if h >= ch and w >= cw:
                y, x = (h - ch) // 2, (w - cw) // 2
                rgb = rgb[y:y + ch, x:x + cw]
        h, w = self.size
        interp = cv2.INTER_AREA if rgb.shape[0] > h else cv2.INTER_LINEAR
        return np.ascontiguousarray(cv2.resize(rgb, (w, h), interpolation=interp))


def _finish() -> list:
    return [A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2()]


def train_transform(data: DataConfig, aug: AugmentConfig, resize: bool = False) -> A.Compose:
    """Random crop to ``data.size`` and the augmentation; ``resize``: the photo was prepared for another size
    (a stage's ``size`` under the run's ``data.size``) and is first resized to this one's prepared size."""
    h, w = data.size
    steps = [A.Resize(*load_size(data))] if resize else []
    steps += [A.RandomCrop(h, w), A.HorizontalFlip(p=aug.hflip)]
    if aug.brightness_contrast > 0:
        steps.append(A.RandomBrightnessContrast(0.2, 0.2, p=aug.brightness_contrast))
    if aug.affine > 0:
        steps.append(A.Affine(scale=(0.85, 1.3), translate_percent=(-0.06, 0.06), rotate=(-15, 15),
                              border_mode=cv2.BORDER_REFLECT_101, p=aug.affine))
    if aug.color > 0:
        steps.append(A.OneOf([A.ColorJitter(0.2, 0.2, 0.3, 0.05), A.HueSaturationValue(10, 25, 15),
                              A.RGBShift(15, 15, 15), A.ToGray()], p=aug.color))
    if aug.degrade > 0:
        # Real face crops are often 40-80 px, blurred, compressed and noisy: train on such copies too.
        steps.append(A.Sequential([
            A.Downscale(scale_range=(0.25, 0.7), p=0.6),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=(3, 7))], p=0.4),
            A.OneOf([A.GaussNoise(std_range=(0.02, 0.08)), A.ISONoise()], p=0.3),
            A.RandomGamma(gamma_limit=(80, 180), p=0.3),  # low light
            A.ImageCompression(quality_range=(30, 90), p=0.5),
        ], p=aug.degrade))
    if aug.coarse_dropout > 0:
        steps.append(A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.15),
                                     hole_width_range=(0.05, 0.15), p=aug.coarse_dropout))
    return A.Compose(steps + _finish())


def eval_transform(data: DataConfig, scale: float = 1.0, flip: bool = False, resize: bool = False) -> A.Compose:
    """Centre crop to the network size. Test-time views: ``scale`` != 1 resizes the prepared photo first,
    ``flip`` mirrors it. ``resize``: as in ``train_transform``."""
    h, w = data.size
    steps = []
    if scale != 1.0 or resize:
        lh, lw = load_size(data)
        steps.append(A.Resize(max(h, round(lh * scale)), max(w, round(lw * scale))))
    steps.append(A.CenterCrop(h, w))
    if flip:
        steps.append(A.HorizontalFlip(p=1.0))
    return A.Compose(steps + _finish())


@dataclass(frozen=True)
class Preprocessing:
    """A run's preprocessing, decided once from its config (as timm's ``resolve_data_config`` then
    ``create_transform``): ``framing`` (the cacheable step: decode, face region, resize), then ``train()`` or
    ``eval()`` on the framed photo."""

    framing: FaceFraming
    data: DataConfig = field(compare=False, repr=False)
    augment: AugmentConfig = field(compare=False, repr=False)

    @classmethod
    def from_config(cls, cfg: Config) -> "Preprocessing":
        return cls(FaceFraming.from_config(cfg.data), cfg.data, cfg.augment)

    def with_boxes(self, faces) -> "Preprocessing":
        """The same preprocessing with face boxes looked up by path (a ``faces.find_faces`` table)."""
        return replace(self, framing=self.framing.with_boxes(faces))

    def with_typical(self, typical: Mapping[tuple[int, int], tuple]) -> "Preprocessing":
        """The same preprocessing with these typical face boxes by photo size (width, height): a trained run's."""
        return replace(self, framing=replace(self.framing, typical=dict(typical)))

    def train(self, size: Optional[Sequence[int]] = None) -> A.Compose:
        """The training transform; ``size``: at another network size than ``data.size`` (a stage's)."""
        data, resize = self._at(size)
        return train_transform(data, self.augment, resize)

    def eval(self, scale: float = 1.0, flip: bool = False, size: Optional[Sequence[int]] = None) -> A.Compose:
        data, resize = self._at(size)
        return eval_transform(data, scale, flip, resize)

    def _at(self, size: Optional[Sequence[int]]) -> tuple[DataConfig, bool]:
        """The data config at network ``size``, and whether prepared photos must be resized to reach it."""
        if size is None or list(size) == list(self.data.size):
            return self.data, False
        return replace(self.data, size=list(size)), True


def denormalize(tensor) -> np.ndarray:
    """Network input (C x H x W, normalised) -> H x W x 3 float in [0, 1], for overlays."""
    a = tensor.detach().float().cpu().numpy().transpose(1, 2, 0)
    return np.clip(a * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN), 0, 1)


"""Preprocessing (deterministic, cacheable) and augmentation presets (albumentations).

A photo goes through ``Prepare`` once (decode, centre crop to the face region, resize to a little more than the
network size); that result is what the cache stores. ``train_transform`` and ``eval_transform`` then run on it.
Prediction uses exactly ``Prepare`` + ``eval_transform`` built from the run's saved config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from multitask.config import AugmentConfig, DataConfig
from multitask.data.images import read_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_size(data: DataConfig) -> tuple[int, int]:
    """Network size plus the margin, an even number of pixels more, so a centre crop is mirror-symmetric."""
    return tuple(s + 2 * round(s * data.load_margin / 2) for s in data.size)


@dataclass(frozen=True)
class Prepare:
    """Photo file (or RGB array) -> H x W x 3 uint8 at ``size``: centre crop when it fits, then resize."""

    crop: Optional[tuple[int, int]]
    size: tuple[int, int]

    @classmethod
    def from_config(cls, data: DataConfig) -> "Prepare":
        return cls(tuple(data.crop) if data.crop else None, load_size(data))

    def __call__(self, image) -> np.ndarray:
        rgb = read_rgb(image) if not isinstance(image, np.ndarray) else image
        if self.crop is not None:
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


def train_transform(data: DataConfig, aug: AugmentConfig) -> A.Compose:
    h, w = data.size
    steps = [A.RandomCrop(h, w), A.HorizontalFlip(p=aug.hflip)]
    if aug.brightness_contrast > 0:
        steps.append(A.RandomBrightnessContrast(0.2, 0.2, p=aug.brightness_contrast))
    if aug.affine > 0:
        steps.append(A.Affine(scale=(0.85, 1.15), translate_percent=(-0.06, 0.06), rotate=(-15, 15),
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


def eval_transform(data: DataConfig, scale: float = 1.0, flip: bool = False) -> A.Compose:
    """Centre crop to the network size. Test-time views: ``scale`` != 1 resizes the prepared photo first,
    ``flip`` mirrors it."""
    h, w = data.size
    steps = []
    if scale != 1.0:
        lh, lw = load_size(data)
        steps.append(A.Resize(max(h, round(lh * scale)), max(w, round(lw * scale))))
    steps.append(A.CenterCrop(h, w))
    if flip:
        steps.append(A.HorizontalFlip(p=1.0))
    return A.Compose(steps + _finish())


def denormalize(tensor) -> np.ndarray:
    """Network input (C x H x W, normalised) -> H x W x 3 float in [0, 1], for overlays."""
    a = tensor.detach().float().cpu().numpy().transpose(1, 2, 0)
    return np.clip(a * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN), 0, 1)


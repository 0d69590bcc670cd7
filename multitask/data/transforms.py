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


# Where an aligned face's five landmarks (faces.LANDMARKS order) go, as fractions of a square face frame: ArcFace's
# template for its 112 x 112 crops, the one most face models are trained on.
ALIGN_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                           [41.5493, 92.3655], [70.7299, 92.2041]]) / 112
DETECTED = ("detector", "aligned")  # the face crops that need the face detector


def template_points(size: Sequence[int], margin: float) -> np.ndarray:
    """The five template points in a framed photo of ``size`` (H, W): the face frame is a square, centred, its side
    the photo's shorter side shrunk by ``margin`` of itself on each side (as ``widen`` grows a box)."""
    h, w = size
    side = min(h, w) / (1 + 2 * margin)
    return (ALIGN_TEMPLATE - 0.5) * side + [w / 2, h / 2]


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2 x 3 similarity (rotation, one scale, shift) taking points ``src`` closest to ``dst``: least squares
    over all points, so one misplaced landmark (a mouth corner guessed under a mask) moves it a little, not all."""
    x, y = src[:, 0], src[:, 1]
    one, zero = np.ones_like(x), np.zeros_like(x)
    a = np.concatenate([np.stack([x, -y, one, zero], 1), np.stack([y, x, zero, one], 1)])
    (c, s, tx, ty), *_ = np.linalg.lstsq(a, np.concatenate([dst[:, 0], dst[:, 1]]), rcond=None)
    return np.array([[c, -s, tx], [s, c, ty]])


def warp(rgb: np.ndarray, matrix: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``rgb`` through the similarity ``matrix`` into ``size`` (H, W). A photo that shrinks is first resized to
    the face's final scale by area averaging (as ``FaceFraming`` resizes a crop), then rotated and shifted."""
    scale = float(np.hypot(*matrix[:, 0]))
    if scale < 1:
        h, w = rgb.shape[:2]
        small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        matrix = np.hstack([matrix[:, :2] * [[w / small.shape[1], h / small.shape[0]]], matrix[:, 2:]])
        rgb = small
    return cv2.warpAffine(rgb, matrix, (size[1], size[0]), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


@dataclass(frozen=True)
class FaceFraming:
    """Photo file (or RGB array) -> H x W x 3 uint8 at ``size``: the face region, then resize.

    The face region (``data.face_crop``): ``center``: the centre ``crop`` when the photo is large enough;
    ``none``: the whole photo; ``detector``: the detected face box widened by ``face_margin``; ``aligned``: the
    photo turned, scaled and shifted so that the face's five landmarks sit closest to the template's
    (``template_points``). Faces are looked up in ``faces``, found once by ``faces.find_faces``; other photos are
    detected on the spot. Where no face is found: the ``typical`` face of photos of that size (``with_faces``),
    else the centre crop."""

    crop: Optional[tuple[int, int]]
    size: tuple[int, int]
    face_crop: str = "center"
    face_margin: float = 0.25
    # path -> its face: box (x0, y0, x1, y1), then under ``aligned`` the landmarks (x, y) x 5; None: not found
    faces: Optional[Mapping[str, Optional[tuple]]] = field(default=None, compare=False, hash=False, repr=False)
    typical: Mapping[tuple[int, int], tuple] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_config(cls, data: DataConfig) -> "FaceFraming":
        return cls(tuple(data.crop) if data.crop else None, load_size(data), data.face_crop, data.face_margin)

    @property
    def face_columns(self) -> list[str]:
        """The columns of a ``faces.find_faces`` table this framing reads."""
        from multitask.data.faces import LANDMARKS

        box = ["x0", "y0", "x1", "y1"]
        return box + [f"{n}_{a}" for n in LANDMARKS for a in "xy"] if self.face_crop == "aligned" else box

    def with_faces(self, faces) -> "FaceFraming":
        """The same framing with faces looked up by path (a ``faces.find_faces`` table), and the typical face
        (the median of each column) of each photo size with at least ``TYPICAL_BOX_MIN_PHOTOS`` found faces
        (sizes already known keep theirs: a trained run's, from its training photos)."""
        cols = self.face_columns
        found = faces[faces["found"].astype(bool)]
        typical = {(int(w), int(h)): tuple(float(v) for v in group[cols].median())
                   for (w, h), group in found.groupby(["width", "height"]) if len(group) >= TYPICAL_BOX_MIN_PHOTOS}
        known = {path: tuple(row) if ok else None
                 for path, ok, row in zip(faces["path"], faces["found"], faces[cols].itertuples(index=False))}
        return replace(self, faces=known, typical={**typical, **self.typical})

    def face(self, image, rgb: np.ndarray) -> tuple[Optional[np.ndarray], str]:
        """(this photo's face as ``faces`` holds it, where it comes from): found ("detected"), else the typical
        face of its size ("typical"), else (None, "centre")."""
        if self.faces is not None and not isinstance(image, np.ndarray) and str(image) in self.faces:
            face = self.faces[str(image)]
        else:
            from multitask.data.faces import detect

            found = detect(rgb)
            face = None if found is None else found.vector
        how = "detected"
        if face is None:
            # Portraits of one size are framed alike: a missed (often masked) face is framed like the found ones,
            # so that the framing is no mask cue.
            face, how = self.typical.get((rgb.shape[1], rgb.shape[0])), "typical"
        if face is None:
            return None, "centre"
        return np.asarray(face, dtype=np.float64)[:len(self.face_columns)], how

    def alignment(self, face: np.ndarray) -> np.ndarray:
        """The 2 x 3 similarity from the photo's pixels to the framed photo's (``aligned``), for this face."""
        return similarity(face[4:].reshape(5, 2), template_points(self.size, self.face_margin))

    def face_box(self, image, rgb: np.ndarray) -> Optional[np.ndarray]:
        """The region cropped under ``detector``: the face box widened, or None (centre crop)."""
        face, _ = self.face(image, rgb)
        return None if face is None else widen(face[:4], self.face_margin, self.size[0] / self.size[1])

    def region(self, image, rgb: np.ndarray) -> tuple[Optional[np.ndarray], str]:
        """(the corners (4 x 2) in the photo of what the network is given, where its face comes from), for
        ``detector`` and ``aligned``; (None, "centre") where the centre crop is used."""
        face, how = self.face(image, rgb)
        if face is None:
            return None, how
        h, w = self.size
        if self.face_crop == "aligned":
            back = cv2.invertAffineTransform(self.alignment(face))
            return np.array([[0, 0, 1], [w, 0, 1], [w, h, 1], [0, h, 1]], float) @ back.T, how
        x0, y0, x1, y1 = widen(face[:4], self.face_margin, h / w)
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]), how

    def __call__(self, image) -> np.ndarray:
        rgb = read_rgb(image) if not isinstance(image, np.ndarray) else image
        face = self.face(image, rgb)[0] if self.face_crop in DETECTED else None
        return self.cut(rgb, face)

    def cut(self, rgb: np.ndarray, face: Optional[np.ndarray] = None) -> np.ndarray:
        """``rgb`` framed around ``face`` (its box, then its landmarks: ``faces.Face.vector``) as this run frames
        its faces: aligned on the landmarks under ``aligned``, else the box widened by ``face_margin``, whatever
        the run's face crop (a scene's faces are cut this way); without a face, by the centre rule."""
        if face is not None and self.face_crop == "aligned":
            return np.ascontiguousarray(warp(rgb, self.alignment(np.asarray(face, float)), self.size))
        if face is not None:
            rgb = crop_box(rgb, widen(face[:4], self.face_margin, self.size[0] / self.size[1]))
        elif self.crop is not None and self.face_crop != "none":
            ch, cw = self.crop
            h, w = rgb.shape[:2]
            if h >= ch and w >= cw:
                y, x = (h - ch) // 2, (w - cw) // 2
                rgb = rgb[y:y + ch, x:x + cw]
        h, w = self.size
        interp = cv2.INTER_AREA if rgb.shape[0] > h else cv2.INTER_LINEAR
        return np.ascontiguousarray(cv2.resize(rgb, (w, h), interpolation=interp))


Normalization = tuple[Sequence[float], Sequence[float]]  # (mean, std) per RGB channel, of pixels in [0, 1]
IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)


def _finish(norm: Normalization) -> list:
    return [A.Normalize(mean=tuple(norm[0]), std=tuple(norm[1])), ToTensorV2()]


def train_transform(data: DataConfig, aug: AugmentConfig, resize: bool = False, norm: Normalization = IMAGENET
                    ) -> A.Compose:
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
    return A.Compose(steps + _finish(norm))


def eval_transform(data: DataConfig, scale: float = 1.0, flip: bool = False, resize: bool = False,
                   norm: Normalization = IMAGENET) -> A.Compose:
    """Centre crop to the network size. Test-time views: ``scale`` != 1 resizes the prepared photo first,
    ``flip`` mirrors it. ``resize``: as in ``train_transform``; ``norm``: the trunk's (mean, std)."""
    h, w = data.size
    steps = []
    if scale != 1.0 or resize:
        lh, lw = load_size(data)
        steps.append(A.Resize(max(h, round(lh * scale)), max(w, round(lw * scale))))
    steps.append(A.CenterCrop(h, w))
    if flip:
        steps.append(A.HorizontalFlip(p=1.0))
    return A.Compose(steps + _finish(norm))


@dataclass(frozen=True)
class Preprocessing:
    """A run's preprocessing, decided once from its config (as timm's ``resolve_data_config`` then
    ``create_transform``): ``framing`` (the cacheable step: decode, face region, resize), then ``train()`` or
    ``eval()`` on the framed photo."""

    framing: FaceFraming
    data: DataConfig = field(compare=False, repr=False)
    augment: AugmentConfig = field(compare=False, repr=False)
    norm: Normalization = IMAGENET  # the trunk's (mean, std): model.normalization

    @classmethod
    def from_config(cls, cfg: Config) -> "Preprocessing":
        from multitask.model import normalization

        return cls(FaceFraming.from_config(cfg.data), cfg.data, cfg.augment, normalization(cfg.model))

    def with_faces(self, faces) -> "Preprocessing":
        """The same preprocessing with faces looked up by path (a ``faces.find_faces`` table)."""
        return replace(self, framing=self.framing.with_faces(faces))

    def with_typical(self, typical: Mapping[tuple[int, int], tuple]) -> "Preprocessing":
        """The same preprocessing with these typical faces by photo size (width, height): a trained run's."""
        return replace(self, framing=replace(self.framing, typical=dict(typical)))

    def train(self, size: Optional[Sequence[int]] = None) -> A.Compose:
        """The training transform; ``size``: at another network size than ``data.size`` (a stage's)."""
        data, resize = self._at(size)
        return train_transform(data, self.augment, resize, self.norm)

    def eval(self, scale: float = 1.0, flip: bool = False, size: Optional[Sequence[int]] = None) -> A.Compose:
        data, resize = self._at(size)
        return eval_transform(data, scale, flip, resize, self.norm)

    def _at(self, size: Optional[Sequence[int]]) -> tuple[DataConfig, bool]:
        """The data config at network ``size``, and whether prepared photos must be resized to reach it."""
        if size is None or list(size) == list(self.data.size):
            return self.data, False
        return replace(self.data, size=list(size)), True


    def denormalize(self, tensor) -> np.ndarray:
        """Network input (C x H x W, normalised) -> H x W x 3 float in [0, 1], for overlays."""
        a = tensor.detach().float().cpu().numpy().transpose(1, 2, 0)
        return np.clip(a * np.array(self.norm[1]) + np.array(self.norm[0]), 0, 1)


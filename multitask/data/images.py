"""Reading photos as RGB uint8, whatever their mode, bit depth or EXIF orientation."""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
# One limit for every loader (training, data check, predict, explain, the dashboard), read from the file's header
# before anything is decoded: a 48 KB PNG can claim 20000 x 20000 pixels and take gigabytes to decode.
MAX_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS * 2  # PIL's own guard stays as a backstop


class TooLarge(ValueError):
    pass


def check_pixels(img: Image.Image) -> None:
    """Refuse a photo larger than MAX_PIXELS, from its header (nothing decoded yet)."""
    if img.width * img.height > MAX_PIXELS:
        raise TooLarge(f"{img.width}x{img.height} pixels is above the limit of {MAX_PIXELS:,} "
                       f"(multitask.data.images.MAX_PIXELS)")


def files_key(paths, salt: str) -> str:
    """A short key for these files as they are now (path, size, modification time) and ``salt`` (the settings):
    a changed, added or removed file, or other settings, give another key."""
    h = hashlib.sha1(salt.encode())
    for p in map(os.path.abspath, paths):  # ../data/x and /work/data/x are the same file: one cache
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:16]


def is_image_name(path: Path | str) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def not_an_image() -> str:
    """Why a file is not taken as a photo (predict, explain, the data layouts): its name."""
    return f"not an image file (photos end in {', '.join(sorted(IMAGE_EXTENSIONS))})"


def to_rgb(img: Image.Image) -> np.ndarray:
    """An RGB uint8 array from any PIL image: EXIF rotation applied, alpha composited on white,
    16/32-bit channels scaled (not clipped) to 8 bits."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = (a - a.min()) / max(a.max() - a.min(), 1e-12) * 255.0
        return np.repeat(a.astype(np.uint8)[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return np.asarray(img.convert("RGB"))


def read_rgb(path: Path | str) -> np.ndarray:
    """Decode a photo fully (a truncated file raises OSError) and return H x W x 3 uint8."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read forever
        raise ValueError("not a regular file (a FIFO, socket or device)")
    with Image.open(path) as img:
        check_pixels(img)
        img.load()
        return to_rgb(img)

"""Frames from a video file (anything OpenCV's FFmpeg decodes), sampled at a rate of the caller's choosing."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List

import cv2
import numpy as np

from multitask.data.images import MAX_PIXELS

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}


def is_video_name(path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


class VideoError(ValueError):
    """The file cannot be read as a video (the message says why)."""


@dataclass
class Video:
    """An open video: its frame rate, frame count (from the header: may be wrong) and size."""

    path: Path
    fps: float
    frames: int
    width: int
    height: int
    problems: List[str] = field(default_factory=list)

    def sampled(self, fps: float) -> Iterator[tuple[int, float, np.ndarray]]:
        """(frame number, time in seconds, RGB frame) at about ``fps`` frames a second of video (every frame when
        the video has fewer). A frame that fails to decode ends the video; what was read stays read, and
        ``problems`` says where it ended when the header promised more."""
        step = max(1, round(self.fps / fps))
        cap = cv2.VideoCapture(str(self.path))
        try:
            n = 0
            while True:
                ok = cap.grab()
                if not ok:
                    break
                if n % step == 0:
                    ok, frame = cap.retrieve()
                    if not ok or frame is None:
                        break
                    yield n, n / self.fps, np.ascontiguousarray(frame[:, :, ::-1])
                n += 1
        finally:
            cap.release()
        if self.frames and n < self.frames - 1:
            self.problems.append(f"the video ended after {n} of the {self.frames} frames its header gives "
                                 "(truncated or damaged); the frames read are kept")


def open_video(path: Path) -> Video:
    """The video's header, checked: a VideoError naming what is wrong (empty, not a video, too many pixels)."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise VideoError("empty file (0 bytes)")
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise VideoError("cannot be decoded as a video")
        fps = cap.get(cv2.CAP_PROP_FPS)
        frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    finally:
        cap.release()
    if width * height <= 0:
        raise VideoError("no frame size in the video (damaged header?)")
    if width * height > MAX_PIXELS:
        raise VideoError(f"{width}x{height} pixels a frame is above the limit of {MAX_PIXELS:,}")
    if not np.isfinite(fps) or fps <= 0:
        fps = 25.0  # some containers give none: frames are then timed as if at 25 per second
    return Video(path, float(fps), max(0, frames), width, height)


def video_files(root: Path) -> List[Path]:
    """Every file with a video's name under a folder (recursively), hidden files left out, sorted."""
    return sorted(p for p in Path(root).rglob("*") if not p.is_dir() and not p.name.startswith(".")
                  and is_video_name(p))

"""Faces across the frames of a video: ByteTrack (the ``trackers`` package) gives each face a track id, and each
track's probabilities are averaged over its frames, one row per track.

Why ByteTrack through ``trackers``: maintained, the tracker supervision used to ship, boxes and scores in and
ids out, nothing to train; norfair, the other candidate, pins numpy below 2, which torch here cannot use.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import supervision as sv

from multitask.config import HeadConfig
from multitask.inference import BOX, PREDICTED, TOO_SMALL
from multitask.run import prob_columns
from multitask.tasks import joint_class_names, joint_label


class FaceTracker:
    """Track ids for the faces of successive sampled frames of one video.

    ByteTrack names a track from the second frame it is seen in; ``update`` gives a new track's first face a
    handle that ``track_id`` turns into that name once the video is done (-1: a face seen in one frame only)."""

    def __init__(self, fps: float):
        from trackers import ByteTrackTracker

        # every confident face starts a track at once (sampled frames are far apart: no warm-up frames), and a
        # face lost for a second or two keeps its id when it comes back
        self.tracker = ByteTrackTracker(frame_rate=fps, minimum_consecutive_frames=1,
                                        lost_track_buffer=max(1, round(2 * fps)), track_activation_threshold=0.5)

    def update(self, rows: pd.DataFrame) -> list:
        """A handle per row of ``rows`` (one frame's ``inference`` rows, in their order) for ``track_id``."""
        handles: list = [-1] * len(rows)
        faces = np.flatnonzero(rows["face_status"].isin([PREDICTED, TOO_SMALL]).to_numpy())
        if not len(faces):
            self.tracker.update(sv.Detections.empty())
            return handles
        before = {id(t) for t in self.tracker.tracks}
        tracked = self.tracker.update(sv.Detections(xyxy=rows[BOX].to_numpy(np.float32)[faces],
                                                    confidence=rows["face_score"].to_numpy(np.float32)[faces],
                                                    data={"row": faces}))
        spawned = iter(t for t in self.tracker.tracks if id(t) not in before)  # in the order of their faces
        for row, track in zip(tracked.data["row"], tracked.tracker_id):
            handles[row] = int(track) if track >= 0 else next(spawned, -1)
        return handles

    @staticmethod
    def track_id(handle) -> int:
        return handle if isinstance(handle, int) else int(handle.tracker_id)


def track_table(rows: pd.DataFrame, heads: Sequence[HeadConfig]) -> pd.DataFrame:
    """One row per track of one video's face rows (columns ``track``, ``time_s``, ``frame``): its first and last
    time, the frames it was seen in (and classified in), each head's probabilities averaged over the frames it
    was classified in, the class of each, and the joint label."""
    tracked = rows[rows["track"] >= 0]
    out = []
    for track, group in tracked.groupby("track", sort=True):
        seen = group[group["face_status"] == PREDICTED]
        row = {"path": group["path"].iloc[0], "track": int(track), "first_s": group["time_s"].min(),
               "last_s": group["time_s"].max(), "frames": len(group), "frames_classified": len(seen)}
        for h in heads:
            for col in prob_columns(h):
                row[col] = seen[col].mean() if len(seen) else np.nan
        out.append(row)
    table = pd.DataFrame(out)
    if table.empty:
        return table
    done = table["frames_classified"] > 0
    preds = {h.name: table[prob_columns(h)].fillna(-1).to_numpy().argmax(1) for h in heads}
    for h in heads:
        table[f"{h.name}_class"] = np.where(done, [h.classes[i] for i in preds[h.name]], None)
    names = joint_class_names(heads)
    table["label_name"] = np.where(done, [names[i] for i in joint_label(heads, preds)], None)
    return table

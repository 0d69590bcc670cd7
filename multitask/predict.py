"""``multitask predict --run RUN_DIR INPUT --out OUT_DIR``: fold ensemble + TTA on new photos.

``--run`` may be given several times: the runs' ensembles are averaged, each run counting once (runs of
different trunks or recipes make different mistakes; each run keeps its own preprocessing). They must predict
the same heads and classes.

INPUT: an image, a video, a folder of images and videos (recursively), a manifest CSV (``path`` column, labels
optional), the competition's train layout (labeled) or its evaluation layout (``info.csv`` with ``ImageID,ans`` +
``images/``). Writes ``predictions.csv``; ``submission.csv`` for the evaluation layout; ``report.md``/``report.json``
and confusion matrices when the input has labels. Preprocessing is the run's validation transform, read from the
run's saved config.

``--faces all`` (photos, folders and videos, for runs that frame photos by their detected face): one row per face
(``multitask.inference``), ``--draw`` writes each photo (and video) with its faces boxed and labeled into
``drawn/``; videos are sampled at ``--fps``, their faces tracked across frames (``tracks.csv``: one row per track,
its thumbnail in ``tracks/``). ``--faces largest``: one row per photo, framed as the training photos were (the
labeled layouts always: one labeled face per photo).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from multitask.cli import guarded, parse_folds, positive, positive_float
from multitask.config import ENSEMBLES, FACES, PRIORS  # torch-free: --help and usage errors stay fast


def parse_prior(text: str) -> tuple[str, str]:
    head, _, prior = text.partition("=")
    if not head or prior not in PRIORS:
        raise argparse.ArgumentTypeError(f"--prior {text!r}: expected HEAD=" + " or HEAD=".join(PRIORS))
    return head, prior


def cli() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="multitask predict", description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True, action="append",
                   help="run directory of multitask train; repeat to average several runs")
    p.add_argument("input", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--folds", type=parse_folds, help="e.g. 0,2 (default: every trained fold; of every run)")
    p.add_argument("--ensemble", choices=ENSEMBLES, help="default: the run's predict.ensemble")
    p.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="average with mirrored photos (default: the run's predict.tta_flip)")
    p.add_argument("--prior", type=parse_prior, action="append", default=[], metavar="HEAD=PRIOR",
                   help="the class frequencies a head's probabilities assume, instead of the run's heads[i].prior: "
                        "balanced (as its class weights taught) or training (as in the training photos); "
                        "repeatable, e.g. --prior mask=balanced")
    p.add_argument("--faces", choices=FACES, help="all: a row per face found (photos, folders, videos); largest: a "
                   "row per photo framed as in training (default: all for photos, folders and videos when the run "
                   "frames photos by their detected face; always largest for the labeled layouts)")
    p.add_argument("--draw", action="store_true", help="--faces all: write each photo and video with its faces "
                   "boxed and labeled into OUT/drawn/")
    p.add_argument("--fps", type=positive_float, help="videos: frames sampled per second (default: the run's "
                   "predict.fps)")
    p.add_argument("--batch-size", type=positive, default=128)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier prediction in --out (its files "
                   "only; other files stay)")
    return p


if __name__ == "__main__":
    cli().parse_args()  # --help and usage errors answer before torch, pandas and the rest are imported

import pandas as pd  # noqa: E402

from multitask.api import Predictor, load_run, photo_rgb  # noqa: E402
from multitask.config import Config  # noqa: E402
from multitask.data.images import is_image_name, not_an_image  # noqa: E402
from multitask.data.video import VIDEO_EXTENSIONS, VideoError, is_video_name, open_video, video_files  # noqa: E402
from multitask.data.sources import (DataError, Problem, age_thresholds, detect_source, image_files,  # noqa: E402
                                    inside, load_manifest, load_source, read_csv_or_fail)
from multitask.engine import configure_threads  # noqa: E402
from multitask.inference import NO_FACE, PREDICTED, TOO_SMALL, default_faces  # noqa: E402
from multitask.io import atomic_to_csv, atomic_write_text, staged_output  # noqa: E402
from multitask.metrics import label  # noqa: E402
from multitask.plots import write_confusions  # noqa: E402
from multitask.report import labeled_scores, per_class_table  # noqa: E402
from multitask.run import RunDir, true_column  # noqa: E402


# --- inputs ----------------------------------------------------------------------------------------------


def read_input(path: Path, cfg: Config) -> tuple[pd.DataFrame, str, List[Problem]]:
    """(table with a ``path`` column and labels when known, kind, structural problems)."""
    path = Path(path)
    if not path.exists():
        raise DataError([Problem(str(path), "input does not exist")])
    if path.name == "train.csv" and (path.parent / "images").is_dir():
        path = path.parent  # the competition layout's table: its folder is the layout
    if path.is_file() and path.suffix.lower() == ".csv":
        table, problems = load_manifest(path, age_thresholds(cfg.heads), require_labels=False)
        return table, "manifest", problems
    if path.is_file():
        if is_video_name(path):
            return pd.DataFrame({"path": [os.path.abspath(path)]}), "video", []
        if not is_image_name(path):
            raise DataError([Problem(str(path), not_an_image() + f"; videos end in {', '.join(sorted(VIDEO_EXTENSIONS))}")])
        return pd.DataFrame({"path": [os.path.abspath(path)]}), "image", []
    if (path / "info.csv").is_file():
        info = read_csv_or_fail(path / "info.csv", "missing")
        if "ImageID" not in info.columns:
            raise DataError([Problem(str(path / "info.csv"), "missing column ImageID (expected ImageID,ans)")])
        outside = [f"line {n + 2}: ImageID {i!r}" for n, i in enumerate(info["ImageID"])
                   if inside(path / "images", i) is None]
        if outside:
            raise DataError([Problem(str(path / "info.csv"), f"{where} leads outside {path / 'images'}")
                             for where in outside])
        table = info.assign(path=[str((path / "images" / i).resolve()) for i in info["ImageID"]])
        problems = [Problem(p, "listed in info.csv but does not exist") for p in table["path"]
                    if not Path(p).is_file()]
        return table, "evaluation", problems
    source = detect_source(path)
    if source in ("competition", "mask_folders"):  # labeled: scored (a folder per mask class: the mask head)
        table, problems, _ = load_source(source, path, age_thresholds(cfg.heads))
        return table, source, problems
    files = sorted([*image_files(path), *video_files(path)])
    if not files:
        raise DataError([Problem(str(path), "no image or video files found")])
    # absolute, links not followed: a photo is named as the user's folder names it (a broken link too)
    return pd.DataFrame({"path": [os.path.abspath(p) for p in files]}), "folder", []


def write_labeled_report(cfg: Config, heads, df: pd.DataFrame, out: Path) -> dict:
    """Scores of the labeled heads (all of them, or only the mask for a folder per mask class)."""
    scores = labeled_scores(heads, df)
    extra = [f"{h.name}: any other class vs {h.absent}: accuracy {scores[h.name]['on_accuracy']:.4f}"
             for h in heads if "on_accuracy" in scores.get(h.name, {})]
    extra = ["", *extra] if extra else []
    plots = write_confusions(scores, heads, out / "plots")
    keys = list(scores)
    lines = [f"# Prediction report: {len(df)} labeled photos", "",
             "| | " + " | ".join(label(k, heads) for k in keys) + " |", "|---" * (len(keys) + 1) + "|",
             "| macro-F1 | " + " | ".join(f"{scores[k]['f1_macro']:.4f}" for k in keys) + " |",
             "| accuracy | " + " | ".join(f"{scores[k]['accuracy']:.4f}" for k in keys) + " |"]
    lines += extra + per_class_table(scores, heads) + [""] + [f"![{p}](plots/{p})" for p in plots]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "report.json", json.dumps(scores, indent=1))
    return scores


def unweighted_priors(predictor: Predictor, priors: Sequence[tuple[str, str]]) -> List[str]:
    """Notes for --prior HEAD=training on heads that trained without class weights: nothing to take out."""
    notes = []
    for m in predictor.members:
        unweighted = [h.name for h in m.cfg.heads if h.prior == "training" and h.name in dict(priors)
                      and all((model.heads[h.name].class_weights == 1).all() for model in m.models.values())]
        if unweighted:
            notes.append(f"note: {m.run.root.name}: {', '.join(unweighted)} trained with class weights of 1 (or by a "
                         "version that did not keep them): prior training changes nothing there")
    return notes


def pace(seconds: Dict[str, float], photos: int) -> str:
    """One line: photos/s over the steps timed, and each step's seconds (cached faces and framings cost ~0)."""
    total = sum(seconds.values())
    steps = ", ".join(f"{step} {s:.1f} s" for step, s in seconds.items())
    return f"{photos / max(total, 1e-9):.1f} photos/s ({steps})"


SCENE_INPUTS = ("image", "folder", "video")  # the inputs read face by face (--faces all); the layouts never are


def predict_into(predictor: Predictor, input_path: Path, out: Path, faces: Optional[str], draw: bool,
                 fps: Optional[float], progress: bool, log) -> tuple[pd.DataFrame, List[Problem]]:
    """Every output of one prediction written into the (staged) folder ``out``: (predictions, skipped files)."""
    table, kind, problems = read_input(input_path, predictor.cfg)
    if kind not in SCENE_INPUTS and faces == "all":
        raise DataError([Problem(str(input_path), f"a {kind} has one labeled face per photo: --faces all is for "
                                 "photos, folders and videos")])
    faces = faces or (default_faces(predictor.cfg) if kind in SCENE_INPUTS else "largest")
    videos = table["path"].map(is_video_name).to_numpy(dtype=bool)
    per_face = table if faces == "all" else table[videos]  # videos are read face by face whatever --faces says
    if per_face.empty:
        df, unreadable = predict_largest(predictor, table, kind, input_path, out, progress, log, problems)
        return df, problems + unreadable
    per_photo = table[~videos] if faces == "largest" else table.iloc[:0]
    df, unreadable = (predict_largest(predictor, per_photo, kind, input_path, out, progress, log)
                      if len(per_photo) else (pd.DataFrame(), []))
    scenes, more = predict_scenes(predictor, per_face["path"].tolist(), input_path, out, faces == "largest", draw,
                                  fps or predictor.cfg.predict.fps, progress)
    df, problems = pd.concat([df, scenes], ignore_index=True), problems + unreadable + more
    if df.empty:
        raise DataError(problems, f"{input_path}: no photo or video could be predicted")
    write_skipped(problems, out)
    atomic_to_csv(df, out / "predictions.csv")
    return df, problems


def write_skipped(problems: List[Problem], out: Path) -> None:
    if problems:
        atomic_to_csv(pd.DataFrame([p.__dict__ for p in problems]).rename(columns={"message": "reason"}),
                      out / "skipped.csv")


def predict_largest(predictor: Predictor, table: pd.DataFrame, kind: str, input_path: Path, out: Path,
                    progress: bool, log, problems: Optional[List[Problem]] = None) -> tuple[pd.DataFrame, List[Problem]]:
    """One row per photo, framed as the run framed its training photos (its largest face, or its centre);
    predictions.csv, the submission and the labeled report written when ``problems`` (the input's) is given,
    else left to the caller. Returns (predictions, unreadable photos)."""
    missing = {p.path for p in problems or []}
    todo = table[~table["path"].isin(missing)].reset_index(drop=True)
    prepared = predictor.frame_files(todo["path"].tolist())
    if prepared.face_found is not None:
        todo = todo.assign(face_found=prepared.face_found)  # False: no face found; the typical box or centre crop
    if problems is None:
        return predictor.predict_framed(*kept_photos(prepared, todo), progress), prepared.unreadable
    problems = problems + prepared.unreadable
    if problems and kind == "evaluation":
        raise DataError(problems, f"{input_path} (the submission needs every image)")
    images, todo = kept_photos(prepared, todo)
    if todo.empty:
        raise DataError(problems, f"{input_path}: no photo could be predicted")
    write_skipped(problems, out)
    df = predictor.predict_framed(images, todo, progress)
    atomic_to_csv(df, out / "predictions.csv")
    if kind == "evaluation":
        atomic_to_csv(pd.DataFrame({"ImageID": todo["ImageID"], "ans": df["label"]}), out / "submission.csv")
    labeled = [h for h in predictor.heads if true_column(h) in df.columns]
    if labeled:
        scores = write_labeled_report(predictor.cfg, labeled, df, out)
        log("macro-F1: " + ", ".join(f"{k} {v['f1_macro']:.4f}" for k, v in scores.items()))
    return df, prepared.unreadable


def kept_photos(prepared, todo: pd.DataFrame) -> tuple[List, pd.DataFrame]:
    """(per member the framed photos that could be read, their rows of ``todo``)."""
    keep = ~todo["path"].isin({p.path for p in prepared.unreadable}).to_numpy()
    return [images[keep] for images in prepared.images], todo[keep].reset_index(drop=True)


SCENE_CHUNK = 16  # photos read, and their faces batched, at a time: memory stays bounded in a large folder


def drawn_name(path: str, input_path: Path, suffix: str = "") -> str:
    """The drawn file's name: the path under the input folder, folders joined by "__" (no two files share one)."""
    rel = Path(path).relative_to(Path(input_path).resolve()) if Path(input_path).is_dir() else Path(Path(path).name)
    return "__".join(rel.parts) + suffix


def predict_scenes(predictor: Predictor, paths: Sequence[str], input_path: Path, out: Path, largest: bool,
                   draw: bool, fps: float, progress: bool) -> tuple[pd.DataFrame, List[Problem]]:
    """A row per face of each photo and of each sampled video frame (``largest``: each one's largest face only);
    tracks.csv and the track thumbnails for videos; with ``draw``, the annotated photos and videos in drawn/."""
    from multitask.annotate import draw_faces

    photos = [p for p in paths if not is_video_name(p)]
    frames, tracks, problems = [], [], []
    for start in range(0, len(photos), SCENE_CHUNK):
        rgbs, names = [], []
        for path in photos[start:start + SCENE_CHUNK]:
            try:
                rgbs.append(photo_rgb(path, path))
                names.append(path)
            except DataError as e:
                problems += e.problems
        if not rgbs:
            continue
        df = only_largest(predictor.predict_faces(rgbs, names), largest)
        frames.append(df)
        for rgb, name in zip(rgbs, names) if draw else ():
            save_rgb(draw_faces(rgb, df[df["path"] == name], predictor.heads), out / "drawn" /
                     drawn_name(name, input_path))
    for path in (p for p in paths if is_video_name(p)):
        try:
            rows, video_tracks, note = predict_video(predictor, path, input_path, out, largest, draw, fps, progress)
        except VideoError as e:
            problems.append(Problem(path, str(e)))
            continue
        frames.append(rows)
        tracks.append(video_tracks)
        problems += [Problem(path, n) for n in note]
    if tracks:
        atomic_to_csv(pd.concat(tracks, ignore_index=True), out / "tracks.csv")
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), problems


def only_largest(df: pd.DataFrame, largest: bool) -> pd.DataFrame:
    """``--faces largest`` on videos: each frame's largest face (its row 0, or its no-face row)."""
    return df[df["face"] <= 0].reset_index(drop=True) if largest else df


def save_rgb(rgb, path: Path) -> None:
    """A picture written under its name (JPEG at quality 92 for .jpg, else by its suffix)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=92)


def predict_video(predictor: Predictor, path: str, input_path: Path, out: Path, largest: bool, draw: bool,
                  fps: float, progress: bool) -> tuple[pd.DataFrame, pd.DataFrame, List[str]]:
    """(a row per face per sampled frame with ``frame``, ``time_s`` and ``track``; a row per track; notes such as
    where a damaged video ended). Frames are sampled at ``fps``; each track's thumbnail is its largest face."""
    import cv2
    from tqdm.auto import tqdm

    from multitask.annotate import draw_faces
    from multitask.tracking import FaceTracker, track_table

    video = open_video(Path(path))
    step = max(1, round(video.fps / fps))
    tracker, rows, handles, best, writer = FaceTracker(video.fps / step), [], [], {}, None
    total = -(-video.frames // step) if video.frames else None
    try:
        for n, t, rgb in tqdm(video.sampled(fps), total=total, desc=Path(path).name, disable=not progress,
                              unit="frame", dynamic_ncols=True, leave=False):
            df = only_largest(predictor.predict_faces([rgb], [path]), largest)
            df.insert(1, "frame", n)
            df.insert(2, "time_s", round(t, 3))
            rows.append(df)
            handles += tracker.update(df)
            for handle, (_, face) in zip(handles[-len(df):], df.iterrows()):
                area = (face["x1"] - face["x0"]) * (face["y1"] - face["y0"])
                if handle != -1 and area > best.get(id(handle), (0,))[0]:
                    best[id(handle)] = (area, handle, crop(rgb, face))
            if draw:
                if writer is None:
                    target = out / "drawn" / drawn_name(path, input_path, ".mp4")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*"mp4v"), video.fps / step,
                                             (rgb.shape[1], rgb.shape[0]))
                writer.write(draw_faces(rgb, df, predictor.heads)[:, :, ::-1])
    finally:
        if writer is not None:
            writer.release()
    if not rows:
        raise VideoError("no frame could be decoded" + (f" ({video.problems[0]})" if video.problems else ""))
    frames = pd.concat(rows, ignore_index=True)
    frames.insert(3, "track", [tracker.track_id(h) for h in handles])
    tracks = track_table(frames, predictor.heads)
    if len(tracks):
        thumbnails = {}  # per track its largest face
        for area, handle, picture in sorted(best.values(), key=lambda b: b[0]):
            thumbnails[tracker.track_id(handle)] = picture
        names = [f"tracks/{drawn_name(path, input_path)}_track{k}.jpg" for k in tracks["track"]]
        for k, name in zip(tracks["track"], names):
            save_rgb(thumbnails[k], out / name)
        tracks.insert(tracks.columns.get_loc("frames_classified") + 1, "thumbnail", names)
    return frames, tracks, video.problems


def crop(rgb, face):
    """The face's box (grown by a quarter each side) out of the frame: a track's thumbnail."""
    from multitask.data.transforms import crop_box, widen

    return crop_box(rgb, widen([face["x0"], face["y0"], face["x1"], face["y1"]], 0.25, 1.0))


PREDICT_OUTPUTS = ["predictions.csv", "submission.csv", "skipped.csv", "report.md", "report.json", "plots", "drawn",
                   "tracks.csv", "tracks"]


def predict(run_dirs: Union[Path, Sequence[Path]], input_path: Path, out: Path,
            folds: Optional[Sequence[int]] = None, how: Optional[str] = None, flip: Optional[bool] = None,
            batch_size: int = 128, progress: bool = True, log=print,
            priors: Sequence[tuple[str, str]] = (), overwrite: bool = False, faces: Optional[str] = None,
            draw: bool = False, fps: Optional[float] = None) -> pd.DataFrame:
    """``priors``: (head, balanced | training) pairs that replace the runs' ``heads[i].prior``. ``out`` must be
    new or empty, unless ``overwrite``: two predictions never mix their files, and a failed one leaves ``out`` as it
    was (``io.staged_output``). ``faces``, ``draw``, ``fps``: as the command's --faces, --draw and --fps."""
    predictor = load_run(run_dirs, folds, ensemble=how, tta_flip=flip, priors=priors, batch_size=batch_size)
    for note in unweighted_priors(predictor, priors):
        log(note)
    with staged_output(out, PREDICT_OUTPUTS, overwrite, "predict") as staging:
        df, problems = predict_into(predictor, input_path, staging, faces, draw, fps, progress, log)
    what = f"{len(df)} photos" if "face_status" not in df else f"{len(df)} rows ({summary(df)})"
    log(f"{what} predicted ({predictor.how}) by {predictor.describe()}; {len(problems)} skipped"
        + (f" (see {out / 'skipped.csv'})" if problems else "") + f"; wrote {out}")
    log(pace(predictor.seconds, df["path"].nunique() if "face_status" in df else len(df)))
    return df


def summary(df: pd.DataFrame) -> str:
    """e.g. "12 faces classified, 3 too small, 1 photo without a face" of per-face rows."""
    status = df["face_status"].value_counts()
    return (f"{status.get(PREDICTED, 0)} faces classified, {status.get(TOO_SMALL, 0)} too small, "
            f"{status.get(NO_FACE, 0)} photos or frames without a face")


@guarded
def main(argv=None) -> int:
    p = cli()
    a = p.parse_args(argv)
    configure_threads(RunDir(a.run[0]).load_config().train)
    predict(a.run, a.input, a.out, a.folds, a.ensemble, a.tta_flip, a.batch_size, progress=sys.stderr.isatty(),
            priors=a.prior, overwrite=a.overwrite, faces=a.faces, draw=a.draw, fps=a.fps)
    return 0


if __name__ == "__main__":
    sys.exit(main())

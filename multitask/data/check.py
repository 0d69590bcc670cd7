"""``multitask data check ROOT | paint-masks SRC OUT | synth OUT``: data set tools.

check: every problem of a data set at once, with paths (layout and labels, then every photo decoded: truncated,
unreadable and non-image files). paint-masks: ``multitask.data.paint``. synth: ``multitask.data.synth``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from multitask.cli import guarded, non_negative, positive
from multitask.tasks import FACE_AGE_THRESHOLDS

# Data modules (pandas, torch, opencv) are imported where used: --help and usage errors answer at once.


def check(root: Path, source: str | None = None, thresholds=FACE_AGE_THRESHOLDS) -> tuple[int, list]:
    """(number of photos, problems)."""
    from multitask.data.dataset import frame_all
    from multitask.data.sources import SOURCES, DataError, Problem, detect_source, load_source
    from multitask.data.transforms import FaceFraming

    if source is not None and source not in SOURCES:
        return 0, [Problem(f"--source {source}", f"unknown source; one of {', '.join(SOURCES)}")]
    root = Path(root)
    if not root.exists():
        return 0, [Problem(str(root), "does not exist")]
    if root.is_file() and root.suffix.lower() != ".csv":
        return 0, [Problem(str(root), "not a data set: give its folder, or a manifest CSV")]
    table_csv = root / "train.csv"
    if source is None and root.is_dir() and (root / "images").is_dir() and not table_csv.is_file():
        what = "not a file" if table_csv.exists() else "missing"
        return 0, [Problem(str(table_csv), f"{what}: ROOT/images/ is the competition layout, which needs the CSV "
                                           "ROOT/train.csv (id,gender,race,age,path)")]
    source = source or detect_source(root)
    try:
        table, problems, _ = load_source(source, Path(root), thresholds)
    except DataError as e:
        return 0, e.problems
    if table.empty and not problems:
        return 0, [Problem(str(root), "no photo found: not the competition layout (train.csv + images/), a "
                                      "manifest CSV, UTKFace-style names or folders of images")]
    problems += frame_all(list(table["path"]), FaceFraming(None, (8, 8)))
    return len(table), problems


def paint_masks(src: Path, out: Path, people: int, seed: int, workers: int, incorrect: tuple[str, ...]) -> int:
    from multitask.data.faces import DetectorMissing
    from multitask.data.paint import paint_folder
    from multitask.data.sources import SOURCES, DataError, Problem, detect_source, load_source
    from multitask.data.table import balanced_people

    try:
        source = detect_source(src)
        if not {"gender", "age"} <= SOURCES[source].labels:
            raise DataError([Problem(str(src), "paint-masks needs gender and age: a UTKFace-style folder, a labeled "
                                               "manifest CSV or the competition layout")])
        table, problems, _ = load_source(source, Path(src), FACE_AGE_THRESHOLDS)
        for prob in problems:
            print(prob)
        table = table[table["mask"] == 2]  # only unmasked photos are painted on
        if table.empty:
            raise DataError([Problem(str(src), "no unmasked photo to paint on")])
        table = balanced_people(table.drop_duplicates("person_id"), people, seed)
        paint_folder(table, out, seed, workers, incorrect=incorrect)
    except (DataError, FileExistsError, DetectorMissing) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def parse_wears(text: str) -> tuple[str, ...]:
    from multitask.data.paint import INCORRECT_P

    wears = tuple(w.strip() for w in text.split(",") if w.strip())
    unknown = [w for w in wears if w not in INCORRECT_P]
    if unknown or not wears:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of {', '.join(INCORRECT_P)}")
    return wears


SYNTH_SIDES = (8, 4096)  # pixels: a face needs a few to be drawn; the config's sizes stop at the same 4096


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected WxH, e.g. 384x512") from None
    low, high = SYNTH_SIDES
    if not (low <= w <= high and low <= h <= high):
        raise argparse.ArgumentTypeError(f"size {text!r}: each side {low} to {high} pixels")
    return w, h


def parse_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(v) for v in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1 or max(counts) > 500:
        raise argparse.ArgumentTypeError(f"--faces {text!r}: face counts from 1 to 500, e.g. 1,5,20")
    return counts


def synth(a: argparse.Namespace) -> int:
    from multitask.data.scenes import FACE_COUNTS, generate_scenes
    from multitask.data.synth import generate

    try:
        if a.scenes:
            generate_scenes(a.out, a.scenes, a.size or (1280, 720), a.seed, a.faces or FACE_COUNTS,
                            faces_from=a.faces_from, cache_dir=a.cache_dir)
            print(f"wrote {a.scenes} scene photos to {a.out} (their faces: {a.out / 'faces.csv'})")
            return 0
        generate(a.out, a.people, a.size or (384, 512), a.seed, anywhere=a.anywhere)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.people} people ({a.people * 7} photos) to {a.out}")
    return 0


@guarded
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="multitask data", description="Data set tools.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="report every problem of a data set, with file paths")
    c.add_argument("root", type=Path)
    c.add_argument("--source", help="competition, manifest, mask_folders, imagefolder or utkface (default: "
                   "recognised from ROOT)")
    m = sub.add_parser("paint-masks", help="paint masks on unmasked photos: SRC (UTKFace-style folder, labeled "
                       "manifest, or the competition layout's normal photos) -> OUT in the competition layout")
    m.add_argument("src", type=Path)
    m.add_argument("out", type=Path)
    m.add_argument("--people", type=non_negative, default=0, help="at most this many persons, balanced by gender x age "
                   "(default: all)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--workers", type=non_negative, default=0, help="processes (default: one per core)")
    m.add_argument("--incorrect", type=parse_wears, default="nose_out,chin",
                   help="how the incorrect photo wears its mask, drawn from these (default: nose_out,chin): nose_out "
                   "(under the nose), mouth_out (under the lower lip), chin, one_ear (hanging from one ear)")
    g = sub.add_parser("synth", help="draw synthetic persons (7 portraits each, masks painted) in the competition "
                       "layout, for trying the tools without data")
    g.add_argument("out", type=Path)
    g.add_argument("--people", type=positive, default=100)
    g.add_argument("--size", type=parse_size, help="W x H, default 384x512 (scenes: 1280x720)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--anywhere", action="store_true", help="faces of any size anywhere in the frame")
    g.add_argument("--scenes", type=positive, help="instead of persons: this many scene photos, several faces of "
                   "known labels pasted on a background (24-200 px wide), listed in OUT/faces.csv")
    g.add_argument("--faces", type=parse_counts, help="scenes: the numbers of faces a scene may have, e.g. 1,5,20 "
                   "(default: 1 to 20)")
    g.add_argument("--faces-from", type=Path, help="scenes: paste the faces of this labeled folder (competition "
                   "layout) instead of drawn ones")
    g.add_argument("--cache-dir", type=Path, default=Path(".cache/multitask"),
                   help="scenes with --faces-from: where the detector's boxes are cached")
    a = p.parse_args(argv)
    if a.command == "paint-masks":
        return paint_masks(a.src, a.out, a.people, a.seed, a.workers, a.incorrect)
    if a.command == "synth":
        return synth(a)
    count, problems = check(a.root, a.source)
    for prob in problems:
        print(prob)
    print(f"{a.root}: {count} photos, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

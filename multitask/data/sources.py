"""Data sources -> one table (pandas), one row per image.

Every source gives the columns ``path`` (absolute), ``person_id`` (the unit of identity: folds group by it)
and one integer column per head label (-1 where a source has no label). Face sources give
``gender, age, age_group, mask``; image folders give ``class`` and ``split``.

Loaders never stop at the first problem: they return every problem found, each naming its file, and the
caller applies the bad-file policy (see ``apply_policy``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from multitask.data.images import is_image_name, not_an_image
from multitask.errors import BadInput
from multitask.tasks import AGE_CLASSES, FACE_AGE_THRESHOLDS, GENDER_CLASSES, MASK_CLASSES, cut

COMPETITION_PHOTOS = ["mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"]
COMPETITION_MASK = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}
COMPETITION_EXTENSIONS = {".jpg", ".jpeg", ".png"}
TRAIN_CSV_COLUMNS = ["id", "gender", "race", "age", "path"]


def label_key(name: str) -> str:
    """A label or folder name as the alias tables spell it: lower case, runs of "-", "_" and spaces as one "_"."""
    return re.sub(r"[\s_-]+", "_", str(name).strip().lower())


# Accepted spellings of labels and of mask-class folder names, compared by ``label_key`` (any case, "-", "_" and
# spaces alike); integers are taken as class indices. The mask names cover the public face-mask sets' folders
# (with_mask/, without_mask/, mask_weared_incorrect/, ...) as well as this project's own.
GENDER_ALIASES = {"male": 0, "m": 0, "man": 0, "female": 1, "f": 1, "woman": 1}
MASK_ALIASES = {
    "worn": 0, "wear": 0, "mask": 0, "with_mask": 0, "worn_correctly": 0, "mask_worn_correctly": 0, "correct": 0,
    "incorrect": 1, "worn_incorrectly": 1, "incorrect_mask": 1, "mask_worn_incorrectly": 1,
    "mask_weared_incorrect": 1, "mask_incorrect": 1, "incorrectly_worn": 1,
    "not_worn": 2, "not_wear": 2, "normal": 2, "no_mask": 2, "without_mask": 2, "none": 2,
}
AGE_GROUP_ALIASES = {label_key(k): v for k, v in {"<30": 0, "30-59": 1, "30-60": 1, ">=60": 2, "60+": 2}.items()}


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class DataError(BadInput):
    """Bad input. Carries every problem found, not just the first."""

    def __init__(self, problems: Sequence[Problem], what: str = "data"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems[:200])
        more = f"\n  ... and {len(self.problems) - 200} more" if len(self.problems) > 200 else ""
        super().__init__(f"{len(self.problems)} problem(s) in {what}:\n{lines}{more}")


def parse_label(value, aliases: dict, n_classes: int) -> int | None:
    """A class index from a name or an index; None when it cannot be parsed."""
    if pd.isna(value):
        return None
    text = label_key(value)
    if text in aliases:
        return aliases[text]
    try:
        number = float(text)
    except ValueError:
        return None
    if number.is_integer() and 0 <= number < n_classes:
        return int(number)
    return None


MAX_AGE = 150


def parse_age(value) -> int | None:
    try:
        age = float(str(value).strip())
    except ValueError:
        return None
    return int(age) if age.is_integer() and 0 <= age < MAX_AGE else None


def age_problem(value) -> str:
    """Why ``parse_age`` refused a value."""
    try:
        age = float(str(value).strip())
    except ValueError:
        return f"age {value!r} is not a number of years"
    if not age.is_integer():
        return f"age {value!r} is not a whole number of years"
    return f"age {value!r} is outside 0-{MAX_AGE - 1} years"


def age_thresholds(heads: Sequence) -> Sequence[int]:
    """Where the face layouts' age groups are cut: the thresholds of the head on the age_group column."""
    return next((h.thresholds for h in heads if h.column == "age_group" and h.thresholds), FACE_AGE_THRESHOLDS)


def finish_face_table(rows: List[dict], thresholds: Sequence[int]) -> pd.DataFrame:
    """Add age_group (when ages are known) and the 18-class label to face rows."""
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=["path", "person_id", "gender", "age", "age_group", "mask"])
    if "age_group" not in table or table["age_group"].isna().any():
        known = table["age"].notna()
        groups = table.get("age_group", pd.Series(np.nan, index=table.index)).copy()
        groups[known] = cut(table.loc[known, "age"].astype(int), thresholds)
        table["age_group"] = groups
    table["age"] = table["age"].astype("Int64")
    for col in ("gender", "age_group", "mask"):
        table[col] = table[col].astype(np.int64)
    return table


def inside(root: Path, rel: str) -> Optional[Path]:
    """``root / rel`` when it stays inside ``root`` (as written: links inside ``root`` may lead anywhere, an
    absolute path or ``..`` may not), else None: a data file's path column never sends a tool elsewhere."""
    root = Path(os.path.normpath(os.path.abspath(root)))
    path = Path(os.path.normpath(root / rel))
    return path if path == root or root in path.parents else None


def read_csv_or_fail(path: Path, missing: str) -> pd.DataFrame:
    """A CSV as strings (empty cells stay ""), or a DataError naming the file."""
    if not path.is_file():
        raise DataError([Problem(str(path), missing)])
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # parser errors, encoding errors, permissions: all name the file
        raise DataError([Problem(str(path), f"cannot read CSV: {e}")]) from e


# --- competition layout -----------------------------------------------------------------------------------


def load_competition(root: Path, thresholds: Sequence[int] = FACE_AGE_THRESHOLDS) -> Tuple[pd.DataFrame, List[Problem]]:
    """ROOT/train.csv (id,gender,race,age,path) + ROOT/images/<path>/{mask1..5,incorrect_mask,normal}.<ext>."""
    root = Path(root)
    csv_path = root / "train.csv"
    people = read_csv_or_fail(csv_path, "missing: the competition layout needs ROOT/train.csv")
    missing_cols = [c for c in TRAIN_CSV_COLUMNS if c not in people.columns]
    if missing_cols:
        raise DataError([Problem(str(csv_path), f"missing column(s) {missing_cols}; expected {TRAIN_CSV_COLUMNS}")])

    problems: List[Problem] = []
    rows: List[dict] = []
    images_dir = root / "images"
    duplicated = set(people["id"][people["id"].duplicated(keep=False)])
    for pid in sorted(duplicated):
        lines = [str(i + 2) for i in people.index[people["id"] == pid]]
        problems.append(Problem(str(csv_path), f"duplicate person id {pid!r} on lines {', '.join(lines)}"))
    listed = set()
    for i, person in people.iterrows():
        if person["id"] in duplicated:
            listed.add(person["path"])
            continue  # two people sharing an id would share folds: neither is used
        line = i + 2  # header is line 1
        folder = inside(images_dir, person["path"])
        listed.add(person["path"])
        gender = parse_label(person["gender"], GENDER_ALIASES, 2)
        age = parse_age(person["age"])
        bad = []
        if gender is None:
            bad.append(f"gender {person['gender']!r} is not male/female")
        if age is None:
            bad.append(age_problem(person["age"]))
        if not person["path"]:
            bad.append("empty path")
        elif folder is None or folder == inside(images_dir, "."):
            bad.append(f"path {person['path']!r} is not a folder inside {images_dir}")
        if bad:
            problems.append(Problem(str(csv_path), f"line {line}: " + "; ".join(bad)))
            continue
        if not folder.is_dir():
            problems.append(Problem(str(folder), f"person folder listed in train.csv line {line} does not exist"))
            continue
        found = {}
        for f in sorted(folder.iterdir()):
            if f.name.startswith("."):
                continue  # hidden files (.DS_Store, macOS ._ forks) are not data
            stem, ext = f.stem, f.suffix.lower()
            if not f.is_file() or ext not in COMPETITION_EXTENSIONS:
                problems.append(Problem(str(f), "not an image file (.jpg/.jpeg/.png) of the competition layout"))
            elif stem not in COMPETITION_MASK:
                problems.append(Problem(str(f), f"extra photo: names are {', '.join(COMPETITION_PHOTOS)}"))
            elif stem in found:
                problems.append(Problem(str(f), f"second file for photo {stem!r} (also {found[stem].name})"))
            else:
                found[stem] = f
        missing = [s for s in COMPETITION_PHOTOS if s not in found]
        if missing:
            problems.append(Problem(str(folder), f"missing photo(s): {', '.join(missing)}"))
        for stem, f in found.items():
            rows.append(dict(path=str(f.resolve()), person_id=str(person["id"]), gender=gender, age=age,
                             mask=COMPETITION_MASK[stem], race=person["race"], photo=stem))
    if images_dir.is_dir():
        for d in sorted(images_dir.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and d.name not in listed:
                problems.append(Problem(str(d), "person folder not listed in train.csv"))
    else:
        problems.append(Problem(str(images_dir), "missing: the competition layout needs ROOT/images/"))
    return finish_face_table(rows, thresholds), problems


# --- manifest CSV -----------------------------------------------------------------------------------------


def load_manifest(csv_path: Path, thresholds: Sequence[int] = FACE_AGE_THRESHOLDS, require_labels: bool = True
                  ) -> Tuple[pd.DataFrame, List[Problem]]:
    """A user's CSV with path,person_id,gender,age (or age_group),mask; paths relative to the CSV."""
    csv_path = Path(csv_path)
    df = read_csv_or_fail(csv_path, "manifest CSV does not exist")
    need = ["path"] + (["person_id", "gender", "mask"] if require_labels else [])
    missing_cols = [c for c in need if c not in df.columns]
    if require_labels and "age" not in df.columns and "age_group" not in df.columns:
        missing_cols.append("age or age_group")
    if missing_cols:
        raise DataError([Problem(str(csv_path), f"missing column(s) {missing_cols}")])
    problems: List[Problem] = []
    rows = []
    labeled = all(c in df.columns for c in ("gender", "mask")) and ("age" in df or "age_group" in df)
    for i, r in df.iterrows():
        line = i + 2
        path = inside(csv_path.parent, r["path"])
        if path is None:
            problems.append(Problem(str(csv_path), f"line {line}: path {r['path']!r} leads outside the CSV's folder "
                                                   f"{csv_path.parent.absolute()}, where its photos must be"))
            continue
        path = path.resolve()
        row = dict(r)
        row.update(path=str(path), person_id=str(r.get("person_id") or r["path"]))
        bad = []
        if not path.is_file():
            problems.append(Problem(str(path), f"listed in {csv_path.name} line {line} but does not exist"))
            continue
        if labeled:
            row["gender"] = parse_label(r["gender"], GENDER_ALIASES, 2)
            row["mask"] = parse_label(r["mask"], MASK_ALIASES, 3)
            row["age"] = parse_age(r["age"]) if "age" in df.columns and r["age"] != "" else None
            if "age_group" in df.columns and r["age_group"] != "":
                row["age_group"] = parse_label(r["age_group"], AGE_GROUP_ALIASES, 3)
                if row["age_group"] is None:
                    bad.append(f"age_group {r['age_group']!r} is not one of {AGE_CLASSES}")
            elif row["age"] is None:
                bad.append(age_problem(r.get("age", "")))
            if row["gender"] is None:
                bad.append(f"gender {r['gender']!r} is not one of {GENDER_CLASSES}")
            if row["mask"] is None:
                bad.append(f"mask {r['mask']!r} is not one of {MASK_CLASSES}")
        if bad:
            problems.append(Problem(str(csv_path), f"line {line}: " + "; ".join(bad)))
            continue
        rows.append(row)
    if not labeled:
        return pd.DataFrame(rows, columns=list(df.columns)), problems
    table = finish_face_table(rows, thresholds)
    mixed = people_of_two_minds(table)
    problems += [Problem(str(csv_path), f"person {pid!r}: {why}") for pid, why in mixed.items()]
    return table[~table["person_id"].isin(mixed)].reset_index(drop=True), problems


MAX_AGE_SPREAD = 10  # years between one person's photos in a manifest; more is two people under one id


def people_of_two_minds(table: pd.DataFrame) -> Dict[str, str]:
    """person_id -> why, for persons whose rows disagree on who they are: two genders, or ages more than
    MAX_AGE_SPREAD years apart. A person is one group of the folds: such rows are two people, or a labeling
    mistake, and are left out."""
    out = {}
    for pid, rows in table.groupby("person_id"):
        genders = sorted(GENDER_CLASSES[g] for g in rows["gender"].unique())
        ages = rows["age"].dropna()
        if len(genders) > 1:
            out[pid] = f"rows give two genders ({', '.join(genders)})"
        elif len(ages) and ages.max() - ages.min() > MAX_AGE_SPREAD:
            out[pid] = (f"rows give ages {ages.min()} and {ages.max()}, more than {MAX_AGE_SPREAD} years apart "
                        "(multitask.data.sources.MAX_AGE_SPREAD)")
    return out


# --- UTKFace-style folders --------------------------------------------------------------------------------

UTK_NAME = re.compile(r"^(\d+)_([01])_(\d+)_[^.]*\.(jpg|jpeg|png)", re.IGNORECASE)


def load_utkface(root: Path, thresholds: Sequence[int] = FACE_AGE_THRESHOLDS) -> Tuple[pd.DataFrame, List[Problem]]:
    """<age>_<gender 0=male 1=female>_<race>_<date>.jpg[.chip.jpg]: unmasked faces, one person per file."""
    root = Path(root)
    if not root.is_dir():
        raise DataError([Problem(str(root), "UTKFace folder does not exist")])
    problems, rows = [], []
    for f in image_files(root):  # a README beside the photos is not a problem
        m = UTK_NAME.match(f.name)
        if not m:
            problems.append(Problem(str(f), "name is not <age>_<gender 0/1>_<race>_<date>.jpg"))
            continue
        rows.append(dict(path=str(f.resolve()), person_id=f"utk:{f.name}", gender=int(m.group(2)),
                         age=int(m.group(1)), mask=2, race=m.group(3)))
    return finish_face_table(rows, thresholds), problems


# --- image folders ----------------------------------------------------------------------------------------


def imagefolder_splits(root: Path) -> Dict[str, Path]:
    """split -> folder: ROOT/train and ROOT/test when they exist, else ROOT is the training split."""
    root = Path(root)
    if not root.is_dir():
        raise DataError([Problem(str(root), "image folder does not exist")])
    return {s: root / s for s in ("train", "test") if (root / s).is_dir()} or {"train": root}


def imagefolder_classes(root: Path) -> List[str]:
    """The class names of an image-folder layout: its training split's folder names, sorted."""
    train = imagefolder_splits(root)["train"]
    classes = sorted(d.name for d in train.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError([Problem(str(train), "no class folders (expected ROOT/<class>/<image>)")])
    return classes


def load_imagefolder(root: Path) -> Tuple[pd.DataFrame, List[Problem], List[str]]:
    """ROOT/<class>/<image>, or ROOT/train/<class>/... and ROOT/test/<class>/...; returns (table, problems, classes).

    Each image is its own group for the folds (no notion of person)."""
    root = Path(root)
    split_dirs = imagefolder_splits(root)
    class_dirs = imagefolder_classes(root)
    problems, rows = [], []
    for split, base in split_dirs.items():
        for d in sorted(base.iterdir()):
            if d.name.startswith("."):
                continue
            if not d.is_dir():
                problems.append(Problem(str(d), "file outside a class folder"))
                continue
            if d.name not in class_dirs:
                problems.append(Problem(str(d), f"class folder not in {split_dirs['train']}"))
                continue
            for f in sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith(".")):
                if not is_image_name(f):
                    problems.append(Problem(str(f), not_an_image()))
                    continue
                rel = f.relative_to(root).as_posix()
                rows.append({"path": str(f.resolve()), "person_id": rel, "class": class_dirs.index(d.name),
                             "split": split})
    return pd.DataFrame(rows, columns=["path", "person_id", "class", "split"]), problems, class_dirs


def mask_folders(root: Path) -> bool:
    """ROOT/<mask class>/<image>, e.g. worn_correctly/, worn_incorrectly/, not_worn/."""
    dirs = [d for d in Path(root).iterdir() if d.is_dir() and not d.name.startswith(".")]
    return bool(dirs) and all(label_key(d.name) in MASK_ALIASES for d in dirs)


def load_mask_folders(root: Path) -> Tuple[pd.DataFrame, List[Problem]]:
    """A folder per mask class: mask labels only (gender and age -1), each image its own person."""
    problems, rows = [], []
    for d in sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")):
        if label_key(d.name) not in MASK_ALIASES:
            problems.append(Problem(str(d), "not a mask class folder; names understood: " + ", ".join(MASK_ALIASES)))
            continue
        for f in image_files(d):
            rows.append(dict(path=str(f.resolve()), person_id=f.relative_to(root).as_posix(),
                             mask=MASK_ALIASES[label_key(d.name)]))
    for f in sorted(p for p in Path(root).iterdir() if p.is_file() and is_image_name(p)):
        problems.append(Problem(str(f), "image outside a mask class folder"))  # READMEs and the like are fine
    table = pd.DataFrame(rows, columns=["path", "person_id", "mask"])
    return table.assign(gender=-1, age=pd.array([pd.NA] * len(table), dtype="Int64"), age_group=-1), problems


def image_files(root: Path) -> Iterable[Path]:
    """Everything with an image file's name under a folder (recursively), hidden files left out, sorted. Broken
    links and special files (a FIFO) named like images are included, so that reading them reports them."""
    return sorted(p for p in Path(root).rglob("*")
                  if not p.is_dir() and not p.name.startswith(".") and is_image_name(p))


# --- the table of sources ----------------------------------------------------------------------------------

Loaded = Tuple[pd.DataFrame, List[Problem], List[str]]  # table, problems, class names found (image folders)


@dataclass(frozen=True)
class Source:
    """A data layout: how it is recognised, how it is read, and which labels it gives."""

    looks_like: Callable[[Path], bool]
    load: Callable[[Path, Sequence[int]], Loaded]  # (root, age thresholds)
    labels: FrozenSet[str]  # face labels it gives (mask, gender, age); empty: its own classes
    trains: bool = True  # a data.source of its own (else only for data.extra_val / extra_train / predict)


def has_class_folders(root: Path) -> bool:
    return root.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())


FACE_LABELS = frozenset({"mask", "gender", "age"})

# In the order layouts are recognised: the first whose looks_like says yes. Adding a layout is one entry here
# (and its loader above): config validation, `data check`, training, extra sets and predict read this table.
SOURCES: Dict[str, Source] = {
    "manifest": Source(lambda r: r.is_file() and r.suffix.lower() == ".csv",
                       lambda r, t: (*load_manifest(r, t), []), FACE_LABELS),
    "competition": Source(lambda r: (r / "train.csv").is_file(), lambda r, t: (*load_competition(r, t), []),
                          FACE_LABELS),
    "mask_folders": Source(lambda r: r.is_dir() and mask_folders(r), lambda r, t: (*load_mask_folders(r), []),
                           frozenset({"mask"}), trains=False),
    "imagefolder": Source(has_class_folders, lambda r, t: load_imagefolder(r), frozenset()),
    "utkface": Source(lambda r: r.is_dir(), lambda r, t: (*load_utkface(r, t), []), FACE_LABELS),
}


def detect_source(root: Path) -> str:
    """The name of the first source in SOURCES that recognises ``root`` (utkface: any other folder)."""
    return next((name for name, s in SOURCES.items() if s.looks_like(Path(root))), "utkface")


def load_source(name: str, root: Path, thresholds: Sequence[int] = FACE_AGE_THRESHOLDS) -> Loaded:
    return SOURCES[name].load(Path(root), thresholds)

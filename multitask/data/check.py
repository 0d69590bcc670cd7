"""``python -m multitask.data check ROOT``: every problem of a data set at once, with paths.

Checks the layout and labels, then decodes every photo (truncated, unreadable and non-image files)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List

from multitask.data.dataset import prepare_all
from multitask.data.sources import DataError, Problem
from multitask.data.table import detect_source, load_source
from multitask.data.transforms import Prepare


def check(root: Path, source: str | None = None, thresholds=(30, 60)) -> tuple[int, List[Problem]]:
    """(number of photos, problems)."""
    source = source or detect_source(root)
    try:
        table, problems, _ = load_source(source, Path(root), thresholds)
    except DataError as e:
        return 0, e.problems
    problems += prepare_all(list(table["path"]), Prepare(None, (8, 8)))
    return len(table), problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m multitask.data", description="Data set tools.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="report every problem of a data set, with file paths")
    c.add_argument("root", type=Path)
    c.add_argument("--source", choices=["competition", "manifest", "utkface", "imagefolder"])
    a = p.parse_args(argv)
    count, problems = check(a.root, a.source)
    for prob in problems:
        print(prob)
    print(f"{a.root}: {count} photos, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

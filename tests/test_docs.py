"""The documentation says what the code does: the generated config reference, the README's lists and its API
example, run as written."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from multitask.config_reference import reference
from multitask.data.sources import MASK_ALIASES

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_config_reference_is_generated_from_the_config_as_it_is():
    assert (ROOT / "docs" / "config.md").read_text() == reference(), "stale: run `make docs`"


def test_the_config_reference_gives_the_real_defaults():
    text = reference()
    for line in ("| `augment.degrade` | `0.7` | ≥ 0, ≤ 1 |", "| `augment.affine` | `0.6` |", "| `cv.folds` | `5` | ≥ 2 |",
                 "| `heads.N.kind` | `ce` | `ce` \\| `ordinal` \\| `dldl` \\| `regression` |",
                 "- `stage1`: 4 epochs, heads gender, age, photos whose mask is not_worn",
                 "- `stage2`: 8 epochs, every head", "| `stageN.epochs` | `6` | ≥ 1 |"):
        assert line in text, line


def test_the_readme_is_a_guide_not_a_notebook():
    assert len(README.splitlines()) <= 300
    commands = re.findall(r"^(?:make|multitask|torchrun|RUN=|for k)\b.*$", README, re.M)
    assert commands and not [c for c in commands if "python -m multitask" in c]


def test_the_readme_lists_exactly_the_mask_folder_names_understood():
    listed = README.split("Folder names understood")[1].split("- **Image folders**")[0]
    names = set(re.findall(r"`([a-z][a-z_]*)`", listed))
    assert names == set(MASK_ALIASES)


@pytest.mark.slow
def test_the_readme_api_example_runs(trained_run, faces_root, tmp_path, monkeypatch):
    block = README.split("## Python API")[1].split("```python")[1].split("```")[0]
    assert "load_run(" in block and ".predict(" in block and ".explain(" in block
    shutil.copy(next((faces_root / "images").rglob("normal.jpg")), tmp_path / "face.jpg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(block.replace("runs/faces-20261205-101500", str(trained_run)), namespace)
    table, heat = namespace["table"], namespace["heat"]
    assert len(table) == 3 and table["path"].tolist()[1:] == ["<image 1>", "<image 2>"]
    assert heat.shape == (48, 40) and 0 <= heat.min() and heat.max() <= 1

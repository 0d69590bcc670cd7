"""An installed wheel works outside the source tree: every subpackage and the presets ship inside the package."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_finds_its_presets(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("multitask-*.whl"))
    import zipfile

    inside = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "multitask").rglob("*.py")}
    assert sources <= inside, sorted(sources - inside)  # every module of the source tree ships
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                              str(tmp_path / "site"), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    code = ("import multitask, multitask.config as c; print(multitask.__file__); "
            "cfg = c.load_config(['data=dev_faces', 'experiment=quick', 'model=imagenet']); "
            "print(cfg.data.size, cfg.model.pretrained); "
            "from multitask.cli import dashboard_script; print(dashboard_script())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[0].startswith(str(tmp_path / "site"))
    assert out.stdout.splitlines()[1] == "[64, 48] imagenet"
    dashboard = Path(out.stdout.splitlines()[2])  # `multitask dashboard` runs the copy inside the package
    assert dashboard.is_file() and dashboard.is_relative_to(tmp_path / "site")
    entry_points = next((tmp_path / "site").glob("multitask-*.dist-info")) / "entry_points.txt"
    assert "multitask = multitask.cli:main" in entry_points.read_text()

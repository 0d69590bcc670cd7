"""``python -m multitask.train [key=value ...] [--resume RUN_DIR]``: config -> cross-validation -> report.

Examples:
    python -m multitask.train                                  # synthetic faces, the embedded default
    python -m multitask.train data=competition data.root=/data/train model.pretrained=imagenet
    python -m multitask.train experiment=quick train.precision=fp32
    python -m multitask.train --resume runs/faces-20261124-101500
"""
from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from multitask.config import Config, ConfigError, load_config, to_yaml

# torch, pandas and the trainer are imported in main(), after the arguments are read: --help and usage errors
# answer at once.


def new_run_dir(cfg: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(cfg.out_dir) / f"{cfg.name}-{stamp}"
    n = 1
    while path.exists():  # never reuse (and so overwrite) an earlier run
        n += 1
        path = Path(cfg.out_dir) / f"{cfg.name}-{stamp}-{n}"
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m multitask.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("overrides", nargs="*", help="key=value, GROUP=NAME (data, model, experiment) or a YAML file")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run")
    p.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    a = p.parse_args(argv)
    from multitask.cv import run_cv
    from multitask.data.sources import DataError
    from multitask.engine import NonFiniteLoss, configure_threads
    from multitask.model import WeightsError
    from multitask.report import write_report

    run_dir = None
    try:
        if a.resume:
            if a.overrides:
                raise ConfigError("--resume takes the run's saved config; overrides would change the run midway")
            if not (a.resume / "config.yaml").exists():
                raise ConfigError(f"{a.resume}: no config.yaml; not a run directory")
            cfg, run_dir = load_config(base=a.resume / "config.yaml"), a.resume
        else:
            cfg = load_config(a.overrides)
        if a.show_config:
            print(to_yaml(cfg))
            return 0
        configure_threads(cfg.train)
        run_dir = run_dir or new_run_dir(cfg)
        run_cv(cfg, run_dir)
        report = write_report(run_dir)
    except (ConfigError, DataError, WeightsError, NonFiniteLoss) as e:
        where = f" (run {run_dir}; earlier results are kept, --resume continues)" if run_dir else ""
        print(f"error: {e}{where}", file=sys.stderr)
        return 2
    print((run_dir / "report.md").read_text())
    key = "joint" if "joint" in report["mean"] else next(iter(report["mean"]))
    heads = ", ".join(f"{k} {v['f1_macro']:.3f}" for k, v in report["mean"].items() if k != key)
    name = report["joint_name"] if key == "joint" else key
    print(f"{name} macro-F1 {report['mean'][key]['f1_macro']:.3f} ± {report['std'][key]['f1_macro']:.3f}"
          f"{f' ({heads})' if heads else ''} over {len(report['folds'])} fold(s). Report: {run_dir / 'report.md'}; "
          f"look inside with `make dashboard` (MULTITASK_RUNS={run_dir.parent}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

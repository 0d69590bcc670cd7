"""``multitask train [key=value ...] [--resume RUN_DIR]``: config -> cross-validation -> report.

Examples:
    multitask train                                   # synthetic faces, the embedded default
    multitask train data=competition data.root=/data/train model.pretrained=imagenet
    multitask train experiment=quick train.precision=fp32
    multitask train --resume runs/faces-20261124-101500
    torchrun --nproc-per-node 4 -m multitask.train data=competition data.root=/data/train   # data parallel
    RUN=$(multitask train data=... --create-only | tail -1)   # fold jobs:
    multitask train --resume $RUN --folds 0 & multitask train --resume $RUN --folds 1 & ...
"""
from __future__ import annotations

import argparse
import shutil
import sys
from datetime import datetime
from pathlib import Path

from multitask.cli import EXIT_BAD_INPUT, EXIT_SYSTEM, guarded, parse_folds, system_error_line
from multitask.config import Config, ConfigError, load_config, to_yaml

# torch, pandas and the trainer are imported in main(), after the arguments are read: --help and usage errors
# answer at once.


def new_run_dir(cfg: Config) -> Path:
    if Path(cfg.out_dir).exists() and not Path(cfg.out_dir).is_dir():
        raise ConfigError(f"out_dir={cfg.out_dir}: is a file, not a folder")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(cfg.out_dir) / f"{cfg.name}-{stamp}"
    n = 1
    while path.exists():  # never reuse (and so overwrite) an earlier run
        n += 1
        path = Path(cfg.out_dir) / f"{cfg.name}-{stamp}-{n}"
    return path


@guarded
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="multitask train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("overrides", nargs="*", help="key=value, GROUP=NAME (data, model, experiment) or a YAML file")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run (or join it: --folds)")
    p.add_argument("--folds", type=parse_folds, metavar="K,K", help="with --resume: train only these folds (fold "
                   "jobs in parallel on one run directory; each fold is taken by one job)")
    p.add_argument("--create-only", action="store_true", help="write the run directory (config, folds, data "
                   "list) and print its path, for fold jobs to --resume RUN --folds K")
    p.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    a = p.parse_args(argv)
    if a.folds and not a.resume:
        p.error("--folds takes a run: --resume RUN_DIR --folds K (or set cv.run_folds for a new run)")
    from multitask import distributed
    from multitask.training.cv import folds_to_train, open_run, run_cv
    from multitask.metrics import JOINT
    from multitask.data.sources import DataError
    from multitask.engine import NonFiniteLoss, configure_threads
    from multitask.model import WeightsError
    from multitask.report import write_report
    from multitask.run import RunDir

    world = distributed.from_env()
    run_dir, created = None, False
    try:
        if a.resume:
            if a.overrides:
                raise ConfigError("--resume takes the run's saved config; overrides would change the run midway")
            cfg, run_dir = RunDir(a.resume).load_config(), a.resume
            RunDir(a.resume).check_unedited(cfg)
            if a.folds:
                bad = [k for k in a.folds if k not in cfg.cv.trainable()]
                if bad:
                    raise ConfigError(f"--folds {bad}: the run has folds 0..{cfg.cv.folds - 1}"
                                      + (f" but {cfg.cv.leave_out} (cv.leave_out)" if cfg.cv.leave_out is not None
                                         else ""))
                cfg.cv.run_folds = a.folds
        else:
            cfg = load_config(a.overrides)
        if a.show_config:
            print(to_yaml(cfg))
            return 0
        configure_threads(cfg.train, world)
        uses_gpu = cfg.train.device.startswith("cuda") or (cfg.train.device == "auto" and torch_cuda())
        if cfg.train.sync_bn and not uses_gpu:
            raise ConfigError("train.sync_bn=true shares BatchNorm statistics between GPUs; this run trains on the "
                              "CPU (train.device), where it cannot: leave it false")
        distributed.init(world, "cuda" if uses_gpu else "cpu")
        if run_dir is None:
            chosen = distributed.elastic_run(cfg.out_dir, world) or (new_run_dir(cfg) if world.main else None)
            run_dir = Path(distributed.broadcast(world, str(chosen) if chosen else None))
            created = not RunDir(run_dir).is_run()
            if world.main:
                distributed.remember_elastic_run(cfg.out_dir, run_dir)
            if not created:  # torchrun restarted the workers: continue the run they started, as --resume does
                cfg = RunDir(run_dir).load_config()
        if a.create_only:
            open_run(cfg, run_dir, print, world)
            print(run_dir)
            return 0
        run_cv(cfg, run_dir, world=world)
        if not world.main:
            return 0
        left = folds_to_train(RunDir(run_dir).load_config(), run_dir)
        if left:  # fold jobs: the report waits for the other folds
            print(f"folds {cfg.cv.run_folds or 'all'} done in {run_dir}; folds {left} still to train (or in "
                  f"training); then: multitask report {run_dir}")
            return 0
        report = write_report(run_dir)
        distributed.forget_elastic_run(cfg.out_dir)  # finished: nothing for a restart to continue
    except (ConfigError, DataError, WeightsError, NonFiniteLoss, OSError) as e:
        if world.main and created and run_dir.is_dir() and not RunDir(run_dir).is_run():
            shutil.rmtree(run_dir, ignore_errors=True)  # failed before anything worth keeping: leave no folder
        kept = run_dir is not None and RunDir(run_dir).is_run()
        where = f" (run {run_dir}; earlier results are kept, --resume {run_dir} continues)" if kept else ""
        if world.main:
            print(f"{system_error_line(e) if isinstance(e, OSError) else f'error: {e}'}{where}", file=sys.stderr)
        return EXIT_SYSTEM if isinstance(e, OSError) else EXIT_BAD_INPUT
    finally:
        distributed.shutdown()
    print(RunDir(run_dir).report_md.read_text())
    key = JOINT if JOINT in report["mean"] else next(iter(report["mean"]))
    heads = ", ".join(f"{k} {v['f1_macro']:.3f}" for k, v in report["mean"].items() if k != key)
    name = report["joint_name"] if key == JOINT else key
    print(f"{name} macro-F1 {report['mean'][key]['f1_macro']:.3f} ± {report['std'][key]['f1_macro']:.3f}"
          f"{f' ({heads})' if heads else ''} over {len(report['folds'])} fold(s). Report: {RunDir(run_dir).report_md}; "
          f"look inside with `multitask dashboard --runs {run_dir.parent}`.")
    return 0


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())

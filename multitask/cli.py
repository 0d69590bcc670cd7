"""The ``multitask`` command: one entry point for every tool of the project.

Each subcommand runs its module exactly as ``python -m multitask.<module>`` does (same arguments, same exit
codes), so both spellings keep working and share one code path. Nothing heavy is imported here: ``multitask
--help`` and ``multitask <command> --help`` answer at once.
"""
from __future__ import annotations

import errno
import functools
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

# command -> (module run as __main__, one line for the overview)
COMMANDS = {
    "train": ("multitask.train", "cross-validated training: config -> folds -> stages -> report"),
    "predict": ("multitask.predict", "fold ensembles and test-time views on new photos; the submission file"),
    "explain": ("multitask.explain", "Grad-CAM grids (trunk layers x heads) for photos"),
    "report": ("multitask.report", "rebuild a run's report and model card, or score several runs' average"),
    "export": ("multitask.export", "a run's models as ONNX or TorchScript, probabilities inside the graph"),
    "bench": ("multitask.bench", "throughput on this machine: training, loader, inference, ONNX Runtime"),
    "data": ("multitask.data", "data set tools: check, synth, paint-masks"),
    "dashboard": (None, "the Streamlit inspection dashboard over a folder of runs"),
}

MAX_UPLOAD_MB = 10  # a photo uploaded to the dashboard: streamlit's server.maxUploadSize and the page's own check
EXIT_BAD_INPUT = 2  # a config key or value, a data problem, a run folder or checkpoint
EXIT_SYSTEM = 3  # the system refused a file operation: permission, disk full, not a directory, ...
EXIT_CODES = """exit codes: 0 done; 1 problems found (data check); 2 bad input (config, data, run folder,
weights); 3 the system refused a file operation (permission, disk full, ...). Errors are one line naming the
file or key; earlier results are never overwritten by a failed command."""

SYSTEM_ERRORS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted", errno.EROFS: "read-only file system",
                 errno.ENOTDIR: "a path component is not a folder", errno.EISDIR: "is a folder, not a file",
                 errno.ENOENT: "no such file or folder", errno.EEXIST: "already exists"}


def system_error_line(e: OSError) -> str:
    """One line for an OSError: what the system refused, and where."""
    what = SYSTEM_ERRORS.get(e.errno, e.strerror or type(e).__name__)
    where = os.fsdecode(e.filename) if e.filename is not None else ""
    return f"error: {what} at {where}" if where else f"error: {what} ({e})"


def guarded(main):
    """A command's main, run with an allocator that keeps freed memory (``multitask.allocator``), and with bad input
    (``errors.BadInput``) and a refused file operation (``OSError``: permission, disk full, ...) each turned into
    one line and its exit code instead of a traceback; the commands write atomically, so what was there before is
    intact."""
    from multitask.allocator import keep_freed_memory, restart_with_tcmalloc
    from multitask.errors import BadInput

    @functools.wraps(main)
    def run(argv=None) -> int:
        if main.__globals__ is vars(sys.modules["__main__"]):  # `python -m`: the process's own command, not
            restart_with_tcmalloc()  # a call from Python code, a test, or the `multitask` command (restarted there)
        keep_freed_memory()
        try:
            return main(argv)
        except BadInput as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except OSError as e:
            print(system_error_line(e), file=sys.stderr)
            return EXIT_SYSTEM
    return run


def parse_folds(text: str) -> List[int]:
    """--folds 0,2: fold numbers, for argparse."""
    import argparse

    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected fold numbers, e.g. 0,2") from None


def whole_number(low: int):
    """An argparse type: a whole number of at least ``low``."""
    def parse(text: str) -> int:
        import argparse

        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: a whole number of at least {low}")
        return value
    return parse


positive, non_negative = whole_number(1), whole_number(0)


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: a number above 0")
    return value


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("multitask")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def overview() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: multitask COMMAND [ARGS ...]", "", "Multi-task face attributes (mask, gender, age) with "
             "Grad-CAM inspection.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`multitask COMMAND --help` describes a command's arguments.", "", EXIT_CODES]
    return "\n".join(lines)


def dashboard_script() -> Path:
    """apps/dashboard.py in a source tree; multitask/apps/dashboard.py in an installed wheel."""
    source = Path(__file__).resolve().parent.parent / "apps" / "dashboard.py"
    return source if source.is_file() else Path(__file__).resolve().parent / "apps" / "dashboard.py"


def dashboard(argv: List[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="multitask dashboard", description="The Streamlit inspection dashboard.")
    p.add_argument("--runs", type=Path, default=Path(os.environ.get("MULTITASK_RUNS", "runs")),
                   help="the folder of run directories (default: runs, or MULTITASK_RUNS)")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine "
                   "only, since the pages show the runs' photos of faces; 0.0.0.0: every network interface)")
    a = p.parse_args(argv)
    if not a.runs.is_dir():
        print(f"error: --runs {a.runs}: no such folder (train a run first: multitask train)", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "streamlit", "run", str(dashboard_script()), "--server.address", a.host,
               "--server.port", str(a.port), "--server.headless", "true", "--server.maxUploadSize",
               str(MAX_UPLOAD_MB), "--browser.gatherUsageStats", "false"]
    print(f"dashboard of {a.runs.resolve()} at http://{a.host}:{a.port}"
          + (" (this machine only; --host 0.0.0.0 opens it to the network)" if a.host == "127.0.0.1" else ""))
    try:
        return subprocess.call(command, env={**os.environ, "MULTITASK_RUNS": str(a.runs.resolve())})
    except KeyboardInterrupt:
        return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv_given = argv
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"multitask {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; commands: {', '.join(COMMANDS)} (multitask --help)", file=sys.stderr)
        return 2
    module = COMMANDS[name][0]
    if argv_given is None and module is not None:  # the console command itself, about to compute
        from multitask.allocator import restart_with_tcmalloc

        restart_with_tcmalloc()
    saved = sys.argv
    sys.argv = [f"multitask {name}", *rest]
    try:
        if module is None:
            return dashboard(rest)
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    except SystemExit as e:
        if isinstance(e.code, str):  # sys.exit("message"): Python prints it and exits 1
            print(e.code, file=sys.stderr)
            return 1
        return e.code or 0
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())

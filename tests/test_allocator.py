"""Every command runs with an allocator that keeps the memory a step frees: tcmalloc where it is installed (the
command restarts itself with it preloaded), else glibc told to keep freed blocks; MULTITASK_MALLOC chooses."""
from __future__ import annotations

import subprocess
import sys

import pytest

from multitask import allocator

PROBE = ("from multitask import allocator; before = allocator.large_blocks_mapped(); "
         "print(before, allocator.keep_freed_memory(), allocator.large_blocks_mapped())")

# a command's main, run as a process's own command (as `python -m multitask.train` runs its main)
COMMAND = """
import os
from multitask import allocator
from multitask.cli import guarded

@guarded
def main(argv):
    print(os.getpid(), allocator.state, allocator.tcmalloc_loaded())
    return 0

raise SystemExit(main())
"""


def run_command(setting):
    proc = subprocess.Popen([sys.executable, "-c", COMMAND], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=allocator.environment(setting) if setting else {
                                k: v for k, v in allocator.environment("x").items() if k != "MULTITASK_MALLOC"})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    pid, rest = out.strip().split(" ", 1)
    assert int(pid) == proc.pid  # restarted in place: whoever started the command still holds its process
    return rest


@pytest.mark.parametrize("setting, expected", [("keep", "True kept False"),
                                               ("default", "True default (MULTITASK_MALLOC=default) True")])
def test_glibc_large_blocks_stop_being_mapped_once_kept(setting, expected):
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env=allocator.environment(setting))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


@pytest.mark.skipif(allocator.tcmalloc_library() is None, reason="tcmalloc is not installed (make test installs it)")
def test_a_command_restarts_itself_with_tcmalloc_by_default():
    assert run_command(None) == "tcmalloc True"
    assert run_command("tcmalloc") == "tcmalloc True"


@pytest.mark.parametrize("setting, expected", [
    ("keep", "kept False"),
    ("default", "default (MULTITASK_MALLOC=default) False"),
    ("fast", "default (MULTITASK_MALLOC=fast is not one of tcmalloc, keep, default) False")])
def test_other_settings_keep_glibc(setting, expected):
    assert run_command(setting) == expected


def test_a_command_run_from_python_code_never_restarts_the_process(tmp_path, monkeypatch, capsys):
    """Only a process's own command may be restarted: `multitask.cli.main([...])` inside a test or a notebook
    runs the command in this process."""
    from multitask import cli

    restarts = []
    monkeypatch.setattr(allocator, "restart_with_tcmalloc", lambda: restarts.append(1))
    assert cli.main(["report", str(tmp_path / "no-run")]) == 2
    assert restarts == [] and "no config.yaml" in capsys.readouterr().err

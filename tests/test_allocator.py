"""Every command keeps the memory a step frees (glibc), unless MULTITASK_MALLOC=default."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = ("from multitask import allocator; before = allocator.large_blocks_mapped(); "
         "print(before, allocator.keep_freed_memory(), allocator.large_blocks_mapped())")


@pytest.mark.parametrize("setting, expected", [(None, "True kept False"),
                                               ("default", "True default (MULTITASK_MALLOC=default) True")])
def test_large_blocks_stop_being_mapped_once_set(setting, expected):
    env = {k: v for k, v in os.environ.items() if k != "MULTITASK_MALLOC"}
    if setting:
        env["MULTITASK_MALLOC"] = setting
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected

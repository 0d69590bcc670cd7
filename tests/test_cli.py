"""One `multitask` command: every tool under one name, with the arguments and exit codes of its module."""
from __future__ import annotations

import subprocess
import sys

import pytest

from multitask.cli import COMMANDS, main


def test_the_overview_lists_every_command_and_the_exit_codes(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name} " in text
    assert "exit codes:" in text


def test_no_command_or_an_unknown_one_is_a_usage_error(capsys):
    assert main([]) == 2
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("name", [n for n, (module, _) in COMMANDS.items()])
def test_each_command_answers_help_with_its_own_arguments(name, capsys):
    assert main([name, "--help"]) == 0
    assert f"usage: multitask {name}" in capsys.readouterr().out


def test_a_command_returns_its_modules_exit_code(tmp_path, capsys):
    assert main(["train", "data.size=[4,4]", f"out_dir={tmp_path}"]) == 2
    assert "data.size=[4, 4]: two sizes of 8 to 4096 pixels" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["--help"], ["predict", "--help"], ["explain", "--help"], ["train", "--help"],
                                  ["export", "--help"], ["report", "--help"]])
def test_help_imports_neither_torch_nor_pandas(args):
    """What keeps --help instant (well under a second): the heavy libraries are imported after the arguments."""
    code = ("import sys; from multitask.cli import main\ntry: main(sys.argv[1:])\nexcept SystemExit: pass\n"
            "print('heavy:', sorted(m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage: multitask" in out.stdout and out.stdout.splitlines()[-1] == "heavy: []"


@pytest.mark.parametrize("args, address, said", [
    ([], "127.0.0.1", "(this machine only; --host 0.0.0.0 opens it to the network)"),
    (["--host", "0.0.0.0"], "0.0.0.0", "at http://0.0.0.0:8501"),
])
def test_the_dashboard_listens_on_this_machine_only_unless_told(args, address, said, tmp_path, capsys, monkeypatch):
    """Its pages show the runs' photos of faces: nobody else on the network sees them by default."""
    started = []
    monkeypatch.setattr(subprocess, "call", lambda command, env: started.append(command) or 0)
    assert main(["dashboard", "--runs", str(tmp_path), *args]) == 0
    command = started[0]
    assert command[command.index("--server.address") + 1] == address
    assert command[command.index("--server.maxUploadSize") + 1] == "10"
    assert said in capsys.readouterr().out

"""The lambda-search command: installed as a console script, one-line errors with exit code 2."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

import lambda_search
import lambda_search.cli
from lambda_search.cli import main

SCRIPT = Path(sys.executable).parent / "lambda-search"


def run(*args):
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_console_script_is_installed():
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"lambda-search {lambda_search.__version__}"


def test_models_lists_the_networks_with_their_sizes(capsys):
    assert main(["models", "--num-classes", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "shortcut", "classes", "parameters"]
    rows = {(r.split()[0], r.split()[1]): r.split()[3] for r in lines[1:]}
    assert rows[("resnet20", "B")] == "272,474" and rows[("resnet20", "A")] == "269,722"
    assert rows[("resnet18", "B")] == "11,181,642"
    assert {name for name, _ in rows} == set(lambda_search.MODEL_NAMES)


@pytest.mark.parametrize(
    "args, message",
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["models", "--num-classes", "0"], "must be an integer >= 1, got '0'"),
        (["models", "--num-classes", "ten"], "must be an integer >= 1, got 'ten'"),
        (["models", "--colour"], "unrecognized arguments: --colour"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and message in lines[0], err


@pytest.mark.slow
def test_console_script_bad_input_has_no_traceback():
    result = run("frobnicate")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()] and "Traceback" not in result.stderr


def test_no_command_lists_the_commands_and_exits_2(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == ["lambda-search: error: a command is required (listed above)"]
    for command in ("search", "resume", "worker", "bench", "studies", "status", "select", "plot", "export", "models"):
        assert f"    {command}" in out, out
    assert "holds no logic" not in out and "Exit codes" in out


def test_every_flag_has_help():
    parser = lambda_search.cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            assert action.help, (name, action.option_strings or action.dest)

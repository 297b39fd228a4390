"""The one command-line style (`grad_jax.cli.run_command`), in-process and fast: every command
answers --help, rejects unknown flags in one line, and can be called again in the same process."""

import pytest
from absl import flags

from grad_jax import benchmark, cli, convert, export, main, predict, serve
from grad_jax.errors import UsageError

COMMANDS = [main, predict, convert, export, serve, benchmark]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("grad_jax: error: "), err
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda m: m.__name__)
def test_help_and_unknown_flags(command, capsys):
    for _ in range(2):  # fresh flags per call: a second call in one process works alike
        assert command.main(["prog", "--help"]) == 0
        assert "flags:" in capsys.readouterr().out
        assert command.main(["prog", "--bogus=1"]) == 2
        assert "Unknown command line flag 'bogus'" in _one_error_line(capsys)


def test_convert_keeps_its_dashed_flags(capsys):
    assert convert.main(["convert", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--torch-checkpoint" in out and "--torch-backbone" in out
    assert convert.main(["convert", "--torch-backbone=x.pth", "--config=configs/tiny.py"]) == 2
    assert "--torch-backbone needs --out" in _one_error_line(capsys)
    assert convert.main(["convert", "--torch-backbone=x.pth"]) == 2
    assert "--config is required" in _one_error_line(capsys)


def test_config_override_errors_name_the_section_keys(tmp_path, capsys):
    argv = ["main", "--config=configs/tiny.py", f"--workdir={tmp_path}"]
    assert main.main([*argv, "--config.model.no_such_key=1"]) == 2
    line = _one_error_line(capsys)
    assert "no key 'model.no_such_key'" in line and "Valid keys in model:" in line
    assert "backbone" in line
    assert main.main([*argv, "--config.train.epochs=many"]) == 2
    assert "invalid literal" in _one_error_line(capsys)
    assert main.main(["main", "--config=configs/nope.py", f"--workdir={tmp_path}"]) == 2
    assert "shipped configs: configs/" in _one_error_line(capsys)
    assert main.main(["main", "--config=configs/tiny.py", "extra", f"--workdir={tmp_path}"]) == 2
    assert "unexpected arguments: extra" in _one_error_line(capsys)
    assert main.main(["main", "--config=configs/tiny.py"]) == 2
    assert "--workdir is required" in _one_error_line(capsys)


def test_overrides_reach_the_body_and_errors_map_to_exit_codes(capsys):
    seen = {}

    def define(values):
        flags.DEFINE_integer("n", 1, "A number.", flag_values=values)

    def body(values, args):
        seen["epochs"], seen["n"], seen["args"] = values.config.train.epochs, values.n, args
        if values.n == 0:
            raise UsageError("--n must not be 0")
        if values.n < 0:
            raise KeyboardInterrupt
        return 7

    argv = ["prog", "--config=configs/tiny.py", "--config.train.epochs=3", "--n=5", "a", "b"]
    assert cli.run_command(argv, "usage", define, body, "configs/tiny.py", True) == 7
    assert seen == {"epochs": 3, "n": 5, "args": ["a", "b"]}
    assert cli.run_command(["prog", "--n=0"], "usage", define, body, "configs/tiny.py") == 2
    assert _one_error_line(capsys) == "grad_jax: error: --n must not be 0"
    assert cli.run_command(["prog", "--n=-1"], "usage", define, body, "configs/tiny.py") == 130
    assert capsys.readouterr().err.strip() == "grad_jax: interrupted"

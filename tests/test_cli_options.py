"""The command line's conventions: --version, options before or after the command, help with
defaults and no empty entries, one name per flag, overrides checked like the config file,
and a missing extra named. Most run the real command in a subprocess."""

import argparse
import json
import subprocess
import sys

import pytest

import coverwatch as package
from coverwatch.cli import build_parser
from tests.conftest import coverwatch


def subcommand_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for the parser and every nested sub-command."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from subcommand_parsers(child, (*path, name))


def test_version_and_python_m():
    proc = coverwatch("--version", check=True)
    assert proc.stdout.strip() == f"coverwatch {package.__version__}" and package.__version__ != "0+unknown"


def test_every_option_and_command_has_help_and_defaults_are_shown():
    empty = []
    for path, parser in subcommand_parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                empty += [f"{' '.join(path)} {c.dest}" for c in action._choices_actions if not c.help]
            elif not action.help:
                empty.append(f"{' '.join(path)} {action.dest}")
    assert empty == []
    assert len(list(subcommand_parsers(build_parser()))) > 20
    help_text = coverwatch("data", "build", "--help", check=True).stdout
    assert "(default: 1200)" in help_text and "(default: 40.0)" in help_text
    assert "(default: None)" not in coverwatch("serve", "--help", check=True).stdout


def test_global_options_before_or_after_the_command(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[stream]\nhop = 3\n")
    for args in (["--config", bad, "index", "info", tmp_path], ["index", "info", tmp_path, "--config", bad]):
        proc = coverwatch(*args)
        assert proc.returncode == 2 and "stream.hop: unknown key" in proc.stderr, proc.stderr
    after = build_parser().parse_args(["--log-level", "ERROR", "serve", "--log-level", "DEBUG"])
    assert after.log_level == "DEBUG"
    before = build_parser().parse_args(["--log-level", "ERROR", "serve"])
    assert before.log_level == "ERROR" and before.config is None


def test_one_name_per_flag_with_the_old_spelling_kept():
    parse = build_parser().parse_args
    assert parse(["serve", "--stream", "a"]).stream == parse(["serve", "--stream-id", "a"]).stream == "a"
    assert parse(["publish", "--source", "mic", "--stream-id", "b"]).stream == "b"
    assert parse(["serve"]).fast is False and parse(["serve", "--fast"]).fast is True
    assert parse(["demo"]).fast is True and parse(["demo", "--realtime"]).fast is False
    assert parse(["index", "build", "--refs", "r", "--index", "o"]).out == "o"
    assert parse(["calibrate", "--index", "i", "--audio", "x"]).index == "i"
    with pytest.raises(SystemExit):
        parse(["serve", "--fast", "--realtime"])


def test_index_dir_from_the_option_or_the_config(index_dir, tmp_path):
    by_option = json.loads(coverwatch("index", "info", "--index", index_dir, check=True).stdout)
    config = tmp_path / "c.toml"
    config.write_text(f'[index]\npath = "{index_dir}"\n')
    by_config = json.loads(coverwatch("--config", config, "index", "info", check=True).stdout)
    assert by_option == by_config and by_option["songs"] == 3
    proc = coverwatch("index", "info")
    assert proc.returncode == 1 and "no index folder" in proc.stderr


@pytest.mark.parametrize("port, message", [("99999", "metrics.port: 99999 is out of range [0, 65535]"), ("-1", "metrics.port: -1 is out of range")])
def test_command_line_overrides_are_validated_like_the_config(port, message):
    proc = coverwatch("serve", "--source", "file:x.wav", "--metrics-port", port)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_missing_extra_is_named(tmp_path):
    """Training without torch: one line naming the `train` extra, no traceback."""
    program = (
        "import sys; sys.modules['torch'] = None; from coverwatch.cli import main; "
        f"sys.exit(main(['train', '--manifest', {str(tmp_path / 'm.csv')!r}, '--out', {str(tmp_path / 'run')!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "needs the 'train' extra" in proc.stderr and "pip install 'coverwatch[train]'" in proc.stderr and "Traceback" not in proc.stderr

"""The command line: the verbs users script against, and their help pages."""

import subprocess
import sys

import pytest

from repa.cli import VERBS, build_parser

EXPECTED_VERBS = {"data", "train", "sample", "eval", "curves", "flops", "probe", "tokenizer", "demo", "bench"}


def test_the_verbs_are_frozen():
    assert set(VERBS) == EXPECTED_VERBS


@pytest.mark.parametrize("verb", sorted(EXPECTED_VERBS))
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([verb, "--help"])
    assert exit_info.value.code == 0
    assert "usage: repa " + verb in capsys.readouterr().out


def test_help_does_not_import_torch():
    # `repa --help` must stay fast: verb modules import heavy libraries inside run().
    code = "import sys; from repa.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False"


def test_errors_are_one_line_messages(capsys):
    from repa.cli import main

    assert main(["train", "--align-depth", "0", "--data", "x"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("repa train: error: align depth 0 is out of range") and "Traceback" not in error

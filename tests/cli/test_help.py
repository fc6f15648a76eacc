"""Every `galaxy` subcommand shows examples in its --help, and every option says what it does."""

from __future__ import annotations

import argparse

import pytest

from galaxy.cli import build_parser, main
from galaxy.version import __version__


def _commands(parser: argparse.ArgumentParser, path=("galaxy",)):
    """(command path, parser) for the top-level parser and every subcommand, recursively."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(build_parser()))
SUBCOMMANDS = [(p, sub) for p, sub in COMMANDS if len(p) > 1]


def test_every_subcommand_is_found():
    names = {" ".join(p) for p, _ in SUBCOMMANDS}
    assert {"galaxy run", "galaxy plan", "galaxy bench", "galaxy chat", "galaxy serve", "galaxy worker",
            "galaxy keys init", "galaxy devices up", "galaxy devices check", "galaxy cache ls",
            "galaxy cache clear"} <= names


@pytest.mark.parametrize("path,parser", SUBCOMMANDS, ids=[" ".join(p[1:]) for p, _ in SUBCOMMANDS])
def test_subcommand_help_has_examples(path, parser):
    assert "examples:" in (parser.epilog or ""), f"{' '.join(path)} --help shows no examples"
    assert " ".join(path[:2]) in parser.epilog, f"{' '.join(path)}: the examples do not show the command"
    assert "examples:" in parser.format_help()  # kept as written (RawDescriptionHelpFormatter)


@pytest.mark.parametrize("path,parser", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_option_has_help_text(path, parser):
    missing = [a.option_strings[-1] if a.option_strings else a.dest for a in parser._actions
               if not isinstance(a, argparse._SubParsersAction) and a.help != argparse.SUPPRESS
               and not (a.help or "").strip()]
    assert not missing, f"{' '.join(path)}: no help text for {missing}"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:  # argparse's version action prints and exits, as `galaxy --version` does
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"galaxy {__version__}"

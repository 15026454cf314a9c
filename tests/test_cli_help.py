"""Every command-line flag says what it does: each argument of `vlmjax` (every subcommand), `python -m vlmjax.train`
`python -m vlmjax.data.shapes` and every study (`python -m experiments.NAME`) has a non-empty help text."""

import argparse
from unittest import mock

import pytest

from experiments import fusion_layers, neglect_zone, reliability_probes, report, update_geometry, visual_heads
from vlmjax import cli, train
from vlmjax.data import shapes

STUDIES = [neglect_zone, fusion_layers, visual_heads, update_geometry, reliability_probes, report]


class _Parsed(Exception):
    pass


def parser_of(main) -> argparse.ArgumentParser:
    """The parser `main` builds, taken at its parse_args call (nothing runs)."""
    def capture(parser, *args, **kwargs):
        raise _Parsed(parser)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        with pytest.raises(_Parsed) as parsed:
            main([])
    return parsed.value.args[0]


def arguments(parser: argparse.ArgumentParser):
    """(command, argument) for every argument of the parser and of its subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{parser.prog} {name}", a) for a in sub._actions)
        yield parser.prog, action


@pytest.mark.parametrize("main", [cli.main, train.main, shapes.main, *(m.main for m in STUDIES)],
                         ids=["vlmjax", "train", "shapes", *(m.__name__.split(".")[-1] for m in STUDIES)])
def test_every_flag_has_help(main):
    found = list(arguments(parser_of(main)))
    assert len(found) >= 4
    missing = [f"{command} {'/'.join(a.option_strings) or a.dest}" for command, a in found
               if not (a.help or "").strip() or a.help == argparse.SUPPRESS]
    assert missing == []


def test_vlmjax_has_every_subcommand():
    commands = {command for command, _ in arguments(parser_of(cli.main))}
    assert {"vlmjax convert", "vlmjax verify", "vlmjax eval", "vlmjax info"} <= commands

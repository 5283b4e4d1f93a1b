"""The README stays true: every `python SCRIPT.py ...` command in it parses with that script's flags.

Each command found in the README's code blocks and inline code is split like a shell would, and its
arguments are handed to the script's own `common.parse_config(Config, ...)`: an unknown flag, a
value outside `choices` or below `min` fails here, as it would for a reader who copies the line.
"""
import importlib
import re
import shlex
from pathlib import Path

import pytest

import common

README = Path(__file__).with_name("README.md").read_text()
SCRIPTS = sorted(p.stem for p in Path(__file__).parent.glob("*.py")
                 if not p.stem.startswith(("test_", "conftest")) and p.stem not in ("common", "diffusion")
                 and not p.stem.endswith("_figures"))                # a lesson's companion: run through its lesson


def readme_commands() -> list[tuple[str, list[str]]]:
    """(script, argv) for every line of the README that runs one of our scripts."""
    lines = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", README, flags=re.S):
        lines += block.splitlines()
    lines += re.findall(r"`((?:python|torchrun)[^`]*)`", README)
    found = []
    for line in lines:
        line = line.split("#")[0].strip()
        m = re.search(r"(?:^|\s)(\w+)\.py(\s.*)?$", line)
        if not m or m.group(1) not in SCRIPTS or not re.match(r"(python|torchrun)\b", line):
            continue
        argv = shlex.split(m.group(2) or "")
        found.append((m.group(1), [a for a in argv if a != "..."]))
    return found


COMMANDS = readme_commands()


def test_the_readme_names_every_script():
    assert {s for s, _ in COMMANDS} == set(SCRIPTS)


@pytest.mark.parametrize("script, argv", COMMANDS, ids=[f"{s} {' '.join(a)}" for s, a in COMMANDS])
def test_readme_command_parses(script, argv):
    module = importlib.import_module(script)
    try:
        common.parse_config(module.Config, argv)
    except SystemExit as e:
        if e.code not in (0, None):  # --help exits with 0
            pytest.fail(f"`python {script}.py {' '.join(argv)}` from the README: {e}")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default(script):
    """--help lists every flag's default (argparse would also crash here on a stray % in a help text)."""
    parser = common.make_parser(importlib.import_module(script).Config)
    parser.format_help()
    for action in parser._actions[1:]:                      # [0] is -h
        assert "default" in parser._get_formatter()._expand_help(action), action.dest

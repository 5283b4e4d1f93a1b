"""The README and the lesson pages stay true: every command in them parses with its script's flags.

Each `python LESSON.py ...`, `python -m tools.TOOL ...` or `torchrun ... LESSON.py ...` line found in
the code blocks and inline code of README.md and docs/*.md is split like a shell would, and its
arguments are handed to the script's own `common.parse_config(Config, ...)`: an unknown flag, a value
outside `choices` or below `min` fails here, as it would for a reader who copies the line.
"""
import importlib
import re
import shlex
from pathlib import Path

import pytest

import common

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LESSONS = sorted(p.stem for p in ROOT.glob("*.py")
                 if not p.stem.startswith(("test_", "conftest")) and p.stem not in ("common", "checkpoints", "plots", "diffusion"))
TOOLS = sorted(f"tools.{p.stem}" for p in (ROOT / "tools").glob("*.py")        # the runnable ones: with a main
               if "\ndef main(" in p.read_text())


def commands(page: Path) -> list[tuple[str, list[str]]]:
    """(module, argv) for every line of `page` that runs one of our scripts."""
    text = page.read_text()
    lines = [line for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S) for line in block.splitlines()]
    lines += re.findall(r"`((?:python|torchrun)[^`]*)`", text)
    found = []
    for line in lines:
        line = line.split("#")[0].strip()
        if not re.match(r"(python|torchrun)\b", line):
            continue
        m = re.search(r"(?:^|\s)-m (tools\.\w+)(\s.*)?$", line) or re.search(r"(?:^|\s)(\w+)\.py(\s.*)?$", line)
        if m and m.group(1) in LESSONS + TOOLS:
            found.append((m.group(1), [a for a in shlex.split(m.group(2) or "") if a != "..."]))
    return found


COMMANDS = [(page.relative_to(ROOT).as_posix(), *c) for page in PAGES for c in commands(page)]


def test_every_script_is_run_somewhere():
    """Each lesson is named in the README; each tool on the README or a page."""
    assert {s for p, s, _ in COMMANDS if p == "README.md"} >= set(LESSONS)
    assert {s for _, s, _ in COMMANDS} >= set(TOOLS)


@pytest.mark.parametrize("page, script, argv", COMMANDS, ids=[f"{p} {s} {' '.join(a)}" for p, s, a in COMMANDS])
def test_command_parses(page, script, argv):
    module = importlib.import_module(script)
    assert hasattr(module, "Config"), f"{page} runs {script}, which has no Config (no flags)"
    try:
        common.parse_config(module.Config, argv)
    except SystemExit as e:
        if e.code not in (0, None):  # --help exits with 0
            pytest.fail(f"`{script} {' '.join(argv)}` from {page}: {e}")


@pytest.mark.parametrize("script", LESSONS + TOOLS)
def test_help_shows_every_default(script):
    """--help lists every flag's default (argparse would also crash here on a stray % in a help text)."""
    parser = common.make_parser(importlib.import_module(script).Config)
    parser.format_help()
    for action in parser._actions[1:]:                      # [0] is -h
        assert "default" in parser._get_formatter()._expand_help(action), action.dest

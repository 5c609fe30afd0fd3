"""The programs' --help as argparse prints it: the options and commands it lists."""

from __future__ import annotations

import os
import re
import subprocess
import sys

MODULES = {"vfiocapsctl": "vfiocaps.ctl", "vfiocapsd": "vfiocaps.daemon"}
_OPTION_LINE = re.compile(r"^ {2,}(-[^ ].*?)(?: {2,}.*)?$")


def help_text(program: str, *args: str) -> str:
    """``program [args] --help``."""
    result = subprocess.run(
        [sys.executable, "-m", MODULES[program], *args, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "COLUMNS": "100"},
    )
    return result.stdout


def options_in(help_output: str) -> set[str]:
    """Every option an argparse --help lists (``-v, --verbose`` gives both)."""
    found = set()
    for line in help_output.splitlines():
        match = _OPTION_LINE.match(line)
        if match:
            for variant in match.group(1).split(", "):
                found.add(variant.split(" ")[0].split("=")[0])
    return found


def help_options(program: str, *args: str) -> set[str]:
    """The options ``program [args] --help`` lists."""
    return options_in(help_text(program, *args))


def commands_of(help_output: str) -> list[str]:
    """The commands an argparse --help lists under its COMMAND positional."""
    section = help_output.split("COMMAND\n", 2)[-1].split("\n\n")[0]
    return [line.split()[0] for line in section.splitlines() if re.match(r"^ {4}\w", line)]

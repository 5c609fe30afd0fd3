"""The command-line parser of both programs: a bad command line is one line on stderr."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

# argparse's own status for a bad command line, kept by both programs.
EXIT_USAGE = 2


def one_line(text: str) -> str:
    """*text* with every character that is not printable (a newline, a control character, an
    undecodable byte kept as a surrogate) written as its escape, so that it stays on one line
    and moves no cursor. Raises nothing."""
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


class Parser(argparse.ArgumentParser):
    """argparse, whose errors carry the program's prefix, the command and where help is."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        program, _, command = self.prog.partition(" ")
        where = f"{command}: " if command else ""
        self.exit(EXIT_USAGE, f"{program}: {where}{one_line(message)} (see '{self.prog} --help')\n")

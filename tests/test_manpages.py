"""The manual pages: rendered by man without a warning, and every option of --help documented."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from support.cli_help import commands_of, help_text, options_in
from support.harness import REPO
from vfiocaps import nfdlabels
from vfiocaps.ctl.commands import TYPE_COLUMNS

PAGES = {"vfiocapsctl": REPO / "man" / "vfiocapsctl.1", "vfiocapsd": REPO / "man" / "vfiocapsd.8"}


def documented(option: str, source: str) -> bool:
    """Whether *option* heads a paragraph of the page (a macro line such as ``.TP`` tags)."""
    return re.search(rf"(?m)^\.\w+ .*(?<![\w-]){re.escape(option)}(?![\w-])", source) is not None


def page_source(program: str) -> str:
    """The page's text with roff escapes undone, enough to find options and commands in it."""
    text = PAGES[program].read_text()
    return re.sub(r"\\f[BIRP]", "", text).replace("\\-", "-").replace("\\&", "")


@pytest.mark.parametrize("program", sorted(PAGES))
def test_man_renders_the_page_without_a_warning(program: str) -> None:
    result = subprocess.run(
        ["groff", "-man", "-ww", "-z", "-Tutf8", str(PAGES[program])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    assert result.stderr == ""
    shown = subprocess.run(
        ["man", "-l", str(PAGES[program])],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "MANWIDTH": "80", "MANPAGER": "cat", "LC_ALL": "C.UTF-8"},
    )
    assert "SYNOPSIS" in shown.stdout
    assert "OPTIONS" in shown.stdout


def test_every_vfiocapsd_option_is_documented() -> None:
    options = options_in(help_text("vfiocapsd"))
    assert {"--nfd-labels", "--probe-timeout", "-v", "--verbose", "--version"} <= options
    source = page_source("vfiocapsd")
    missing = sorted(option for option in options if not documented(option, source))
    assert missing == []


def test_every_vfiocapsctl_command_and_option_is_documented() -> None:
    top = help_text("vfiocapsctl")
    commands = commands_of(top)
    assert {"show", "xml", "probe", "monitor"} <= set(commands)
    source = page_source("vfiocapsctl")
    options = options_in(top)
    missing_commands = [c for c in commands if not re.search(rf"(?m)^\.BI? {c}\b", source)]
    assert missing_commands == []
    for command in commands:
        options |= options_in(help_text("vfiocapsctl", command))
    assert {"--viewer", "--sysfs-root", "--timeout", "--json"} <= options
    missing = sorted(option for option in options if not documented(option, source))
    assert missing == []


def test_every_nfd_label_is_documented() -> None:
    source = page_source("vfiocapsd")
    missing = [suffix for suffix in nfdlabels.SUFFIXES if f".{suffix}" not in source]
    assert missing == []


def test_types_is_documented_with_its_kinds_and_columns() -> None:
    source = page_source("vfiocapsctl")
    paragraph = source.split("\n.B types\n", 1)[1].split("\n.TP\n", 1)[0]
    for kind in ("mdev", "vf-profile", "pci"):
        assert f".B {kind}\n" in paragraph, kind
    for column in TYPE_COLUMNS:
        assert column.header in paragraph, column.header
    rendered = subprocess.run(
        ["man", "-l", str(PAGES["vfiocapsctl"])], capture_output=True, text=True, timeout=60,
        check=True, env={**os.environ, "MANWIDTH": "100", "MANPAGER": "cat", "LC_ALL": "C.UTF-8"},
    ).stdout  # fmt: skip
    assert "vf-profile" in rendered.replace("\u2010", "-")


def test_where_the_state_lives_without_systemd_is_documented() -> None:
    daemon = page_source("vfiocapsd")
    assert "$XDG_RUNTIME_DIR/vfiocaps" in daemon
    assert "XDG_CACHE_HOME" in daemon
    ctl = page_source("vfiocapsctl")
    assert "$XDG_RUNTIME_DIR/vfiocaps-quickstart" in ctl
    assert "--no-ask-password" in ctl

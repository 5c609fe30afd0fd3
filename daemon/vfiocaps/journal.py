"""Logging set-up: stderr lines that journald understands (priority prefixes under systemd)."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

# syslog priorities as defined by sd-daemon(3)
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def _priority(levelno: int) -> int:
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class JournalFormatter(logging.Formatter):
    """Prefix each line with ``<N>`` so journald records the right priority."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.splitlines() or [""])


def under_journald(environ: dict[str, str] | None = None, stream: TextIO | None = None) -> bool:
    """Tell whether *stream* (default stderr) is connected to the journal (``$JOURNAL_STREAM``)."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    if not value or ":" not in value:
        return False
    out = sys.stderr if stream is None else stream
    try:
        st = os.fstat(out.fileno())
    except (OSError, ValueError):
        return False
    dev, _, ino = value.partition(":")
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


def setup_logging(level: int = logging.INFO, *, journald: bool | None = None) -> None:
    """Route the ``vfiocaps`` loggers to stderr, journald-style when stderr is the journal."""
    handler = logging.StreamHandler(sys.stderr)
    if under_journald() if journald is None else journald:
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosqlite logs every statement at debug level: never useful in the daemon's log
    logging.getLogger("aiosqlite").setLevel(max(level, logging.INFO))

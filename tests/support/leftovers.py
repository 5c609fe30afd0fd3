"""What a run left behind: the files under a directory of its own and the processes naming it."""

from __future__ import annotations

import os
from pathlib import Path


def files_under(directory: Path) -> list[str]:
    """Every entry below *directory* (relative paths, sorted); empty when it is empty or gone."""
    if not directory.exists():
        return []
    found = []
    for parent, dirs, files in os.walk(directory):
        for name in dirs + files:
            found.append(os.path.relpath(os.path.join(parent, name), directory))
    return sorted(found)


def processes_naming(directory: Path) -> dict[int, str]:
    """Live processes (not this one) whose command line, working directory or environment
    names *directory*: pid and command line. Everything a run starts is given its paths by
    argument or environment, so this finds what it left running."""
    needle = os.fsencode(str(directory))
    found: dict[int, str] = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        pid = int(name)
        if pid == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[-1].split()[0] == "Z":
                continue  # already dead, waiting for its parent to collect it
            environment = Path(f"/proc/{pid}/environ").read_bytes()
            cwd = os.fsencode(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:  # gone meanwhile, or a kernel thread
            continue
        if needle in argv or needle in environment or cwd.startswith(needle):
            found[pid] = argv.replace(b"\0", b" ").decode(errors="replace").strip()
    return found

"""DRM render nodes under a dev root (``dri/renderD128`` ...): the host's OpenGL for QEMU."""

from __future__ import annotations

from pathlib import Path


def render_nodes(dev_root: Path) -> tuple[Path, ...]:
    """The DRM render nodes under *dev_root*, in the kernel's order (``renderD128`` first).

    Raises nothing: a missing or unreadable ``dri`` directory means none.
    """
    try:
        entries = [entry for entry in (dev_root / "dri").iterdir() if _is_render(entry.name)]
    except OSError:
        return ()
    return tuple(sorted(entries, key=lambda entry: int(entry.name.removeprefix("renderD"))))


def _is_render(name: str) -> bool:
    number = name.removeprefix("renderD")
    return number != name and number.isdigit()

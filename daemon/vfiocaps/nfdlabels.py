"""The node's answers as node-feature-discovery labels: a feature file in NFD's local source.

NFD's ``local`` source reads every file in its ``features.d`` directory, skips files whose names
start with a dot, ignores a file larger than 64 KiB (65536 bytes), and turns each line
``<namespace>/<name>[=<value>]`` into a node label (``#`` starts a comment). A label name is a
Kubernetes qualified name (a DNS subdomain prefix, ``/``, a name of at most 63 characters of
``[A-Za-z0-9._-]`` that starts and ends alphanumeric); a value has at most 63 such characters.
NFD refuses namespaces under ``kubernetes.io`` except ``feature.node.kubernetes.io`` and its
subdomains, so the labels here live in ``vfiocaps.feature.node.kubernetes.io``, which every NFD
accepts without configuration.

Per probed type present on the node (``<type>`` is the type id, or a readable form with a hash
where the id is not a valid label name)::

    vfiocaps.feature.node.kubernetes.io/<type>.display=none|region|dmabuf|unknown
    vfiocaps.feature.node.kubernetes.io/<type>.gl-required=true|false
    vfiocaps.feature.node.kubernetes.io/<type>.gl-host=set-up|crashed|failed|no-render-node|
        inaccessible|unknown  (when GL is required: whether this node gave it, see GlHost)
    vfiocaps.feature.node.kubernetes.io/<type>.migration=supported|unsupported|unknown
    vfiocaps.feature.node.kubernetes.io/<type>.migration-with-options=...  (when options exist)
    vfiocaps.feature.node.kubernetes.io/<type>.migration-fingerprint=<12 hex> (when known)

A type offered by several parents whose answers differ gets the value ``mixed``. On an emulated
host (``vfiocapsd --emulated``) the file also says ``vfiocaps.feature.node.kubernetes.io/emulated``
(value ``true``), so that no scheduler takes a demonstration for hardware.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .capabilities import Capabilities
from .engine import DeviceView, EngineStatus, TypeView

log = logging.getLogger(__name__)

# Where NFD's local source looks by default (nfd-worker's --features-dir / local source).
DEFAULT_FEATURES_DIR = Path("/etc/kubernetes/node-feature-discovery/features.d")
LABEL_PREFIX = "vfiocaps.feature.node.kubernetes.io"
FILE_NAME = "vfiocaps"
# NFD ignores a feature file larger than this (source/local: MaxFeatureFileSize).
MAX_FILE_BYTES = 65536
MAX_NAME = 63
MIXED = "mixed"
# How long after a change the file is brought up to date: a burst of events writes once.
SETTLE_SECONDS = 0.5

_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_NOT_IN_NAME = re.compile(r"[^-A-Za-z0-9_.]")
# The longest attribute suffix bounds the type token so that every name fits in 63 characters.
SUFFIXES = ("display", "gl-required", "gl-host", "migration", "migration-with-options")
_FINGERPRINT = "migration-fingerprint"
_TOKEN_MAX = MAX_NAME - 1 - max(len(s) for s in (*SUFFIXES, _FINGERPRINT))

# The migration fingerprint of a type: the canonical text of what must match between hosts for
# a saved device state to load, or "" while none is known. The fingerprint itself is built by
# the migration checks; until they provide it, the label writer is given no function and
# publishes no fingerprint label.
FingerprintOf = Callable[[TypeView], str]


def type_token(type_id: str) -> str:
    """The part of a label name that names *type_id*: the id itself when it is a valid, short
    enough name, else a readable form plus a hash of the id (never two types on one token)."""
    if _NAME_RE.match(type_id) and len(type_id) <= _TOKEN_MAX:
        return type_id
    digest = hashlib.sha256(type_id.encode()).hexdigest()[:8]
    readable = _NOT_IN_NAME.sub("-", type_id)[: _TOKEN_MAX - 9].strip("-_.")
    return f"{readable}-{digest}" if readable else f"type-{digest}"


def fingerprint_label(fingerprint: str) -> str:
    """The short hash of a migration fingerprint that a label carries."""
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:12]


def _answers(caps: Capabilities, fingerprint: str) -> dict[str, str]:
    values = {
        "display": caps.display.value,
        "gl-required": "true" if caps.gl_required else "false",
        "migration": caps.migration.value,
    }
    if caps.gl_required:
        values["gl-host"] = caps.gl_host.value
    if caps.migration_options:
        values["migration-with-options"] = caps.migration_with_options.value
    if fingerprint:
        values[_FINGERPRINT] = fingerprint_label(fingerprint)
    return values


EMULATED_LABEL = f"{LABEL_PREFIX}/emulated"


def labels_of(
    types: list[TypeView], fingerprint_of: FingerprintOf | None = None, emulated: bool = False
) -> dict[str, str]:
    """The labels of every probed type in *types*, by full label name."""
    per_token: dict[str, dict[str, set[str]]] = {}
    for view in types:
        if view.capabilities is None:
            continue
        fingerprint = fingerprint_of(view) if fingerprint_of else ""
        answers = per_token.setdefault(type_token(view.type_id), {})
        for key, value in _answers(view.capabilities, fingerprint).items():
            answers.setdefault(key, set()).add(value)
    labels = {EMULATED_LABEL: "true"} if emulated else {}
    labels.update(
        (f"{LABEL_PREFIX}/{token}.{key}", values.pop() if len(values) == 1 else MIXED)
        for token, answers in sorted(per_token.items())
        for key, values in sorted(answers.items())
    )
    return labels


def render(labels: dict[str, str]) -> tuple[str, int]:
    """The feature file for *labels* within NFD's size limit, and how many types were left out.

    Types are kept whole, in name order, as long as the file stays within the limit.
    """
    header = (
        "# Written by vfiocapsd: the VFIO capabilities of this node's device types.\n"
        "# Rewritten whenever an answer changes; edits are lost.\n"
    )
    groups: dict[str, list[str]] = {}
    for name, value in labels.items():
        groups.setdefault(name.rsplit(".", 1)[0], []).append(f"{name}={value}\n")
    text, left_out = header, 0
    for lines in groups.values():
        block = "".join(lines)
        if len((text + block).encode()) > MAX_FILE_BYTES:
            left_out += 1
            continue
        text += block
    return text, left_out


@dataclass(frozen=True)
class FeatureFile:
    """The feature file's place: a directory NFD reads and the file's name in it."""

    directory: Path
    name: str = FILE_NAME

    @property
    def path(self) -> Path:
        return self.directory / self.name

    def read(self) -> str | None:
        """The file's current text, or None when it is missing or unreadable."""
        try:
            return self.path.read_text()
        except (OSError, UnicodeDecodeError):
            return None

    def write(self, text: str) -> None:
        """Replace the file with *text* at once: written to a dot-file NFD skips, then renamed.

        The directory is opened once and used by descriptor; the dot-file is created anew
        (never opened through a link someone left there) and world-readable, since labels are
        public.

        Raises:
            OSError: the directory cannot be created or written.
        """
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        temporary = "." + self.name
        directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary, dir_fd=directory)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(temporary, flags, 0o644, dir_fd=directory)
            try:
                os.fchmod(fd, 0o644)
                data = text.encode()
                while data:
                    data = data[os.write(fd, data) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.name, src_dir_fd=directory, dst_dir_fd=directory)
            os.fsync(directory)
        finally:
            os.close(directory)

    def remove(self) -> None:
        """Remove the file (NFD then drops the labels). Raises nothing."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError as err:
            log.warning("cannot remove %s: %s", self.path, err)


class NfdLabelWriter:
    """An engine listener that keeps the feature file equal to the node's answers.

    Every change schedules one update a moment later; the update reads the types, renders the
    file and writes it only when its text differs from what is on disk.
    """

    def __init__(
        self,
        feature_file: FeatureFile,
        types: Callable[[], list[TypeView]],
        fingerprint_of: FingerprintOf | None = None,
        settle: float = SETTLE_SECONDS,
        emulated: bool = False,
    ) -> None:
        self._file = feature_file
        self._types = types
        self._fingerprint_of = fingerprint_of
        self._emulated = emulated
        self._settle = settle
        self._task: asyncio.Task[None] | None = None
        self._dirty = False
        self._written: str | None = None
        self._problem = ""

    def changed(self) -> None:
        """Something may have changed: update the file a moment from now (one task at most)."""
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._update_soon())

    async def _update_soon(self) -> None:
        # A change that arrives during an update makes one more round.
        while self._dirty:
            await asyncio.sleep(self._settle)
            self._dirty = False
            await self.update()

    async def update(self) -> None:
        """Bring the file up to date now. Raises nothing: a failure is logged and retried at
        the next change."""
        text, left_out = render(labels_of(self._types(), self._fingerprint_of, self._emulated))
        if self._written is None:
            self._written = await asyncio.to_thread(self._file.read)
        if text == self._written:
            return
        if left_out:
            log.warning(
                "%d device types left out of %s: NFD reads at most %d bytes",
                left_out,
                self._file.path,
                MAX_FILE_BYTES,
            )
        try:
            await asyncio.to_thread(self._file.write, text)
        except OSError as err:
            # Said once per distinct failure, not at every change of a host in an event storm.
            problem = f"cannot write the NFD feature file {self._file.path}: {err}"
            log.log(logging.DEBUG if problem == self._problem else logging.WARNING, "%s", problem)
            self._problem = problem
            self._written = None
            return
        self._problem = ""
        self._written = text
        log.info("NFD labels written to %s", self._file.path)

    async def close(self) -> None:
        """Stop a pending update (the file stays: the labels remain true)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # ---- engine listener ------------------------------------------------------------------

    def device_added(self, view: DeviceView) -> None:
        self.changed()

    def device_changed(self, view: DeviceView) -> None:
        self.changed()

    def device_removed(self, device_id: str) -> None:
        self.changed()

    def cache_invalidated(self, driver: str, old: str, new: str, records: int) -> None:
        self.changed()

    def status_changed(self, status: EngineStatus) -> None:
        self.changed()

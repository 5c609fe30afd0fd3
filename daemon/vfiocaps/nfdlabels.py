"""The node's answers as node-feature-discovery labels: a feature file in NFD's local source.

NFD's ``local`` source reads every file in its ``features.d`` directory, skips files whose names
start with a dot, ignores a file larger than 64 KiB (65536 bytes), and turns each line
``<namespace>/<name>[=<value>]`` into a node label (``#`` starts a comment). A label name is a
Kubernetes qualified name (a DNS subdomain prefix, ``/``, a name of at most 63 characters of
``[A-Za-z0-9._-]`` that starts and ends alphanumeric); a value has at most 63 such characters.
NFD refuses namespaces under ``kubernetes.io`` except ``feature.node.kubernetes.io`` and its
subdomains, so the labels here live in ``vfiocaps.feature.node.kubernetes.io``, which every NFD
accepts without configuration.

Per probed type present on the node (``<type>`` is the type id, for a vGPU profile its name,
since profile ids mean different profiles on different card models, e.g. ``NVIDIA-H100-40C``;
a readable form with a hash where that is not a valid label name)::

    vfiocaps.feature.node.kubernetes.io/<type>.display=none|region|dmabuf|unknown
    vfiocaps.feature.node.kubernetes.io/<type>.gl-required=true|false
    vfiocaps.feature.node.kubernetes.io/<type>.gl-host=set-up|crashed|failed|no-render-node|
        inaccessible|unknown  (when GL is required: whether this node gave it, see GlHost)
    vfiocaps.feature.node.kubernetes.io/<type>.migration=supported|unsupported|unknown
    vfiocaps.feature.node.kubernetes.io/<type>.migration-with-options=supported|unsupported|
        unknown  (always: with the device options migration needs; with QEMU's defaults, when
        none are needed, it equals .migration, so one selector on it matches every type that
        migrates either way)
    vfiocaps.feature.node.kubernetes.io/<type>.migration-fingerprint=<12 hex> (when known)

A type offered by several parents whose answers differ gets the value ``mixed``. On an emulated
host (``vfiocapsd --emulated``) the file also says ``vfiocaps.feature.node.kubernetes.io/emulated``
(value ``true``), so that no scheduler takes a demonstration for hardware.

The file starts with NFD's directive ``# +expiry-time=<RFC 3339>``: :data:`EXPIRY_SECONDS` after
it was written. The daemon rewrites it every :data:`REFRESH_SECONDS` while it runs (a margin of
:data:`EXPIRY_SECONDS` - :data:`REFRESH_SECONDS` for a slow or stalled write), so the labels of a
daemon that died, or of a node it no longer runs on, expire by themselves. A clean stop removes
the file; so does a start with ``--nfd-labels`` turned off (or pointed elsewhere): the directory
last written is remembered in the cache directory (:class:`LabelsRecord`). The file and its
directory are handled by :mod:`vfiocaps.nfdfile`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from .capabilities import Capabilities, Migration
from .engine import DeviceView, EngineStatus, TypeView
from .errors import UnsafeDirectoryError
from .model import TypeKind
from .nfdfile import MAX_FILE_BYTES, FeatureFile
from .statefile import replace_file

log = logging.getLogger(__name__)

# Where NFD's local source looks by default (nfd-worker's --features-dir / local source).
DEFAULT_FEATURES_DIR = Path("/etc/kubernetes/node-feature-discovery/features.d")
LABEL_PREFIX = "vfiocaps.feature.node.kubernetes.io"
MAX_NAME = 63
# NFD drops the labels this long after the file was written, unless it is written again.
EXPIRY_SECONDS = 3600.0
# How often the running daemon writes the file again (with a new expiry time).
REFRESH_SECONDS = 1200.0
EXPIRY_DIRECTIVE = "# +expiry-time="
HEADER = "# Written by vfiocapsd: the VFIO capabilities of this node's device types.\n"
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


def view_token(view: TypeView) -> str:
    """The label token of a type: a vGPU profile's name (spaces as ``-``), any other type's id."""
    if view.kind is TypeKind.VF_PROFILE and view.name:
        return type_token(view.name.replace(" ", "-"))
    return type_token(view.type_id)


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
    # With QEMU's defaults (no options needed) the verdict with options is the verdict; a type
    # that migrates with the defaults migrates with options too.
    if caps.migration_options and caps.migration is not Migration.SUPPORTED:
        values["migration-with-options"] = caps.migration_with_options.value
    else:
        values["migration-with-options"] = caps.migration.value
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
        answer = view.answer
        if answer is None:
            continue
        fingerprint = fingerprint_of(view) if fingerprint_of else ""
        answers = per_token.setdefault(view_token(view), {})
        for key, value in _answers(answer.capabilities, fingerprint).items():
            answers.setdefault(key, set()).add(value)
    labels = {EMULATED_LABEL: "true"} if emulated else {}
    labels.update(
        (f"{LABEL_PREFIX}/{token}.{key}", values.pop() if len(values) == 1 else MIXED)
        for token, answers in sorted(per_token.items())
        for key, values in sorted(answers.items())
    )
    return labels


def expiry_line(expires: float) -> str:
    """NFD's expiry directive for the unix time *expires* (RFC 3339, UTC, whole seconds)."""
    moment = datetime.fromtimestamp(int(expires), UTC)
    return f"{EXPIRY_DIRECTIVE}{moment.strftime('%Y-%m-%dT%H:%M:%SZ')}\n"


def render(labels: dict[str, str], expires: float | None = None) -> tuple[str, int]:
    """The feature file for *labels* within NFD's size limit, and how many types were left out;
    with *expires* (unix time), the expiry directive first.

    Types are kept whole, in name order, as long as the file stays within the limit.
    """
    header = (
        (expiry_line(expires) if expires is not None else "")
        + HEADER
        + "# Rewritten whenever an answer changes, and while vfiocapsd runs; edits are lost.\n"
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


def _body(text: str | None) -> str | None:
    """*text* without its expiry directive: what says the labels."""
    if text is None or not text.startswith(EXPIRY_DIRECTIVE):
        return text
    return text.partition("\n")[2]


def written_by_us(text: str | None) -> bool:
    """Whether a feature file's *text* is one vfiocapsd wrote (its header)."""
    return text is not None and (_body(text) or "").startswith(HEADER)


class LabelsRecord:
    """Where this daemon last published labels (a file in its cache directory), so that a
    start with ``--nfd-labels`` off or elsewhere removes the file it left."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def directory(self) -> Path | None:
        """The directory recorded, or None. Raises nothing."""
        try:
            with self.path.open("rb") as stream:
                text = stream.read(4097).decode()
        except (OSError, UnicodeDecodeError):
            return None
        candidate = Path(text.strip())
        return candidate if text.strip() and candidate.is_absolute() else None

    def remember(self, directory: Path) -> None:
        """Record *directory*. Raises nothing (a failure only costs a later clean-up)."""
        if self.directory() == directory:
            return
        try:
            replace_file(self.path, f"{directory}\n")
        except OSError as err:
            log.warning("cannot record the NFD features directory in %s: %s", self.path, err)

    def forget(self) -> None:
        """Drop the record. Raises nothing."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError as err:
            log.warning("cannot remove %s: %s", self.path, err)


def remove_stale_labels(record: LabelsRecord, current: Path | None) -> None:
    """Remove the feature file a daemon published in the recorded directory when labels are now
    off (*current* None) or go elsewhere; only a file vfiocapsd wrote. Raises nothing."""
    previous = record.directory()
    if previous is None or previous == current:
        return
    stale = FeatureFile(previous)
    try:
        if written_by_us(stale.read()):
            stale.remove()
            log.info(
                "removed the NFD labels left in %s (--nfd-labels is off or elsewhere)", previous
            )
    except (OSError, UnsafeDirectoryError) as err:
        log.warning("cannot remove the NFD labels left in %s: %s", previous, err)
        return
    record.forget()


class NfdLabelWriter:
    """An engine listener that keeps the feature file equal to the node's answers.

    Every change schedules one update a moment later; the update reads the types, renders the
    file and writes it when its labels differ from what is on disk or its expiry time is due
    for a refresh (:meth:`run_refresh` wakes it every *refresh* seconds). :meth:`close`
    removes the file.
    """

    def __init__(
        self,
        feature_file: FeatureFile,
        types: Callable[[], list[TypeView]],
        fingerprint_of: FingerprintOf | None = None,
        settle: float = SETTLE_SECONDS,
        emulated: bool = False,
        *,
        expiry: float = EXPIRY_SECONDS,
        refresh: float = REFRESH_SECONDS,
        record: LabelsRecord | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._file = feature_file
        self._types = types
        self._fingerprint_of = fingerprint_of
        self._emulated = emulated
        self._settle = settle
        self._expiry = expiry
        self._refresh = min(refresh, expiry)
        self._record = record
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._dirty = False
        self._written: str | None = None
        self._written_at: float | None = None
        self._problem = ""

    def changed(self) -> None:
        """Something may have changed: update the file a moment from now (one task at most)."""
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._update_soon())

    def start(self) -> None:
        """Publish now and keep the expiry time fresh while the daemon runs."""
        if self._record is not None:
            remove_stale_labels(self._record, self._file.directory)
        self.changed()
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self.run_refresh())

    async def run_refresh(self) -> None:
        """Write the file again every *refresh* seconds (its expiry moves on)."""
        while True:
            await asyncio.sleep(self._refresh)
            self.changed()

    async def _update_soon(self) -> None:
        # A change that arrives during an update makes one more round.
        while self._dirty:
            await asyncio.sleep(self._settle)
            self._dirty = False
            await self.update()

    def _due(self, now: float) -> bool:
        return self._written_at is None or now - self._written_at >= self._refresh * 0.9

    async def update(self) -> None:
        """Bring the file up to date now. Raises nothing: a failure is logged and retried at
        the next change or refresh."""
        now = self._clock()
        labels = labels_of(self._types(), self._fingerprint_of, self._emulated)
        text, left_out = render(labels, now + self._expiry)
        try:
            if self._written is None:
                self._written = await asyncio.to_thread(self._file.read)
            if _body(text) == _body(self._written) and not self._due(now):
                return
            if left_out:
                log.warning(
                    "%d device types left out of %s: NFD reads at most %d bytes",
                    left_out,
                    self._file.path,
                    MAX_FILE_BYTES,
                )
            if self._record is not None:
                await asyncio.to_thread(self._record.remember, self._file.directory)
            await asyncio.to_thread(self._file.write, text)
        except (OSError, UnsafeDirectoryError) as err:
            # Said once per distinct failure, not at every change of a host in an event storm.
            problem = f"cannot write the NFD feature file {self._file.path}: {err}"
            log.log(logging.DEBUG if problem == self._problem else logging.WARNING, "%s", problem)
            self._problem = problem
            self._written = None
            return
        self._problem = ""
        self._written = text
        self._written_at = now
        log.debug("NFD labels written to %s", self._file.path)

    async def close(self) -> None:
        """Stop pending updates and remove the file: labels say what a running daemon knows."""
        for task in (self._task, self._refresher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        try:
            await asyncio.to_thread(self._file.remove)
        except (OSError, UnsafeDirectoryError) as err:
            log.warning("cannot remove the NFD feature file %s: %s", self._file.path, err)
            return
        if self._record is not None:
            self._record.forget()
        log.info("NFD labels removed from %s", self._file.path)

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

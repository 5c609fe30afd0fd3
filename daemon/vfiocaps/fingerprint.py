"""Migration fingerprints: what must match between two hosts for a device's saved state to load.

A VFIO device's migration stream carries the driver's own device state. Only the destination's
driver reads it, so two hosts can exchange a VM with such a device when the state written on one
is what the driver on the other expects. A fingerprint names every fact that decides this, per
device type, and :func:`check` compares a source's fingerprint with a destination's field by field.

The rule, field by field (why each is in the fingerprint):

``driver``
    The kernel module that writes and reads the device state. Another driver cannot parse it:
    different values make the pair incompatible.
``driver_version`` (with ``driver_version_source``)
    The state layout is private to the driver and may change between its versions (vendor vGPU
    managers require identical versions on both hosts). Equal versions match. Different versions
    are compatible only where both drivers declare the same ``state_format``; otherwise nobody
    but the driver knows, and the answer is unknown. Versions taken by different rules (e.g.
    MODULE_VERSION on one side, a module file hash on the other) cannot be compared: unknown.
``parent_pci_id``
    The physical device behind the type (``vendor:device``; empty for a virtual parent such as
    the kernel's sample drivers). State saved on one hardware model does not load on another:
    different values are incompatible.
``type_id``
    The type decides the device's shape and resources (the kernel's ``mtty`` sample checks that
    the saved state has as many ports as the destination's instance). Different types are
    incompatible.
``device_api``
    The VFIO device API (``vfio-pci``); QEMU restores the device through it. Different values
    are incompatible.
``migration`` and ``migration_with_options``
    What the probe found for the type (under QEMU's defaults, and with the device options it
    needs). A type migrates when either is ``supported``; it does not when it is ``unsupported``
    under the defaults and no options are known to help. One that does not migrate on either
    side makes the pair incompatible; one whose migration is not known makes it unknown.
``migration_flags``
    The kernel's VFIO migration flags of the device as ``MigrationFlags`` names them
    (``stop-copy``, ``pre-copy``, ``p2p``), or null where they were not read. Without
    ``stop-copy`` on both sides there is no stop-copy protocol to move the state: incompatible.
    Other differences change how QEMU drives the transfer, which the driver may or may not
    accept: unknown. Null on either side: not compared.
``state_format``
    A device state format (and version) where the driver publishes one; null where it does not
    (no VFIO interface publishes one in general, and the kernel's sample drivers do not). Both
    present and different: incompatible; both present and equal: match, also across driver
    versions. Null on either side: not compared.
``qemu_version``
    QEMU writes the stream around the device state. Equal versions match. A newer destination
    loads what an older QEMU wrote for the same machine type: match, with a note. An older
    destination loads it only for a machine type both versions know, which the fingerprint
    cannot see: unknown.
``kernel_release``
    Informational. The VFIO migration protocol is kernel API; what changes with the kernel is
    the driver, already covered by ``driver_version`` (which falls back to the kernel release for
    drivers built into it).
``emulated``
    True when an emulated host (a demonstration) wrote it; absent means false. Its answers
    describe no hardware, so it never matches real hardware: incompatible when the two differ.

The verdict is ``incompatible`` when any field is incompatible, else ``unknown`` when any field
is unknown, else ``compatible``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from .capabilities import Capabilities
from .model import Device, DriverIdentity

FORMAT = "vfiocaps-migration-fingerprint"
FORMAT_VERSION = 1

COMPATIBLE = "compatible"
INCOMPATIBLE = "incompatible"
UNKNOWN = "unknown"

# The most a fingerprint document may hold; a check reads a file another host wrote.
MAX_DOCUMENT_BYTES = 16 * 1024
# A fingerprint is one flat object holding one list; deeper documents are refused unread.
MAX_NESTING = 4
_MAX_TEXT = 256


class FingerprintError(ValueError):
    """A fingerprint document is malformed; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What must match between source and destination for a device type's state to load."""

    driver: str
    driver_version: str
    driver_version_source: str
    parent_pci_id: str
    type_id: str
    device_api: str
    migration: str
    migration_with_options: str
    qemu_version: str
    kernel_release: str
    migration_flags: tuple[str, ...] | None = None
    state_format: str | None = None
    emulated: bool = False  # written by a daemon serving an emulated host (a demonstration)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document form, with its format name and version."""
        values = asdict(self)
        if self.migration_flags is not None:
            values["migration_flags"] = list(self.migration_flags)
        return {"format": FORMAT, "version": FORMAT_VERSION, **values}

    def to_json(self) -> str:
        """The JSON document, keys sorted."""
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True, slots=True)
class Reason:
    """One field's part in a verdict."""

    field: str
    verdict: str
    detail: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer of a check and its reasons, one per field."""

    verdict: str
    reasons: tuple[Reason, ...]


def for_device(
    device: Device,
    driver: DriverIdentity,
    capabilities: Capabilities,
    parent_pci_id: str,
    emulated: bool = False,
) -> Fingerprint:
    """The fingerprint of *device*'s type from what discovery and the probe found (on an
    *emulated* host: a demonstration's)."""
    return for_type(
        driver, device.type_id, device.device_api, capabilities, parent_pci_id, emulated
    )


def for_type(
    driver: DriverIdentity,
    type_id: str,
    device_api: str,
    capabilities: Capabilities,
    parent_pci_id: str,
    emulated: bool = False,
) -> Fingerprint:
    """The fingerprint of a type served by *driver* with the probed *capabilities*.

    The kernel's migration flags are taken where the kernel could be asked (null otherwise).
    """
    migration_flags = (
        capabilities.migration_flags if capabilities.device_dirty_tracking is not None else None
    )
    return Fingerprint(
        driver=driver.module,
        driver_version=driver.version,
        driver_version_source=driver.version_source,
        parent_pci_id=parent_pci_id,
        type_id=type_id,
        device_api=device_api,
        migration=capabilities.migration.value,
        migration_with_options=capabilities.migration_with_options.value,
        qemu_version=capabilities.qemu_version,
        kernel_release=driver.kernel_release,
        migration_flags=None if migration_flags is None else tuple(sorted(set(migration_flags))),
        emulated=emulated,
    )


def _text(document: dict[str, Any], name: str, *, optional: bool = False) -> str | None:
    value = document.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise FingerprintError(f"field {name!r} must be a string, not {type(value).__name__}")
    if len(value) > _MAX_TEXT or not value.isprintable():
        raise FingerprintError(f"field {name!r} must be printable and at most {_MAX_TEXT} long")
    return value


def _nesting(text: str) -> int:
    """How deeply arrays and objects nest in the JSON *text* (strings skipped), counted
    without recursion so that any depth is measured safely."""
    deepest = depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def parse(text: str) -> Fingerprint:
    """Read a fingerprint document (as :meth:`Fingerprint.to_json` writes it).

    Raises:
        FingerprintError: not JSON, not a fingerprint, another format version, or a field of
            the wrong type. Unknown extra fields are ignored (a newer writer may add some).
    """
    # Characters first: a long string is refused before it is copied to count its bytes.
    if len(text) > MAX_DOCUMENT_BYTES or len(text.encode("utf-8", "surrogatepass")) > (
        MAX_DOCUMENT_BYTES
    ):
        raise FingerprintError(f"a fingerprint is at most {MAX_DOCUMENT_BYTES} bytes")
    if _nesting(text) > MAX_NESTING:
        raise FingerprintError(
            f"nested deeper than {MAX_NESTING} levels; a fingerprint is one flat object"
        )
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise FingerprintError(f"not JSON: {err}") from err
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise FingerprintError(
            f'not a migration fingerprint (expected "format": "{FORMAT}"); write one with '
            "'vfiocapsctl migration fingerprint ID --json'"
        )
    version = document.get("version")
    if type(version) is not int or version != FORMAT_VERSION:  # true == 1 in Python
        raise FingerprintError(
            f"fingerprint version {repr(version)[:40]} is not {FORMAT_VERSION}; "
            "produce it with the same vfiocaps version on both hosts"
        )
    flags = document.get("migration_flags")
    if flags is not None:
        if not isinstance(flags, list) or not all(
            isinstance(flag, str) and re.fullmatch(r"[a-z0-9-]{1,32}", flag) for flag in flags
        ):
            raise FingerprintError("field 'migration_flags' must be null or a list of flag names")
        flags = tuple(sorted(set(flags)))
    emulated = document.get("emulated", False)
    if not isinstance(emulated, bool):
        raise FingerprintError("field 'emulated' must be true or false")
    values: dict[str, Any] = {"emulated": emulated}
    for item in fields(Fingerprint):
        if item.name in ("migration_flags", "emulated"):
            continue
        values[item.name] = _text(document, item.name, optional=item.name == "state_format")
    return Fingerprint(migration_flags=flags, **values)


def _migrates(fingerprint: Fingerprint) -> str:
    if "supported" in (fingerprint.migration, fingerprint.migration_with_options):
        return "supported"
    # Unsupported under QEMU's defaults and no options known to help: it does not migrate.
    if fingerprint.migration == "unsupported":
        return "unsupported"
    return "unknown"


def _equal(name: str, source: str, destination: str, why: str) -> Reason:
    if source == destination:
        return Reason(name, COMPATIBLE, f"both {source or '(none)'}")
    return Reason(
        name,
        INCOMPATIBLE,
        f"source {source or '(none)'}, destination {destination or '(none)'}: {why}",
    )


def _driver_version(source: Fingerprint, destination: Fingerprint) -> Reason:
    name = "driver_version"
    if source.driver_version == destination.driver_version:
        return Reason(name, COMPATIBLE, f"both {source.driver_version}")
    if source.driver_version_source != destination.driver_version_source:
        return Reason(
            name,
            UNKNOWN,
            f"versions taken by different rules ({source.driver_version_source} vs "
            f"{destination.driver_version_source}) cannot be compared",
        )
    if source.state_format and source.state_format == destination.state_format:
        return Reason(
            name,
            COMPATIBLE,
            f"{source.driver_version} vs {destination.driver_version}, same state format "
            f"{source.state_format}",
        )
    return Reason(
        name,
        UNKNOWN,
        f"{source.driver_version} vs {destination.driver_version}: the driver publishes no state "
        "format, so only it knows whether the other version reads its state",
    )


def _migration(source: Fingerprint, destination: Fingerprint) -> Reason:
    sides = {"source": _migrates(source), "destination": _migrates(destination)}
    refused = [side for side, answer in sides.items() if answer == "unsupported"]
    if refused:
        return Reason(
            "migration", INCOMPATIBLE, f"the {' and '.join(refused)} type does not migrate"
        )
    if "unknown" in sides.values():
        unknown = [side for side, answer in sides.items() if answer == "unknown"]
        return Reason(
            "migration", UNKNOWN, f"not known whether the {' and '.join(unknown)} type migrates"
        )
    return Reason("migration", COMPATIBLE, "both types migrate")


def _flags(source: Fingerprint, destination: Fingerprint) -> Reason:
    name = "migration_flags"
    if source.migration_flags is None or destination.migration_flags is None:
        return Reason(name, COMPATIBLE, "not compared: not read on both hosts")
    missing = [
        side
        for side, flags in (
            ("source", source.migration_flags),
            ("destination", destination.migration_flags),
        )
        if "stop-copy" not in flags
    ]
    if missing:
        return Reason(name, INCOMPATIBLE, f"no stop-copy on the {' and '.join(missing)}")
    if source.migration_flags != destination.migration_flags:
        unknown = set(source.migration_flags) ^ set(destination.migration_flags)
        return Reason(
            name,
            UNKNOWN,
            f"{','.join(source.migration_flags)} vs {','.join(destination.migration_flags)}: "
            f"QEMU drives the transfer differently ({', '.join(sorted(unknown))})",
        )
    return Reason(name, COMPATIBLE, f"both {','.join(source.migration_flags)}")


def _state_format(source: Fingerprint, destination: Fingerprint) -> Reason:
    name = "state_format"
    if source.state_format is None or destination.state_format is None:
        return Reason(name, COMPATIBLE, "not compared: the driver publishes none")
    return _equal(name, source.state_format, destination.state_format, "the driver's state differs")


def _version_key(version: str) -> tuple[int, ...] | None:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        return None
    return tuple(int(part or 0) for part in match.groups())


def _qemu(source: Fingerprint, destination: Fingerprint) -> Reason:
    name = "qemu_version"
    if source.qemu_version == destination.qemu_version:
        return Reason(name, COMPATIBLE, f"both {source.qemu_version or '(none)'}")
    older, newer = _version_key(source.qemu_version), _version_key(destination.qemu_version)
    pair = f"{source.qemu_version or '(none)'} to {destination.qemu_version or '(none)'}"
    if older is not None and newer is not None and newer > older:
        return Reason(
            name,
            COMPATIBLE,
            f"{pair}: a newer QEMU loads an older one's stream for the same machine type",
        )
    return Reason(
        name,
        UNKNOWN,
        f"{pair}: an older QEMU loads a newer one's stream only for a machine type both know",
    )


def _emulated(source: Fingerprint, destination: Fingerprint) -> Reason:
    def host(fingerprint: Fingerprint) -> str:
        return "an emulated host" if fingerprint.emulated else "real hardware"

    if source.emulated == destination.emulated:
        return Reason("emulated", COMPATIBLE, f"both from {host(source)}")
    return Reason(
        "emulated",
        INCOMPATIBLE,
        f"the source is {host(source)}, the destination {host(destination)}: an emulated "
        "host's answers describe no hardware",
    )


def check(source: Fingerprint, destination: Fingerprint) -> Verdict:
    """Can state saved with *source*'s device type be loaded into *destination*'s?"""
    reasons = (
        _equal("driver", source.driver, destination.driver, "another driver cannot read the state"),
        _driver_version(source, destination),
        _equal(
            "parent_pci_id",
            source.parent_pci_id,
            destination.parent_pci_id,
            "state of one hardware model does not load on another",
        ),
        _equal(
            "type_id", source.type_id, destination.type_id, "the type decides the device's shape"
        ),
        _equal("device_api", source.device_api, destination.device_api, "QEMU restores through it"),
        _migration(source, destination),
        _flags(source, destination),
        _state_format(source, destination),
        _qemu(source, destination),
        _emulated(source, destination),
        Reason(
            "kernel_release",
            COMPATIBLE,
            f"{source.kernel_release} and {destination.kernel_release}: not compared (the "
            "driver version covers what changes with the kernel)",
        ),
    )
    verdicts = {reason.verdict for reason in reasons}
    if INCOMPATIBLE in verdicts:
        verdict = INCOMPATIBLE
    elif UNKNOWN in verdicts:
        verdict = UNKNOWN
    else:
        verdict = COMPATIBLE
    return Verdict(verdict, reasons)


def best(verdicts: list[Verdict]) -> Verdict | None:
    """The most favourable of several checks (compatible, then unknown, then incompatible)."""
    order = {COMPATIBLE: 0, UNKNOWN: 1, INCOMPATIBLE: 2}
    return min(verdicts, key=lambda verdict: order[verdict.verdict], default=None)

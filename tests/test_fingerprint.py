"""The migration fingerprint rule: every field judged as documented, documents read strictly."""

from __future__ import annotations

import dataclasses
import json

import pytest

from vfiocaps import fingerprint
from vfiocaps.capabilities import Capabilities, Display, Migration
from vfiocaps.fingerprint import (
    COMPATIBLE,
    INCOMPATIBLE,
    UNKNOWN,
    Fingerprint,
    FingerprintError,
    check,
    parse,
)
from vfiocaps.model import Device, DeviceKind, DriverIdentity

MTTY_2 = Fingerprint(
    driver="mtty",
    driver_version="0.1",
    driver_version_source="module-version",
    parent_pci_id="",
    type_id="mtty-2",
    device_api="vfio-pci",
    migration="supported",
    migration_with_options="unknown",
    qemu_version="10.0.3",
    kernel_release="6.12.117+deb13-amd64",
)


def verdicts(source: Fingerprint, destination: Fingerprint) -> dict[str, str]:
    return {reason.field: reason.verdict for reason in check(source, destination).reasons}


def test_equal_fingerprints_are_compatible_on_every_field() -> None:
    result = check(MTTY_2, MTTY_2)
    assert result.verdict == COMPATIBLE
    assert set(verdicts(MTTY_2, MTTY_2).values()) == {COMPATIBLE}
    fields = {field.name for field in dataclasses.fields(Fingerprint)} - {"driver_version_source"}
    assert {reason.field for reason in result.reasons} | {"migration_with_options"} >= fields


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("driver", "mdpy"),
        ("parent_pci_id", "10de:2236"),
        ("type_id", "mtty-1"),
        ("device_api", "vfio-ccw"),
    ],
)
def test_identity_fields_must_be_equal(field: str, value: str) -> None:
    other = dataclasses.replace(MTTY_2, **{field: value})
    result = check(MTTY_2, other)
    assert result.verdict == INCOMPATIBLE
    judged = verdicts(MTTY_2, other)
    assert judged[field] == INCOMPATIBLE
    assert [name for name, verdict in judged.items() if verdict != COMPATIBLE] == [field]


def test_another_driver_version_is_unknown_unless_the_state_format_matches() -> None:
    newer = dataclasses.replace(MTTY_2, driver_version="0.2")
    assert check(MTTY_2, newer).verdict == UNKNOWN
    assert verdicts(MTTY_2, newer)["driver_version"] == UNKNOWN
    with_format = dataclasses.replace(MTTY_2, state_format="mtty 1.0")
    assert check(with_format, dataclasses.replace(newer, state_format="mtty 1.0")).verdict == (
        COMPATIBLE
    )
    other_format = dataclasses.replace(newer, state_format="mtty 2.0")
    assert check(with_format, other_format).verdict == INCOMPATIBLE
    assert verdicts(with_format, other_format)["state_format"] == INCOMPATIBLE
    by_other_rule = dataclasses.replace(newer, driver_version_source="srcversion")
    assert verdicts(MTTY_2, by_other_rule)["driver_version"] == UNKNOWN


def test_a_type_that_does_not_migrate_on_either_side_is_incompatible() -> None:
    refused = dataclasses.replace(MTTY_2, migration="unsupported", migration_with_options="unknown")
    assert check(MTTY_2, refused).verdict == INCOMPATIBLE
    assert check(refused, MTTY_2).verdict == INCOMPATIBLE
    with_options = dataclasses.replace(refused, migration_with_options="supported")
    assert check(with_options, MTTY_2).verdict == COMPATIBLE
    unprobed = dataclasses.replace(MTTY_2, migration="unknown")
    assert check(MTTY_2, unprobed).verdict == UNKNOWN


def test_kernel_flags_are_compared_where_both_hosts_read_them() -> None:
    full = dataclasses.replace(MTTY_2, migration_flags=("p2p", "pre-copy", "stop-copy"))
    assert verdicts(MTTY_2, full)["migration_flags"] == COMPATIBLE
    assert check(full, full).verdict == COMPATIBLE
    no_precopy = dataclasses.replace(full, migration_flags=("p2p", "stop-copy"))
    assert check(full, no_precopy).verdict == UNKNOWN
    no_stop_copy = dataclasses.replace(full, migration_flags=("p2p",))
    assert check(full, no_stop_copy).verdict == INCOMPATIBLE


def test_qemu_may_be_newer_at_the_destination_not_older() -> None:
    newer = dataclasses.replace(MTTY_2, qemu_version="10.1.0")
    assert check(MTTY_2, newer).verdict == COMPATIBLE
    assert check(newer, MTTY_2).verdict == UNKNOWN
    assert verdicts(newer, MTTY_2)["qemu_version"] == UNKNOWN


def test_the_kernel_release_alone_decides_nothing() -> None:
    other_kernel = dataclasses.replace(MTTY_2, kernel_release="6.13.0")
    assert check(MTTY_2, other_kernel).verdict == COMPATIBLE


def test_documents_round_trip() -> None:
    with_flags = dataclasses.replace(MTTY_2, migration_flags=("stop-copy", "p2p"))
    document = json.loads(with_flags.to_json())
    assert document["format"] == fingerprint.FORMAT
    assert document["version"] == fingerprint.FORMAT_VERSION
    assert document["migration_flags"] == ["stop-copy", "p2p"]
    assert document["state_format"] is None
    assert parse(with_flags.to_json()) == dataclasses.replace(
        with_flags, migration_flags=("p2p", "stop-copy")
    )
    assert parse(MTTY_2.to_json()) == MTTY_2
    extra = dict(json.loads(MTTY_2.to_json()), added_later="x")
    assert parse(json.dumps(extra)) == MTTY_2


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("not json", "not JSON"),
        ("[]", "not a migration fingerprint"),
        ('{"format": "something else"}', "not a migration fingerprint"),
        (json.dumps({**json.loads(MTTY_2.to_json()), "version": 2}), "version 2"),
        (json.dumps({**json.loads(MTTY_2.to_json()), "driver": 3}), "'driver' must be a string"),
        (json.dumps({**json.loads(MTTY_2.to_json()), "type_id": "a\nb"}), "printable"),
        (json.dumps({**json.loads(MTTY_2.to_json()), "migration_flags": "p2p"}), "flag names"),
        (json.dumps({**json.loads(MTTY_2.to_json()), "migration_flags": ["p2p;"]}), "flag"),
        ("{" + " " * fingerprint.MAX_DOCUMENT_BYTES + "}", "at most"),
        ("[" * 8000 + "]" * 8000, "nested deeper"),
        ('{"format": "vfiocaps-migration", "x": ' + "[" * 5000 + "]" * 5000 + "}", "nested"),
        (json.dumps({**json.loads(MTTY_2.to_json()), "version": True}), "version True"),
        (json.dumps({**json.loads(MTTY_2.to_json()), "version": 1.0}), "version 1.0"),
    ],
)
def test_malformed_documents_say_what_is_wrong(document: str, message: str) -> None:
    with pytest.raises(FingerprintError, match=message):
        parse(document)


def test_nesting_is_measured_outside_strings_only() -> None:
    document = dict(json.loads(MTTY_2.to_json()), note='[[[[[[[[{{{{{{{{\\"[[[[[')
    assert parse(json.dumps(document)) == MTTY_2


def test_missing_field_is_named() -> None:
    document = json.loads(MTTY_2.to_json())
    del document["qemu_version"]
    with pytest.raises(FingerprintError, match="'qemu_version'"):
        parse(json.dumps(document))


def test_fingerprint_of_a_device() -> None:
    driver = DriverIdentity("mtty", "0.1", "module-version", "6.12.117+deb13-amd64")
    device = Device(DeviceKind.MDEV, "6f3b0d1e-93b4-4e5c-9fbc-2d2d7a6c1a01", "/sys/x", "mtty",
                    "mtty-2", driver=driver)  # fmt: skip
    caps = Capabilities(
        Display.NONE,
        False,
        Migration.UNSUPPORTED,
        qemu_version="10.0.3",
        migration_with_options=Migration.SUPPORTED,
        migration_flags=("stop-copy", "p2p"),
        device_dirty_tracking=True,
    )
    made = fingerprint.for_device(device, driver, caps, "")
    assert made == dataclasses.replace(
        MTTY_2,
        migration="unsupported",
        migration_with_options="supported",
        migration_flags=("p2p", "stop-copy"),
    )
    assert device.device_id not in made.to_json()


def test_best_prefers_compatible_then_unknown() -> None:
    incompatible = check(MTTY_2, dataclasses.replace(MTTY_2, type_id="mtty-1"))
    unknown = check(MTTY_2, dataclasses.replace(MTTY_2, driver_version="0.2"))
    compatible = check(MTTY_2, MTTY_2)
    assert fingerprint.best([incompatible, unknown]) is unknown
    assert fingerprint.best([incompatible, compatible, unknown]) is compatible
    assert fingerprint.best([]) is None

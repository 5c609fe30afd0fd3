"""The prober on its own: ``vfiocapsctl probe UUID --json`` against each sample driver."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from labkit import EXPECTED, SAMPLE_TYPES, CapabilityTable, vfiocapsctl


def normalised(tree: Any, found: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every key of a JSON tree, lower-cased without '_' or '-', first occurrence wins."""
    found = {} if found is None else found
    if isinstance(tree, dict):
        for key, value in tree.items():
            found.setdefault(str(key).lower().replace("_", "").replace("-", ""), value)
        for value in tree.values():
            normalised(value, found)
    elif isinstance(tree, list):
        for value in tree:
            normalised(value, found)
    return found


@pytest.mark.parametrize("module", sorted(SAMPLE_TYPES))
def test_prober_alone(samples: dict[str, str], table: CapabilityTable, module: str) -> None:
    type_id = SAMPLE_TYPES[module][0]
    result = subprocess.run(
        [vfiocapsctl(), "probe", samples[type_id], "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    answer = normalised(json.loads(result.stdout))
    compared = ("Display", "GlRequired", "Migration", "MigrationWithOptions")
    expected = {key: EXPECTED[module][key] for key in compared}
    got = {
        "Display": str(answer.get("display", "")).lower(),
        "GlRequired": answer.get("glrequired"),
        "Migration": str(answer.get("migration", "")).lower(),
        "MigrationWithOptions": str(answer.get("migrationwithoptions", "")).lower(),
    }
    table.record(
        type_id,
        prober=f"{got['Display']}, GL {got['GlRequired']}, migration {got['Migration']}, "
        f"with options {got['MigrationWithOptions']}",
    )
    assert got == expected, result.stdout

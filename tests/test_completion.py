"""bash completion of vfiocapsctl and vfiocapsd, run in a real bash as readline would call it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.cli_help import help_options
from support.daemon_lab import Lab
from support.harness import REPO, wait_until

SCRIPTS = {
    "vfiocapsctl": REPO / "completion" / "vfiocapsctl",
    "vfiocapsd": REPO / "completion" / "vfiocapsd",
}

# COMP_WORDS as bash builds them: the line split at blanks and at the COMP_WORDBREAKS characters.
_DRIVER = r"""
source "$1"
COMP_LINE=$2
COMP_POINT=${#COMP_LINE}
words=()
while IFS= read -r word; do words+=("$word"); done < <(
    printf '%s\n' "$COMP_LINE" | sed -E 's/([:=])/ \1 /g' | tr -s ' ' '\n')
[[ $COMP_LINE == *" " ]] && words+=("")
COMP_WORDS=("${words[@]}")
COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
complete -p "${COMP_WORDS[0]}" >/dev/null
"_${COMP_WORDS[0]}"
printf '%s\n' "${COMPREPLY[@]}"
"""


def complete(line: str) -> list[str]:
    """What the completion offers for *line* (the cursor at its end)."""
    program = line.split()[0]
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", "/root"),
    }
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", _DRIVER, "bash", str(SCRIPTS[program]), line],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return [offer for offer in result.stdout.split("\n") if offer]


def test_commands_and_their_options() -> None:
    assert complete("vfiocapsctl sh") == ["show"]
    assert complete("vfiocapsctl --json t") == ["types"]
    assert complete("vfiocapsctl xml --v") == ["--viewer"]
    assert complete("vfiocapsctl show X --viewer ") == ["local", "remote"]
    assert complete("vfiocapsctl show X --viewer l") == ["local"]
    assert complete("vfiocapsctl --timeout ") == []
    assert complete("vfiocapsd --nfd") == ["--nfd-labels"]
    assert complete("vfiocapsctl mig") == ["migration"]
    assert complete("vfiocapsctl migration ") == ["fingerprint", "check"]
    assert complete("vfiocapsctl pro") == ["probe-type", "probe"]
    # `migration fingerprint ID` takes no --device; `migration check` does.
    assert "--device" not in complete("vfiocapsctl migration fingerprint --")
    assert "--device" in complete("vfiocapsctl migration check --")


def test_the_documented_nfd_labels_form_completes_directories(tmp_path: Path) -> None:
    (tmp_path / "features.d").mkdir()
    (tmp_path / "file").write_text("")
    assert complete(f"vfiocapsd --nfd-labels={tmp_path}/f") == [f"{tmp_path}/features.d"]
    assert complete(f"vfiocapsd --nfd-labels {tmp_path}/f") == [f"{tmp_path}/features.d"]


@pytest.mark.parametrize(
    "command",
    [
        (),
        ("status",),
        ("show",),
        ("xml",),
        ("probe",),
        ("invalidate",),
        ("probe-type",),
        ("migration", "check"),
        ("migration", "fingerprint"),
    ],
)
def test_every_vfiocapsctl_option_is_offered(command: tuple[str, ...]) -> None:
    wanted = {option for option in help_options("vfiocapsctl", *command) if option.startswith("--")}
    offered = set(complete(" ".join(("vfiocapsctl", *command, "--"))))
    assert wanted <= offered


def test_every_vfiocapsd_option_is_offered() -> None:
    wanted = {option for option in help_options("vfiocapsd") if option.startswith("--")}
    assert set(complete("vfiocapsd --")) == wanted


def test_device_ids_and_drivers_come_from_the_daemon(lab: Lab) -> None:
    lab.host.build("pci")
    lab.start()
    wanted = {"0000:65:00.4", "0000:41:00.4"}
    wait_until(lambda: wanted <= set(lab.devices()), 30, "the PCI functions")
    bus = f"vfiocapsctl --bus-address {lab.bus.address}"
    assert set(complete(f"{bus} show ")) >= wanted
    # readline replaces what follows the last ':', so that is what is offered.
    assert complete(f"{bus} xml 0000:65") == ["65:00.4"]
    assert complete(f"{bus} refresh 0000:41:00") == ["00.4"]
    assert "vfio_pci" in complete(f"{bus} invalidate ")
    assert complete(f"{bus} show 0000:65:00.4 ") == []


def test_probe_type_offers_parents_then_types_from_the_daemon(lab: Lab) -> None:
    lab.host.build("samples")
    lab.start()
    bus = f"vfiocapsctl --bus-address {lab.bus.address}"
    types = subprocess.run(
        [sys.executable, "-m", "vfiocaps.ctl", "--bus-address", lab.bus.address, "types", "--json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    listed = json.loads(types.stdout)
    assert {entry["Parent"] for entry in listed} == {"mtty", "mdpy", "mbochs"}
    assert set(complete(f"{bus} probe-type ")) == {"mtty", "mdpy", "mbochs"}
    assert set(complete(f"{bus} probe-type md")) == {"mdpy"}
    offered = set(complete(f"{bus} probe-type mtty "))
    assert {"mtty-1", "mtty-2"} <= offered
    assert complete(f"{bus} probe-type mtty mtty-1 ") == []

"""The lab's figures as table rows, each beside the floor measured in the same run and its goal
(TCG guest with nested KVM: only the ratios carry over)."""

from __future__ import annotations

from typing import Any

from bench.report import Row, s_text

# Start to every type answered: at most this multiple of the same launches as bare QEMU starts
# plus the daemon's own start.
ALL_ANSWERED_GOAL = 1.4
# The daemon's start until it owns its name: at most this multiple of a Python process that
# imports the same bus library and owns a name on the same bus.
NAME_OWNED_GOAL = 2.0
# A probe's time outside its QEMU launches (probing to done, less the launches' wall time).
OUTSIDE_LAUNCHES_GOAL_S = 0.15


def _skipped_or_failed(lab: dict[str, Any]) -> list[Row] | None:
    if "skipped" in lab:
        return [Row("real-kernel lab benchmark", "skipped", lab["skipped"], "", "", None)]
    if "failed" in lab:
        first = lab["failed"].splitlines()[0]
        return [Row("real-kernel lab benchmark", "**failed**", first, "", "", None)]
    return None


def _type_rows(lab: dict[str, Any], floor: float) -> tuple[list[Row], float, int]:
    """Per sample type: its probe against a bare start and the naive way, and the probe's time
    outside its launches. Returns the rows and the naive way's total time and launches."""
    rows: list[Row] = []
    naive_total, naive_launches = 0.0, 0
    for type_id, entry in lab["types"].items():
        probe = entry["probe"]["p50"]
        naive = entry["naive"]["p50"]
        naive_total += naive
        naive_launches += max(entry["naive_launches"])
        launches = "/".join(str(n) for n in entry["probe_launches"])
        plural = "" if entry["probe_launches"] == [1] else "es"
        samples = entry["probe"]["count"]
        rows.append(
            Row(
                f"lab {type_id}: probe, {launches} QEMU launch{plural} (p50 of {samples})",
                s_text(probe),
                f"{s_text(floor)} (bare start-QMP-quit)",
                f"{probe / floor:.2f}x",
                "",
                None,
            )
        )
        outside = entry.get("outside_launches")
        if outside:
            rows.append(
                Row(
                    f"  {type_id}: time outside its launches (p50, max {outside['max']:.2f} s)",
                    s_text(outside["p50"]),
                    f"{s_text(entry['probe_launch_seconds']['p50'])} in its launches",
                    "",
                    f"<= {OUTSIDE_LAUNCHES_GOAL_S} s",
                    outside["p50"] <= OUTSIDE_LAUNCHES_GOAL_S,
                )
            )
        rows.append(
            Row(
                f"  {type_id}, the naive way: one launch per question",
                s_text(probe),
                f"{s_text(naive)}, {'/'.join(map(str, entry['naive_launches']))} launches (naive)",
                f"{probe / naive:.2f}x",
                "",
                None,
            )
        )
    return rows, naive_total, naive_launches


def lab_rows(lab: dict[str, Any]) -> list[Row]:
    """The real-kernel lab: each sample type's probe beside a bare QEMU and the naive way, and a
    cold start to every type answered beside the same launches as bare starts plus the daemon's
    start, and that start beside a Python process owning a name on the same bus."""
    unavailable = _skipped_or_failed(lab)
    if unavailable is not None:
        return unavailable
    floor = lab["floor"]["p50"]
    rows = [
        Row(
            f"lab: bare QEMU start-QMP-quit, no device ({lab['accel']}, p50 of "
            f"{lab['floor']['count']})",
            s_text(floor),
            f"{lab['qemu']}; guest kernel {lab['kernel']}, {lab.get('guest_cpus', '?')} vCPU",
            "",
            "",
            None,
        )
    ]
    type_rows, naive_total, naive_launches = _type_rows(lab, floor)
    rows += type_rows
    count = len(lab["types"])
    name_floor = lab.get("name_floor")
    for level, start in sorted(lab["start_to_all_answered"].items(), key=lambda i: int(i[0])):
        spread = start["all_answered"]
        answered = spread["p50"]
        launches = max(start["launches"])
        named = start["name_owned"]["p50"]
        bound = launches * floor + named
        goal = level == "1"  # the goal is set for one probe at a time
        rows.append(
            Row(
                f"lab: start to all {count} types answered, cold cache, {level} concurrent "
                f"probe(s) (p50 of {spread['count']}, min-max {spread['min']:.1f}-"
                f"{spread['max']:.1f} s)",
                f"{s_text(answered)}, {launches} launches",
                f"{s_text(bound)} ({launches} bare starts {s_text(launches * floor)} + the "
                f"daemon's start {s_text(named)})",
                f"{answered / bound:.2f}x",
                f"<= {ALL_ANSWERED_GOAL}x" if goal else "",
                answered / bound <= ALL_ANSWERED_GOAL if goal else None,
            )
        )
        rows.append(
            Row(
                "  against the naive way for every type, one after another",
                s_text(answered),
                f"{s_text(naive_total)}, {naive_launches} launches (naive)",
                f"{answered / naive_total:.2f}x",
                "",
                None,
            )
        )
        if name_floor:
            ratio = named / name_floor["p50"]
            rows.append(
                Row(
                    "  the daemon's start until it owns its name (systemctl start, p50, min-max "
                    f"{start['name_owned']['min']:.2f}-{start['name_owned']['max']:.2f} s)",
                    s_text(named),
                    f"{s_text(name_floor['p50'])} (Python + dbus-fast owning the name, p50 of "
                    f"{name_floor['count']})",
                    f"{ratio:.2f}x",
                    f"<= {NAME_OWNED_GOAL}x",
                    ratio <= NAME_OWNED_GOAL,
                )
            )
    return rows


def start_rows(start: dict[str, Any]) -> list[Row]:
    """The daemon's start on this machine until it owns its name, beside its floor."""
    if "skipped" in start:
        return [Row("daemon start until it owns its name", "skipped", start["skipped"], "", "",
                    None)]  # fmt: skip
    ours, floor = start["daemon"], start["floor"]
    ratio = ours["p50"] / floor["p50"]
    return [
        Row(
            f"daemon start until it owns its name, cold cache, this host (p50 of {ours['count']}, "
            f"min-max {ours['min']:.2f}-{ours['max']:.2f} s)",
            s_text(ours["p50"]),
            f"{s_text(floor['p50'])} (Python + dbus-fast owning a name on the same bus)",
            f"{ratio:.2f}x",
            f"<= {NAME_OWNED_GOAL}x",
            ratio <= NAME_OWNED_GOAL,
        ),
        Row(
            "  CPU time used by then (user + system, with its reaped children: QEMU -version)",
            s_text(start["daemon_cpu"]["p50"]),
            s_text(start["floor_cpu"]["p50"]),
            f"{start['daemon_cpu']['p50'] / start['floor_cpu']['p50']:.2f}x",
            "",
            None,
        ),
    ]

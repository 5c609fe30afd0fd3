"""Turning raw benchmark figures into goals, a table, Markdown, JSON and a latency plot."""

from __future__ import annotations

import json
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import summary

LATENCY_GOAL = 1.3  # p50 at most this multiple of the floor
THROUGHPUT_GOAL = 0.7  # at least this share of the floor's calls per second
HOTPLUG_GOAL_S = 0.020
PROBE_LAUNCH_GOAL = 1.2  # a probe self-test at most this multiple of a bare start-QMP-quit
PROBE_STAGES = (
    ("spawn", "  set-up until the QEMU process exists (p50)"),
    ("handshake", "  QEMU start-up and QMP handshake (p50)"),
    ("session", "  QMP session until reaped (self-test: save of the paused VM, quit) (p50)"),
)
SCALE_DEVICES = 10000
SCALE_SERVING_GOAL_S = 2.0
LATENCY_TICKS_US = (50, 100, 150, 200, 300, 500, 1000, 2000, 5000, 10000, 20000, 50000)
# 80 MB, read strictly (decimal): the peak (VmHWM) through start, GetManagedObjects and a burst
# of hotplugs.
SCALE_RSS_GOAL_KIB = 80_000_000 // 1024
GET_MANAGED_OBJECTS_GOAL = 1.5  # at most this multiple of the prebuilt reply's floor


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    measure: str
    vfiocaps: str
    floor: str
    ratio: str
    goal: str
    met: bool | None  # None: informational


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms" if seconds < 0.01 else f"{seconds * 1000:.1f} ms"


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def service_rows(service: dict[str, Any]) -> list[Row]:
    rows = []
    lat = service["latency"]
    ours, floor, floor_sync = lat["vfiocapsd"], lat["floor"], lat["floor-sync"]
    for q in ("p50", "p99"):
        ratio = ours[q] / floor[q]
        rows.append(
            Row(
                f"GetCapabilities latency {q}, warm cache",
                _ms(ours[q]),
                _ms(floor[q]),
                f"{ratio:.2f}x",
                f"<= {LATENCY_GOAL}x" if q == "p50" else "",
                ratio <= LATENCY_GOAL if q == "p50" else None,
            )
        )
    rows.append(
        Row(
            "  same, against a non-coroutine floor method (p50)",
            _ms(ours["p50"]),
            _ms(floor_sync["p50"]),
            f"{ours['p50'] / floor_sync['p50']:.2f}x",
            "",
            None,
        )
    )
    rates = service["throughput"]
    for clients, rate in sorted(rates["vfiocapsd"].items(), key=lambda item: int(item[0])):
        floor_rate = rates["floor"][clients]
        share = rate / floor_rate
        rows.append(
            Row(
                f"throughput, {clients} concurrent client(s)",
                f"{rate:,.0f} calls/s",
                f"{floor_rate:,.0f} calls/s",
                f"{share:.0%}",
                f">= {THROUGHPUT_GOAL:.0%}",
                share >= THROUGHPUT_GOAL,
            )
        )
    cpu = service["cpu_per_call"]
    for clients, used in sorted(cpu["vfiocapsd"].items(), key=lambda item: int(item[0])):
        floor_used = cpu["floor"][clients]
        rows.append(
            Row(
                f"  server CPU per call, {clients} client(s)",
                f"{used * 1e6:.0f} µs",
                f"{floor_used * 1e6:.0f} µs",
                f"{used / floor_used:.2f}x",
                "",
                None,
            )
        )
    hot = service["hotplug"]
    rows.append(
        Row(
            f"hotplug: add uevent to published (p50, n={hot['count']})",
            _ms(hot["p50"]),
            "",
            "",
            f"< {HOTPLUG_GOAL_S * 1000:.0f} ms",
            hot["p50"] < HOTPLUG_GOAL_S,
        )
    )
    rows.append(Row("  hotplug p99", _ms(hot["p99"]), "", "", "", None))
    window = hot.get("discovery_quiet_seconds")
    if window:
        rows.append(
            Row(
                "  of which the discovery's quiet-socket wait (at least)",
                _ms(window),
                "",
                "",
                "",
                None,
            )
        )
    rows.append(
        Row(
            "  umockdev sending the instance's 4 uevents (p50)",
            _ms(hot["uevent_sending"]["p50"]),
            "",
            "",
            "",
            None,
        )
    )
    return rows


def probe_rows(probes: dict[str, Any]) -> list[Row]:
    ours, naive = probes["vfiocaps"], probes["naive"]
    rows = [
        Row(
            f"probes for {ours['devices']} devices of {ours['types']} types",
            f"{ours['probes']} probes ({ours['launches']} QEMU launches)",
            f"{naive['launches']} launches (naive)",
            f"{naive['launches'] / ours['launches']:.1f}x fewer launches",
            f"{ours['types']} probes",
            ours["probes"] == ours["types"],
        ),
        Row(
            "  wall time, process start to last answer",
            f"{ours['wall']:.2f} s",
            f"{naive['wall']:.2f} s (naive)",
            f"{naive['wall'] / ours['wall']:.1f}x faster",
            "",
            None,
        ),
    ]
    real = probes["real_qemu"]
    if "skipped" not in real:
        ratio = real["probe"]["p50"] / real["floor"]["p50"]
        rows.append(
            Row(
                f"one probe self-test, real QEMU ({real['accel']}, p50)",
                _ms(real["probe"]["p50"]),
                f"{_ms(real['floor']['p50'])} (bare start-QMP-quit, {real['user']})",
                f"{ratio:.2f}x",
                f"<= {PROBE_LAUNCH_GOAL}x",
                ratio <= PROBE_LAUNCH_GOAL,
            )
        )
        ours_stages, floor_stages = real["probe_stages"], real["floor_stages"]
        for stage, title in PROBE_STAGES:
            mine, bare = ours_stages[stage]["p50"], floor_stages[stage]["p50"]
            rows.append(Row(title, _ms(mine), _ms(bare), f"{mine / bare:.2f}x", "", None))
        trip = real.get("round_trip")
        if trip is not None:
            rows.append(
                Row(
                    f"  the load launch of a migratable type ({trip['accel']}, p50)",
                    _ms(trip["load_launch"]["p50"]),
                    f"{_ms(trip['floor']['p50'])} (bare start-QMP-quit)",
                    f"{trip['load_launch']['p50'] / trip['floor']['p50']:.2f}x",
                    f"save {_ms(trip['save']['p50'])}, load {_ms(trip['load']['p50'])} "
                    f"of {trip['stream_bytes'] / 1e6:.1f} MB",
                    None,
                )
            )
    return rows


def profile_rows(figures: dict[str, Any]) -> list[Row]:
    """The profile pass at 512 VFs and the external write's latency, each beside its floor."""
    one = figures["pass"]
    latency = figures["latency"]
    ours = statistics.median(latency["latency_s"])
    floor = statistics.median(latency["floor_s"])
    interval = latency["interval_s"]
    return [
        Row(
            f"profile pass, {one['functions']} VFs: CPU per pass",
            _ms(one["cpu_s"]),
            f"{_ms(one['floor_cpu_s'])} (the {one['files_per_pass']} files read bare)",
            f"{one['cpu_s'] / one['floor_cpu_s']:.2f}x",
            "",
            None,
        ),
        Row(
            f"  the daemon idle with the pass every {interval:g} s (whole process)",
            f"{latency['idle_cpu_s'] / latency['idle_window_s'] * 100:.2f} % CPU",
            "",
            "",
            "",
            None,
        ),
        Row(
            "external profile write to device published (median)",
            f"{ours:.2f} s (max {max(latency['latency_s']):.2f} s)",
            f"{_ms(floor)} (the same write with a uevent)",
            "",
            f"<= {interval:g} s + floor",
            max(latency["latency_s"]) <= interval + max(latency["floor_s"]) + 0.5,
        ),
    ]


def scale_rows(scale: dict[str, Any]) -> list[Row]:
    rows = []
    for entry in scale["sizes"]:
        n, where = entry["devices"], entry["sysfs"]
        goal = n >= SCALE_DEVICES
        rows.append(
            Row(
                f"{n:,} cached devices ({where}): start to all published",
                f"{entry['all_published_s']:.2f} s",
                f"name owned {entry['name_owned_s']:.2f} s; a call waited up to "
                f"{entry['longest_unanswered_s']:.2f} s",
                "",
                f"< {SCALE_SERVING_GOAL_S:.0f} s" if goal else "",
                entry["all_published_s"] < SCALE_SERVING_GOAL_S if goal else None,
            )
        )
        ours, floor = entry["get_managed_objects_s"], entry["get_managed_objects_floor_s"]
        megabytes = entry["get_managed_objects_bytes"] / 1e6
        rows.append(
            Row(
                f"  GetManagedObjects, dbus-fast client ({megabytes:.1f} MB)",
                f"{ours * 1000:.0f} ms",
                f"{floor * 1000:.0f} ms (same reply, prebuilt)",
                f"{ours / floor:.2f}x",
                f"<= {GET_MANAGED_OBJECTS_GOAL}x" if goal else "",
                ours / floor <= GET_MANAGED_OBJECTS_GOAL if goal else None,
            )
        )
        ours, floor = (
            entry["get_managed_objects_busctl_s"],
            entry["get_managed_objects_busctl_floor_s"],
        )
        rows.append(
            Row(
                "  GetManagedObjects, busctl",
                f"{ours * 1000:.0f} ms",
                f"{floor * 1000:.0f} ms (same reply, prebuilt)",
                f"{ours / floor:.2f}x",
                "",
                None,
            )
        )
        rows.append(
            Row(
                "  VmRSS serving / after GetManagedObjects (VmHWM)",
                _mib(entry["rss_kib_serving"]),
                f"{_mib(entry['rss_kib_after_gmo'])} ({_mib(entry['hwm_kib_after_gmo'])})",
                "",
                "",
                None,
            )
        )
        if "hwm_kib_after_burst" in entry:
            rows.append(
                Row(
                    f"  a burst of {entry['hotplug_burst']:,} hotplugs: to all published",
                    f"{entry['hotplug_burst_s']:.2f} s",
                    f"VmRSS after it {_mib(entry['rss_kib_after_burst'])}",
                    "",
                    "",
                    None,
                )
            )
            hwm = entry["hwm_kib_after_burst"]
            rows.append(
                Row(
                    "  peak VmHWM through start, GetManagedObjects and the burst",
                    _mib(hwm),
                    "",
                    "",
                    f"< 80 MB ({_mib(SCALE_RSS_GOAL_KIB)})" if goal else "",
                    hwm < SCALE_RSS_GOAL_KIB if goal else None,
                )
            )
    return rows


def s_text(seconds: float) -> str:
    """Seconds with two decimals and the unit."""
    return f"{seconds:.2f} s"


def table(rows: list[Row]) -> str:
    """A Markdown table (readable as plain text too)."""
    header = ("measure", "vfiocaps", "floor / other", "ratio", "goal", "met")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in rows:
        met = "" if row.met is None else ("yes" if row.met else "**no**")
        cells = (row.measure, row.vfiocaps, row.floor, row.ratio, row.goal, met)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    """One line about the machine the figures come from."""
    cpus = 0
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("processor"):
            cpus += 1
        elif line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
    return f"{cpus} CPUs ({model}), Linux {platform.release()}, Python {platform.python_version()}"


def load_average() -> str:
    """The one-minute load average."""
    return Path("/proc/loadavg").read_text().split()[0]


def markdown(rows: list[Row], results: dict[str, Any]) -> str:
    """The README section."""
    return "\n".join(
        [
            "## Benchmarks",
            "",
            "`./bench/run` measures vfiocapsd beside a floor measured in the same run and prints",
            "the table below (`bench/results/latest.md`, `.json`, and `latency.png`). The floor",
            "for queries is a bare method on the same bus, built with the same library and",
            "connection class, returning a constant of the same size; for `GetManagedObjects`",
            "it answers with the body of vfiocapsd's own reply, unmarshalled once. The floor for",
            "a probe is the same QEMU binary started with no device, the same accelerator, user",
            "and groups, a QMP handshake and `quit`. Devices are emulated with umockdev and",
            "probed with the QEMU stand-in from `tests/fake_qemu`, except the real-QEMU lines.",
            "A run takes three to six minutes on two cores; it is not part of the tests. Only",
            "figures from the same run are comparable with each other. The `lab` lines come",
            "from the real-kernel lab (tests/lab, about 8 more minutes): the kernel's sample",
            "mdev drivers in a guest that runs under TCG with nested KVM inside, so their",
            "absolute times are far above real hardware and only their ratios carry over.",
            "",
            f"Measured on {results['machine']},",
            f"{results['date']} (load average {results['load_before']} before the run,",
            f"{results['load_after']} after it):",
            "",
            table(rows),
            "",
        ]
    )


def write(directory: Path, rows: list[Row], results: dict[str, Any]) -> list[Path]:
    """Write latest.md, latest.json and latency.png into *directory*; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    md = directory / "latest.md"
    md.write_text(markdown(rows, results))
    raw = directory / "latest.json"
    goals = [
        {"measure": r.measure.strip(), "vfiocaps": r.vfiocaps, "floor": r.floor, "met": r.met}
        for r in rows
        if r.met is not None
    ]
    raw.write_text(json.dumps({**results, "goals": goals}, indent=1, default=str) + "\n")
    written = [md, raw]
    plot = plot_latency(directory / "latency.png", results)
    if plot is not None:
        written.append(plot)
    return written


def plot_latency(path: Path, results: dict[str, Any]) -> Path | None:
    """Cumulative distributions of query latency and of hotplug latency (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
    except ImportError:
        return None
    service = results.get("service")
    if not service:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = {
        "vfiocapsd": "vfiocapsd GetCapabilities",
        "floor": "floor: constant, coroutine method",
        "floor-sync": "floor: constant, plain method",
    }
    for name, samples in service["latency_samples"].items():
        ordered = sorted(s * 1e6 for s in samples)
        fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
        p50 = summary(samples)["p50"] * 1e6
        left.plot(ordered, fractions, label=f"{labels.get(name, name)} (p50 {p50:.0f} µs)")
    left.set_xscale("log")
    # Plain numbers at a few round values; a log axis would otherwise label every minor tick.
    left.xaxis.set_major_locator(FixedLocator(LATENCY_TICKS_US))
    left.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    left.xaxis.set_minor_formatter(NullFormatter())
    left.set_xlabel("round trip (µs, log scale)")
    left.set_ylabel("fraction of calls")
    left.set_title("Query latency, one client, warm cache")
    left.axhline(0.5, color="grey", linewidth=0.5)
    left.axhline(0.99, color="grey", linewidth=0.5)
    left.grid(True, which="both", alpha=0.3)
    left.legend(loc="lower right", fontsize=8)
    hot = sorted(s * 1000 for s in service["hotplug"]["samples"])
    right.plot(hot, [(i + 1) / len(hot) for i in range(len(hot))], marker=".", label="vfiocapsd")
    right.axvline(HOTPLUG_GOAL_S * 1000, color="red", linestyle="--", label="goal (p50)")
    window = service["hotplug"].get("discovery_quiet_seconds")
    if window:
        right.axvspan(0, window * 1000, color="grey", alpha=0.15, label="discovery's quiet wait")
    right.set_xlim(left=0)
    right.axhline(0.5, color="grey", linewidth=0.5)
    right.set_xlabel("add uevent to InterfacesAdded with ProbeState=done (ms)")
    right.set_ylabel("fraction of hotplugs")
    right.set_title("Hotplug to published, cache hit")
    right.grid(True, alpha=0.3)
    right.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

"""Run the benchmarks, print the table and write bench/results/ (``bench/run`` calls this)."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

from bench import common, lab, lab_rows, probes, profiles, report, scale, service, start

STAGES = ("service", "start", "probes", "scale", "profiles", "lab")


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    parser.add_argument(
        "--only", choices=STAGES, action="append", help="run only this stage (repeatable)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer samples and at most 1,000 devices (a check)"
    )
    parser.add_argument(
        "--results", type=Path, default=common.REPO / "bench" / "results", help="output directory"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: the daemon's network namespace and probe user need it")
    stages = args.only or list(STAGES)
    sizes = scale.SIZES
    if args.quick:
        service.LATENCY_ROUNDS, service.LATENCY_CALLS = 1, 500
        service.THROUGHPUT_ROUNDS, service.THROUGHPUT_SECONDS = 1, 1.0
        service.HOTPLUG_REPEATS = 10
        probes.REAL_QEMU_REPEATS = 2
        profiles.PASSES, profiles.LATENCY_ROUNDS = 10, 2
        lab.REPEATS = 1
        start.REPEATS = 3
        sizes = (300, 1000)
    progress = common.Progress(len(stages))
    results: dict[str, object] = {
        "machine": report.machine(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "load_before": report.load_average(),
    }
    rows: list[report.Row] = []
    if "service" in stages:
        progress.stage("query latency, throughput, hotplug")
        figures = service.run(progress)
        results["service"] = figures
        rows += report.service_rows(figures)
    if "start" in stages:
        progress.stage("daemon start until it owns its name")
        figures = start.run(progress, start.REPEATS)
        results["start"] = figures
        rows += lab_rows.start_rows(figures)
    if "probes" in stages:
        progress.stage("probe cost")
        figures = probes.run(progress)
        results["probes"] = figures
        rows += report.probe_rows(figures)
    if "scale" in stages:
        progress.stage("scale")
        figures = scale.run(progress, sizes)
        results["scale"] = figures
        rows += report.scale_rows(figures)
    if "profiles" in stages:
        progress.stage("vGPU profiles set by other tools, 512 VFs")
        figures = profiles.run(progress)
        results["profiles"] = figures
        rows += report.profile_rows(figures)
    if "lab" in stages:
        progress.stage("real-kernel lab (boot, install, benchmark)")
        figures = lab.run(progress, args.results / "lab", lab.REPEATS)
        results["lab"] = figures
        rows += lab_rows.lab_rows(figures)
    progress.done()
    results["load_after"] = report.load_average()
    print(report.table(rows))
    for path in report.write(args.results, rows, results):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

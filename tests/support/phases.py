"""Which test modules are not parallel-safe (``serial``) and which are the quick in-process ones."""

from __future__ import annotations

# Modules that are not parallel-safe, and why: scripts/run-tests runs them one at a time after
# the parallel phase (``-m serial``). Everything else runs on several xdist workers at once:
# each of its tests has a private bus, scratch directories, umockdev host and daemon.
SERIAL = {
    "test_root_probe_user": "adds and removes system users and groups",
    "test_prober_fake": "compares the host's /dev/kvm before and after a probe",
    "test_prober_qemu": "times the real QEMU on the host's /dev/kvm",
    "test_reliability_bus": "measures how long the daemon takes under a flood of calls",
    "test_reliability_qemu": "measures time and memory of hung and crashing QEMUs",
    "test_memory": "measures the daemon's memory",
    "test_bus_backpressure": "a flood against a deadline",
    "test_foundation": "watchdog pings at a fixed period",
    "test_discovery_overflow": "overflows a netlink socket, which needs a slow enough reader",
    "test_discovery_umockdev": "a storm of a thousand instances against a time bound",
    "test_reliability_events": "10,000 uevents in one burst against a time bound",
    "test_root_grants": "probes paused for seconds while a second process starts",
    "test_sriov_daemon": "a profile seen within the default scan interval, timed",
    "test_ctl_usability": "a monitor's end, timed",
}

# Fixtures that start the daemon as a process: a test of a QUICK module that uses one is not quick.
PROCESS_FIXTURES = {"lab", "start_daemon", "private_bus", "shared_bus", "polkitd"}

# The modules of in-process and unit tests: ``scripts/run-tests --quick`` (``-m quick``), the
# inner loop.
QUICK = {
    "test_bootid",
    "test_discovery_sriov",
    "test_discovery_sysfs",
    "test_domainxml",
    "test_engine_inprocess",
    "test_engine_parts",
    "test_errors_tree",
    "test_fingerprint",
    "test_ids",
    "test_nfd_labels",
    "test_notify",
    "test_private_members",
    "test_prober_gl_transcripts",
    "test_prober_plan",
    "test_prober_transcripts",
    "test_state_records",
    "test_store",
    "test_vfiofeatures",
}

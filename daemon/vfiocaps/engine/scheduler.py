"""Probe jobs: one per cache key, a bounded set of workers, retries with capped back-off."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..capabilities import ProbeOutcome, ProbeReport, clean_report, printable
from ..model import Device, Parent
from ..qemubinary import QemuBinary
from ..store import CapabilityKey, CapabilityRecord, ProbeHistoryEntry
from .cache import RecordCache
from .table import DeviceEntry, DeviceTable
from .views import ProbeRunner, ProbeState

log = logging.getLogger(__name__)

FAILURE_BACKOFF_MAX = 3600.0
# 2 ** 20 times the shortest retry is past any cap: the exponent stops growing there.
_BACKOFF_EXPONENT_MAX = 20


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def backoff_seconds(first: float, failures: int) -> float:
    """How long to wait after the *failures*-th failure in a row: doubling from *first*, capped."""
    exponent = min(max(failures - 1, 0), _BACKOFF_EXPONENT_MAX)
    return min(max(first, FAILURE_BACKOFF_MAX), first * 2.0**exponent)


@dataclass(slots=True)
class ProbeJob:
    """The probe of one key, shared by every device that has it."""

    key: CapabilityKey
    future: asyncio.Future[CapabilityRecord]
    tried: set[str] = field(default_factory=set)
    task: asyncio.Task[CapabilityRecord] | None = None
    stopped: str = ""
    current: str = ""  # the device being probed
    deferred: str = ""  # why the probe was cut short for a domain: it is not an answer


class ProbeScheduler:
    """Runs one probe per key at a time, keys with more waiting devices first.

    A failure is cached with a retry time that doubles with each failure in a row; a busy
    device (held by a VM) is never disturbed: another device of the key is tried, else the key
    is retried later. A device *blocked* says is not probed (a domain holds it); a probe cut short
    for a domain caches nothing and is queued again. Whatever a probe raises settles its job: its
    devices leave ``probing`` and a retry is scheduled; the worker goes on.
    """

    def __init__(
        self,
        table: DeviceTable,
        cache: RecordCache,
        runner: ProbeRunner,
        *,
        parent_of: Callable[[Device], Parent | None],
        qemu_of: Callable[[], Awaitable[QemuBinary | None]],
        clock_us: Callable[[], int],
        retry_seconds: float,
        running_changed: Callable[[], None],
        blocked: Callable[[Device], str | None] = lambda device: None,
    ) -> None:
        self._table = table
        self._blocked = blocked
        self._cache = cache
        self._runner = runner
        self._parent_of = parent_of
        self._qemu_of = qemu_of
        self._clock_us = clock_us
        self._retry_seconds = retry_seconds
        self._running_changed = running_changed
        self._jobs: dict[CapabilityKey, ProbeJob] = {}
        self._queue: asyncio.PriorityQueue[tuple[int, int, CapabilityKey]] = asyncio.PriorityQueue()
        self._sequence = itertools.count()
        self._retry_timers: dict[CapabilityKey, asyncio.TimerHandle] = {}
        self._delayed: dict[CapabilityKey, asyncio.TimerHandle] = {}
        self.running = 0
        self.launched = 0

    def job(self, key: CapabilityKey | None) -> asyncio.Future[CapabilityRecord] | None:
        """The pending or running job of *key*, if any."""
        job = self._jobs.get(key) if key is not None else None
        return job.future if job is not None else None

    def is_probing(self, key: CapabilityKey) -> bool:
        """Whether a device of *key* is being probed now."""
        job = self._jobs.get(key)
        return job is not None and bool(job.tried)

    def state_of(self, key: CapabilityKey) -> tuple[ProbeState, str]:
        """Where a device of *key* stands by the cache; a failure not yet due gets its retry."""
        record = self._cache.get(key)
        if record is not None and record.outcome is ProbeOutcome.OK:
            return ProbeState.DONE, ""
        if record is not None and record.retry_at_us > self._clock_us():
            self.schedule_retry(key, record.retry_at_us)
            return ProbeState.FAILED, record.error
        return (ProbeState.PROBING if self.is_probing(key) else ProbeState.PENDING), ""

    def enqueue(
        self, key: CapabilityKey, urgent: bool = False, delay: float = 0.0
    ) -> asyncio.Future[CapabilityRecord]:
        """Queue a probe of *key* unless one is queued or running; return its result's future.

        With *delay*, a new job waits that long before it is queued (callers already wait on
        its future); an *urgent* call queues a delayed job at once.
        """
        job = self._jobs.get(key)
        if job is None:
            future: asyncio.Future[CapabilityRecord] = asyncio.get_running_loop().create_future()
            job = ProbeJob(key=key, future=future)
            self._jobs[key] = job
            if delay > 0 and not urgent:
                loop = asyncio.get_running_loop()
                self._delayed[key] = loop.call_later(delay, self._put, key, False)
                return job.future
            self._put(key, urgent)
        elif urgent and key in self._delayed:
            self._put(key, urgent)
        return job.future

    def _put(self, key: CapabilityKey, urgent: bool) -> None:
        timer = self._delayed.pop(key, None)
        if timer is not None:
            timer.cancel()
        priority = -1_000_000 if urgent else -len(self._table.waiting(key))
        self._queue.put_nowait((priority, next(self._sequence), key))

    def schedule_retry(self, key: CapabilityKey, at_us: int) -> None:
        """Probe *key* again at *at_us* if a device still waits for it."""
        if key in self._retry_timers:
            return
        delay = max(0.0, (at_us - self._clock_us()) / 1e6)
        loop = asyncio.get_running_loop()
        self._retry_timers[key] = loop.call_later(delay, self._retry_due, key)

    def cancel_retry(self, key: CapabilityKey) -> None:
        """Forget a scheduled retry of *key*."""
        timer = self._retry_timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _retry_due(self, key: CapabilityKey) -> None:
        self._retry_timers.pop(key, None)
        if self._table.waiting(key):
            self.enqueue(key)

    def stop(self) -> None:
        """Cancel every retry and every job not yet answered (the workers are cancelled apart)."""
        for handle in (*self._retry_timers.values(), *self._delayed.values()):
            handle.cancel()
        self._retry_timers.clear()
        self._delayed.clear()
        for job in self._jobs.values():
            if not job.future.done():
                job.future.cancel()

    def failure(self, key: CapabilityKey, outcome: ProbeOutcome, error: str) -> CapabilityRecord:
        """A failed record of *key*, retried after the back-off its failures in a row earn."""
        previous = self._cache.get(key)
        failures = (previous.failures if previous else 0) + 1
        now = self._clock_us()
        backoff = backoff_seconds(self._retry_seconds, failures)
        return CapabilityRecord(
            key=key,
            outcome=outcome,
            capabilities=None,
            error=printable(error),
            probed_at_us=now,
            retry_at_us=now + int(backoff * 1e6),
            failures=failures,
        )

    async def run_worker(self) -> None:
        """Take jobs from the queue until cancelled."""
        while True:
            _, _, key = await self._queue.get()
            job = self._jobs.get(key)
            if job is None or job.future.done() or job.task is not None:
                continue  # gone, answered, or queued twice (a delayed job made urgent)
            job.task = asyncio.ensure_future(self._run_job(job))
            try:
                record = await job.task
            except asyncio.CancelledError:
                if not (job.stopped or job.deferred) or _cancelling():
                    if not job.future.done():
                        job.future.cancel()
                    self._jobs.pop(key, None)
                    raise
                if job.deferred:
                    record = self._deferred_record(key, job.deferred)
                else:
                    record = self._settle_failure(job, ProbeOutcome.TIMEOUT, job.stopped)
            except Exception as err:
                log.exception("probe of %s failed unexpectedly", key.describe())
                record = self._settle_failure(job, ProbeOutcome.FAILED, f"internal error: {err}")
            self._jobs.pop(key, None)
            if not job.future.done():
                job.future.set_result(record)
            if job.deferred and any(self._free(entry) for entry in self._table.waiting(key)):
                self.enqueue(key)  # another instance of the key is free: probe that one

    def _settle_failure(self, job: ProbeJob, outcome: ProbeOutcome, error: str) -> CapabilityRecord:
        """A job that ended without a report: cache the failure, settle its devices, go on."""
        record = self.failure(job.key, outcome, error)
        self._cache.remember(record)
        self._settle(job.key, record)
        self._running_changed()
        return record

    async def cancel(self, key: CapabilityKey, reason: str) -> None:
        """Stop the running probe of *key* (its QEMU is reaped) and wait until its job settled."""
        job = self._jobs.get(key)
        if job is None or job.task is None or job.task.done():
            return
        job.stopped = f"the probe was stopped: {reason}"
        job.task.cancel()
        await asyncio.wait((job.future,))

    async def yield_devices(self, device_ids: set[str], reason: str, wait: float) -> None:
        """Cut short the probes running on *device_ids* (their QEMU is reaped, their nodes given
        back) and wait until their jobs settled, at most *wait* seconds (a QEMU the kernel does
        not let die is logged and left to end); they cache nothing and are queued again."""
        stopping = [
            job
            for job in self._jobs.values()
            if job.current in device_ids and job.task is not None and not job.task.done()
        ]
        for job in stopping:
            job.deferred = reason
            if job.task is not None:
                job.task.cancel()
        if stopping:
            _, late = await asyncio.wait([job.future for job in stopping], timeout=wait)
            if late:
                log.warning("%d probe(s) did not stop within %g s: %s", len(late), wait, reason)

    def _free(self, entry: DeviceEntry) -> bool:
        return self._blocked(entry.device) is None

    def _deferred_record(self, key: CapabilityKey, reason: str) -> CapabilityRecord:
        """The devices of *key* that domains hold wait for their release; cache nothing."""
        for entry in self._table.waiting(key):
            held = self._blocked(entry.device)
            if held is not None:
                self._table.set_state(entry, ProbeState.BUSY, held)
            elif entry.state is ProbeState.PROBING:
                self._table.set_state(entry, ProbeState.PENDING, "")
        self._running_changed()
        return CapabilityRecord(key, ProbeOutcome.BUSY, None, reason, probed_at_us=0)

    async def _run_job(self, job: ProbeJob) -> CapabilityRecord:
        key = job.key
        while True:
            waiting = [e for e in self._table.waiting(key) if e.device.device_id not in job.tried]
            candidates = [e for e in waiting if self._free(e)]
            if waiting and not candidates:
                return self._deferred_record(key, "every device of the key is held by a domain")
            ready = [e for e in candidates if e.device.iommu_group]
            if candidates and not ready:
                return self._not_ready_record(key, candidates)
            if not ready:
                return self._busy_record(key)
            entry = ready[0]
            job.tried.add(entry.device.device_id)
            job.current = entry.device.device_id
            began = time.monotonic()
            for waiting_entry in self._table.waiting(key):
                self._table.set_state(waiting_entry, ProbeState.PROBING, "")
            announced = time.monotonic()
            report = await self._probe(entry.device)
            probed = time.monotonic()
            job.current = ""
            if report.outcome is not ProbeOutcome.OK and not self._free(entry):
                # A domain took the device while it was probed: no answer; wait for release.
                job.deferred = f"{entry.device.device_id} was taken by a domain during its probe"
                return self._deferred_record(key, job.deferred)
            if report.outcome is ProbeOutcome.BUSY:
                self._table.set_state(entry, ProbeState.BUSY, report.error or "device is in use")
                continue
            if (
                report.outcome is not ProbeOutcome.OK
                and self._table.get(entry.device.device_id) is not entry
            ):
                # The device went away while it was probed: its failure says nothing about
                # the type. Try the instances still waiting (a re-created one included).
                log.info(
                    "%s went away during its probe; its failure is not cached",
                    entry.device.device_id,
                )
                job.tried.discard(entry.device.device_id)
                continue
            record = self._record_from(key, report)
            history = ProbeHistoryEntry(
                at_us=self._clock_us(),
                key=key,
                outcome=report.outcome,
                duration=report.duration,
                launches=len(report.launches),
                error=report.error,
            )
            self._cache.remember(record, history)
            self._settle(key, record)
            log.debug(
                "probe of %s in the engine: probing to done %.3f s: announce probing %.3f, "
                "prober %.3f, record and announce done %.3f",
                entry.device.device_id,
                time.monotonic() - began,
                announced - began,
                probed - announced,
                time.monotonic() - probed,
            )
            return record

    def _not_ready_record(self, key: CapabilityKey, entries: list[DeviceEntry]) -> CapabilityRecord:
        """The devices have no IOMMU group yet (an mdev gets it when its driver binds): probe
        when they are updated, cache nothing."""
        error = "waiting for the device's IOMMU group"
        for entry in entries:
            self._table.set_state(entry, ProbeState.PENDING, error)
        return CapabilityRecord(key, ProbeOutcome.FAILED, None, error, probed_at_us=0)

    def _busy_record(self, key: CapabilityKey) -> CapabilityRecord:
        """Every instance of *key* is held by someone: retry later, cache nothing."""
        at = self._clock_us() + int(self._retry_seconds * 1e6)
        for entry in self._table.waiting(key):
            self._table.set_state(entry, ProbeState.BUSY, "device is in use; will retry")
        self.schedule_retry(key, at)
        return CapabilityRecord(
            key, ProbeOutcome.BUSY, None, "device is in use", probed_at_us=0, retry_at_us=at
        )

    async def _probe(self, device: Device) -> ProbeReport:
        self.running += 1
        self._running_changed()
        try:
            # What QEMU and the driver wrote is evidence: stored and shown without control codes.
            qemu = await self._qemu_of()
            report = clean_report(
                await self._runner.probe_device(device, self._parent_of(device), qemu)
            )
        finally:
            self.running -= 1
        self.launched += 1
        log.info(
            "probed %s: %s in %.2fs (%d launches)%s",
            device.device_id,
            report.outcome.value,
            report.duration,
            len(report.launches),
            f": {report.error}" if report.error else "",
        )
        self._running_changed()
        return report

    def _record_from(self, key: CapabilityKey, report: ProbeReport) -> CapabilityRecord:
        if report.outcome is ProbeOutcome.OK and report.capabilities is not None:
            return CapabilityRecord(
                key, ProbeOutcome.OK, report.capabilities, "", probed_at_us=self._clock_us()
            )
        return self.failure(key, report.outcome, report.error or report.outcome.value)

    def _settle(self, key: CapabilityKey, record: CapabilityRecord) -> None:
        ok = record.outcome is ProbeOutcome.OK
        for entry in self._table.waiting(key):
            if ok:
                self._table.set_state(entry, ProbeState.DONE, "")
            else:
                self._table.set_state(entry, ProbeState.FAILED, record.error)
        if not ok:
            self.schedule_retry(key, record.retry_at_us)

"""The outbox: delivers queued results to their destinations, at least once.

A delivery is marked delivered only after the peer's success status. Failures are retried with
exponential backoff and jitter (``retry_base_seconds`` × 2^(tries−1), capped at
``retry_max_seconds``, then a random factor in [0.5, 1]); after ``max_delivery_tries`` — or at once
for a permanent refusal — the delivery is dead-lettered. ``radvlm outbox retry`` re-queues it.

Destinations never wait for each other: each configured destination has its own delivery thread
(a "lane"), so a PACS that accepts TCP and never answers only delays its own deliveries; one try
takes at most ``delivery_timeout_seconds`` (a deadline over connect, association and answer that
the senders enforce, see ``destinations.deliver``). Deliveries to a destination that is no
longer configured are dead-lettered by the outbox thread itself.
"""

from __future__ import annotations

import logging
import random
import threading
import time

from config.settings import NodeSettings, Settings
from dicom_node.audit import AuditLog
from dicom_node.demo_safety import DemoModelDeliveryRefused, check_delivery
from dicom_node.destinations import Destination, PermanentDeliveryError, deliver, destination_name
from dicom_node.errors import DestinationNotConfiguredError
from dicom_node.health import ComponentHealth
from dicom_node.jobstore import Delivery, JobStore
from dicom_node.metrics import Metrics

log = logging.getLogger(__name__)


def backoff_seconds(tries: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay before try ``tries + 1`` (``tries`` ≥ 1 already made): capped exponential, half jitter."""
    rng = rng or random
    delay = min(cap, base * (2 ** max(tries - 1, 0)))
    return delay * (0.5 + rng.random() / 2)


def delivery_lease_seconds(node: NodeSettings) -> float:
    """How long a claimed delivery is leased (then taken again): ``node.delivery_lease_seconds``,
    default 4 × ``delivery_timeout_seconds`` + 60 (one try may open an association, send several
    objects, each up to the timeout)."""
    return node.delivery_lease_seconds or node.delivery_timeout_seconds * 4 + 60


class _WakeAll(threading.Event):
    """``outbox.wake.set()`` (a result was written) wakes every destination lane."""

    def __init__(self) -> None:
        super().__init__()
        self.lanes: list[threading.Event] = []

    def set(self) -> None:
        super().set()
        for lane in self.lanes:
            lane.set()


class Outbox(threading.Thread):
    def __init__(self, settings: Settings, jobs: JobStore, audit: AuditLog, metrics: Metrics,
                 stop: threading.Event) -> None:
        super().__init__(name="radvlm-outbox", daemon=True)
        self.settings = settings
        self.jobs = jobs
        self.audit = audit
        self.metrics = metrics
        self.stop_event = stop
        self.wake = _WakeAll()
        self.lanes: dict[str, threading.Thread] = {}
        self.destinations: dict[str, Destination] = {destination_name(d): d for d in settings.destinations}
        self.health = ComponentHealth()  # the node shares its own (``/healthz``)

    def run(self) -> None:
        """Start one lane per configured destination; this thread serves the unconfigured ones."""
        for i, name in enumerate(self.destinations):
            wake = threading.Event()
            self.wake.lanes.append(wake)
            lane = threading.Thread(target=self._lane, args=(name, wake), name=f"radvlm-outbox-{i}", daemon=True)
            self.lanes[name] = lane
            lane.start()
        self._lane(None, self.wake)
        for lane in self.lanes.values():
            lane.join()  # each finishes its current try, which is bounded by delivery_timeout_seconds

    def _lane(self, destination: str | None, wake: threading.Event) -> None:
        component = "outbox" if destination is None else f"outbox {destination}"  # one health entry per lane
        while not self.stop_event.is_set():
            try:
                worked = self.run_once(destination, unconfigured=destination is None)
                self.health.ok(component)
            except Exception as exc:  # e.g. the job store is unavailable: the thread lives on, /healthz degrades
                log.error("outbox error: %s: %s", type(exc).__name__, exc)
                self.health.failing(component, f"outbox pass failed: {type(exc).__name__}")
                worked = False
            if not worked:
                wake.wait(self.settings.node.poll_interval_seconds)
                wake.clear()

    def run_once(self, destination: str | None = None, *, unconfigured: bool = False) -> bool:
        """Attempt one due delivery (to ``destination`` only; with ``unconfigured``, to a destination
        no longer configured; neither: any); False when none was due."""
        node = self.settings.node
        if unconfigured:
            delivery = self.jobs.claim_delivery(lease_seconds=delivery_lease_seconds(node),
                                                exclude=tuple(self.destinations))
        else:
            delivery = self.jobs.claim_delivery(lease_seconds=delivery_lease_seconds(node), destination=destination)
        if delivery is None:
            return False
        self.attempt(delivery)
        return True

    def attempt(self, delivery: Delivery) -> None:
        node = self.settings.node
        dest = self.destinations.get(delivery.destination)
        try:
            if dest is None:
                raise DestinationNotConfiguredError(
                    f"destination {delivery.destination!r} is no longer configured; add it back and run "
                    "`radvlm outbox retry`")
            check_delivery(dest, self.settings, delivery.files)  # demo-model results: not to PACS/EHR unasked
            deliver(dest, node, delivery.study_instance_uid, delivery.files)
        except Exception as exc:  # anything else (unreadable file, rejected context…) is retried too,
            # so every attempt ends in delivered, pending-with-backoff or dead — never stuck in 'sending'
            permanent = isinstance(exc, (PermanentDeliveryError, DestinationNotConfiguredError))
            dead = permanent or delivery.tries >= node.max_delivery_tries
            retry_at = None if dead else time.time() + backoff_seconds(
                delivery.tries, node.retry_base_seconds, node.retry_max_seconds)
            self.jobs.delivery_failed(delivery, str(exc), retry_at)
            self.metrics.inc("radvlm_deliveries_total", kind=delivery.kind, outcome="dead" if dead else "retry")
            if dead:
                log.error("delivery of study %s to %s dead-lettered after %d tries: %s",
                          delivery.study_instance_uid, delivery.destination, delivery.tries, exc)
                event = "delivery_refused" if isinstance(exc, DemoModelDeliveryRefused) else "delivery_dead"
                self.audit.write(event, study_instance_uid=delivery.study_instance_uid,
                                 destination=delivery.destination, tries=delivery.tries, error=str(exc)[:500])
            else:
                self.metrics.inc("radvlm_delivery_retries_total", destination=delivery.destination)
                log.warning("delivery of study %s to %s failed (try %d of %d), retrying in %.0fs: %s",
                            delivery.study_instance_uid, delivery.destination, delivery.tries,
                            node.max_delivery_tries, (retry_at or 0) - time.time(), exc)
            return
        self.jobs.delivery_succeeded(delivery)
        self.metrics.inc("radvlm_deliveries_total", kind=delivery.kind, outcome="delivered")
        self.audit.write("delivered", study_instance_uid=delivery.study_instance_uid,
                         destination=delivery.destination, kind=delivery.kind, tries=delivery.tries,
                         files=[f.rsplit("/", 1)[-1] for f in delivery.files])
        log.info("study %s delivered to %s", delivery.study_instance_uid, delivery.destination)

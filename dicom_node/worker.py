"""Inference workers: take a selected study with a lease, run the model, write the results,
queue one delivery per destination. Every state change is a committed job-store transaction.

A lease is renewed while the model runs; if the process dies, the lease expires (or is released
at the next start-up) and the study is taken again. Two bounds end a study (settings):
``node.max_inference_attempts`` processing errors (model, image, result writer), or
``node.max_interrupted_attempts`` runs cut short by a node crash (so an innocent study survives
restarts while one that really crashes the model ends). A disk error writing results (ENOSPC, EIO)
is not the study's fault: it waits ``node.io_retry_seconds`` and is taken again, uncounted.
No exception ends a worker thread; ``/healthz`` reports the workers degraded while they fail.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from pydicom import dcmread

from config.settings import Settings
from dicom_node.audit import AuditLog
from dicom_node.health import ComponentHealth
from dicom_node.destinations import destination_name, files_for
from dicom_node.jobstore import Job, JobStore
from dicom_node.metrics import Metrics
from dicom_node.phi import code_location, error_reason
from dicom_node.results import write_result_files
from dicom_node.rules import inference_for_study, study_tasks
from inference.backend import BackendUnavailableError
from inference.errors import InputImageError, ModelError
from inference.result import StudyResult
from sr_writer.errors import WriterError

log = logging.getLogger(__name__)

Analyzer = Callable[[object], StudyResult]  # ModelImage -> StudyResult


class ResultWriteError(Exception):
    """Writing the result files failed with an OS error (ENOSPC, EIO...)."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class InferenceWorker(threading.Thread):
    """One worker thread; several share the model (calls are serialised by ``model_lock``)."""

    def __init__(self, index: int, settings: Settings, jobs: JobStore, audit: AuditLog, metrics: Metrics,
                 analyze: Analyzer, stop: threading.Event, model_lock: threading.Lock | None = None,
                 on_written: Callable[[], None] | None = None, health: ComponentHealth | None = None) -> None:
        super().__init__(name=f"radvlm-worker-{index}", daemon=True)
        self.settings = settings
        self.jobs = jobs
        self.audit = audit
        self.metrics = metrics
        self.analyze = analyze
        self.stop_event = stop
        self.model_lock = model_lock or threading.Lock()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{self.name}"
        self.on_written = on_written
        self.health = health or ComponentHealth()
        self.current: Job | None = None
        self.wake = threading.Event()

    def run(self) -> None:
        node = self.settings.node
        while not self.stop_event.is_set():
            try:
                job = self.jobs.claim_job(self.owner, node.lease_seconds, node.max_inference_attempts,
                                          node.max_interrupted_attempts)
                self.health.ok("workers: job store")  # healed at the next claim, with or without a job
            except Exception as exc:
                reason = f"job store error while claiming a job: {error_reason(exc)}"
                log.error("%s at %s", reason, code_location(exc))
                self.health.failing("workers: job store", reason)
                job = None
            if job is None:
                self.wake.wait(node.poll_interval_seconds)
                self.wake.clear()
                continue
            self.current = job
            try:
                self.process(job)
            except Exception as exc:  # the job store failed while recording the outcome: the lease
                # expires and the study is taken again (counted as an interrupted run); the thread lives on
                reason = f"cannot record the outcome of study {job.study_instance_uid}: {error_reason(exc)}"
                log.error("%s at %s", reason, code_location(exc))
                self.health.failing("workers", reason)
                self.stop_event.wait(node.poll_interval_seconds)
            finally:
                self.current = None

    def _renew_leases(self, job: Job, done: threading.Event) -> None:
        interval = max(self.settings.node.lease_seconds / 3, 0.5)
        while not done.wait(interval):
            try:
                renewed = self.jobs.renew_lease(job, self.settings.node.lease_seconds)
            except Exception as exc:
                log.warning("could not renew the lease of study %s: %s", job.study_instance_uid, error_reason(exc))
                continue
            if not renewed:
                log.warning("lost the lease of study %s", job.study_instance_uid)
                return

    def process(self, job: Job) -> None:
        study = job.study_instance_uid
        log.info("inference for study %s (instance %s, attempt %d)", study, job.sop_instance_uid, job.attempts)
        done = threading.Event()
        renewer = threading.Thread(target=self._renew_leases, args=(job, done), daemon=True)
        renewer.start()
        node = self.settings.node
        try:
            self._process(job)
            self.health.ok("workers")
        except ResultWriteError as exc:  # disk full / I/O error writing results: not the study's fault
            reason = f"cannot write the results: {error_reason(exc.cause)}"
            log.error("study %s: %s; taken again in %.0fs", study, reason, node.io_retry_seconds)
            self.health.failing("workers", reason)
            self.metrics.inc("radvlm_jobs_total", outcome="io-error")
            self.jobs.defer_job(job, reason, node.io_retry_seconds)
            self.audit.write("study_deferred", study_instance_uid=study, reason=reason)
        except BackendUnavailableError as exc:  # every inference endpoint failed: not the study's fault,
            # nothing was written; back to the queue with the reason, uncounted (inference.remote)
            reason = f"inference backend unavailable: {exc}"
            retry = self.settings.inference.unavailable_retry_seconds
            log.error("study %s: %s; taken again in %.0fs", study, reason, retry)
            self.health.failing("workers", reason)
            self.metrics.inc("radvlm_jobs_total", outcome="backend-unavailable")
            self.jobs.defer_job(job, reason, retry)
            self.audit.write("study_deferred", study_instance_uid=study, reason=reason)
        except Exception as exc:  # unexpected processing error: count it, let the job be taken again
            reason = f"internal error: {error_reason(exc)} at {code_location(exc)}"
            log.error("inference of study %s failed: %s", study, reason)
            self.metrics.inc("radvlm_jobs_total", outcome="error")
            if job.errors + 1 >= node.max_inference_attempts:
                self._fail(job, f"{reason} (attempt {job.errors + 1} of {node.max_inference_attempts})", "error")
            else:
                self.jobs.retry_job(job, f"attempt {job.errors + 1} failed: {reason}")
        finally:
            done.set()
            renewer.join(timeout=5)

    def _process(self, job: Job) -> None:
        study = job.study_instance_uid
        try:
            source = dcmread(job.path)
        except Exception as exc:
            reason = f"selected instance {job.sop_instance_uid} cannot be read from the spool: {error_reason(exc)}"
            self._fail(job, reason, "unreadable")
            return
        from inference.image import image_from_dataset

        try:
            image = image_from_dataset(source, allow_colour=self.settings.inference.allow_colour,
                                       file_name=job.path.name, max_pixels=self.settings.inference.max_image_pixels)
        except InputImageError as exc:
            self._fail(job, f"selected image not usable: {error_reason(exc)}", "unreadable")
            return
        routing = json.loads(job.routing) if job.routing else {}  # the study's routing rule (dicom_node.rules)
        started = time.perf_counter()
        try:
            with self.model_lock, study_tasks(routing.get("tasks")):
                result = self.analyze(image)
        except ModelError as exc:
            self._fail(job, f"model error: {error_reason(exc)}", "model-error")
            return
        seconds = time.perf_counter() - started
        self.metrics.observe("radvlm_inference_seconds", seconds)
        out_dir = self.settings.node.data_dir / "results" / study
        destinations = self.settings.destinations
        if routing.get("destinations") is not None:  # the rule names where its results go
            destinations = [d for d in destinations if d.name in routing["destinations"]]
        needs_fhir = any(d.kind in ("fhir", "folder") for d in destinations)
        try:
            files = write_result_files(result, source, self.settings.sr, out_dir, fhir=needs_fhir)
        except OSError as exc:
            raise ResultWriteError(exc) from exc
        except WriterError as exc:  # the source cannot carry a result (e.g. an undecodable Patient ID):
            # deterministic, so failed at once instead of retried
            self._fail(job, f"result cannot be written: {error_reason(exc)}", "unwritable")
            return
        # no FHIR bundle (empty Patient ID, [sr] fhir_without_patient_id = "skip"): SR/GSPS go out as
        # usual, FHIR destinations are not queued and the reason is logged and audited (docs/fhir.md)
        deliveries = [(destination_name(d), d.kind, [str(p) for p in files_for(d, files)]) for d in destinations
                      if not (d.kind == "fhir" and files.fhir_skipped)]
        if files.fhir_skipped:
            log.warning("study %s: FHIR not sent: %s", study, files.fhir_skipped)
            self.audit.write("fhir_skipped", study_instance_uid=study, reason=files.fhir_skipped)
        if files.gsps_skipped:  # the reason names the source attribute, never its value
            log.warning("study %s: %s", study, files.gsps_skipped)
            self.audit.write("gsps_skipped", study_instance_uid=study, reason=files.gsps_skipped)
        if not self.jobs.mark_written(job, str(out_dir), deliveries):
            log.warning("study %s: lease lost before the result was recorded; another worker will redo it", study)
            return
        self.metrics.inc("radvlm_jobs_total", outcome="written")
        sr_uid = dcmread(files.sr, stop_before_pixels=True).SOPInstanceUID
        self.audit.write("result_written", study_instance_uid=study, source_sop_instance_uid=job.sop_instance_uid,
                         sr_sop_instance_uid=str(sr_uid), model=result.model.model_id, model_version=result.model.version,
                         positive_labels=result.positive_labels, inference_seconds=round(seconds, 3),
                         destinations=[name for name, _, _ in deliveries])
        log.info("study %s: result written in %.2fs, %d deliveries queued", study, seconds, len(deliveries))
        if self.on_written is not None:
            self.on_written()

    def _fail(self, job: Job, reason: str, outcome: str) -> None:
        log.warning("study %s failed: %s", job.study_instance_uid, reason)
        self.jobs.mark_failed(job, reason)
        if outcome == "unreadable":
            self.jobs.set_instance_decision(job.sop_instance_uid, "unreadable", reason)
        self.metrics.inc("radvlm_jobs_total", outcome=outcome)
        self.audit.write("study_failed", study_instance_uid=job.study_instance_uid,
                         sop_instance_uid=job.sop_instance_uid, reason=reason)


def model_analyzer(settings: Settings) -> Analyzer:
    """Load the in-process model once; return ``image -> StudyResult``."""
    from inference.model import load_model
    from inference.tasks import run_study

    model = load_model(settings.model)
    return lambda image: run_study(model, image, inference_for_study(settings.inference))

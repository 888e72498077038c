"""The node process: SCP + selection loop + inference workers + outbox + HTTP endpoint.

``Node(settings).start()`` brings everything up on the data directory (which it locks: one node
per directory); ``stop()`` is the graceful path used on SIGTERM: stop accepting associations,
let running jobs finish within ``grace_seconds`` (or release their leases), stop the outbox.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from config.settings import Settings
from dicom_node.audit import AuditLog
from dicom_node.demo_safety import startup_warning
from dicom_node.errors import DataDirLockedError, OutOfSpaceError, PortInUseError
from dicom_node.health import ComponentHealth
from dicom_node.httpapi import create_node_app, start_http_server
from dicom_node.identity import Pseudonymizer, load_or_create_key
from dicom_node.jobstore import JobStore
from dicom_node.metrics import node_metrics
from dicom_node.outbox import Outbox
from dicom_node.phi import install_log_redaction
from dicom_node.scheduler import SelectionLoop
from dicom_node.scp import StorageSCP
from dicom_node.spool import Spool
from dicom_node.study_images import StudyImages
from dicom_node.worker import Analyzer, InferenceWorker
from inference.chat_service import ChatService
from inference.model import RadVLMModel
from inference.remote import RemoteBackend
from inference.serving import ThreadedServer

log = logging.getLogger(__name__)


def _port_problem(bind: str, port: int) -> str | None:
    """Why ``bind:port`` cannot be listened on now (in use, not permitted), else None. Port 0 is free."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve the bind address {bind!r}: {exc.strerror}"
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no problem
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "already in use by another program"
            return exc.strerror or str(exc)
    return None


def check_data_dir_free(settings: Settings) -> None:
    """DataDirLockedError when another node holds the data directory (checked without creating it)."""
    data_dir = Path(settings.node.data_dir)
    try:
        fd = os.open(data_dir / "node.lock", os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        raise DataDirLockedError(f"another radvlm node is already running on {data_dir}") from exc
    finally:
        os.close(fd)  # releases the probe's lock


def check_ports(settings: Settings) -> None:
    """PortInUseError naming the first of the node's ports (DICOM, then HTTP) that cannot be opened;
    called before anything is created, so a refused start leaves no data directory behind."""
    node = settings.node
    ports = [("DICOM", node.bind, node.port)] + ([("HTTP", node.http_bind, node.http_port)] if node.http_enabled else [])
    for what, bind, port in ports:
        problem = _port_problem(bind, port)
        if problem:
            setting = "[node] port" if what == "DICOM" else "[node] http_port"
            raise PortInUseError(f"cannot listen on the {what} port {bind}:{port}: {problem} "
                                 f"(stop the other program or change {setting})")


def jobstore_path(settings: Settings) -> Path:
    return Path(settings.node.data_dir) / "jobs.sqlite3"


def audit_path(settings: Settings) -> Path:
    return settings.node.audit_log or Path(settings.node.data_dir) / "audit.jsonl"


class Node:
    def __init__(self, settings: Settings, analyze: Analyzer | None = None) -> None:
        self.settings = settings
        self.data_dir = Path(settings.node.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.data_dir / "node.lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._lock_fd)
            raise DataDirLockedError(f"another radvlm node is already running on {self.data_dir}") from exc
        os.ftruncate(self._lock_fd, 0)
        os.write(self._lock_fd, f"{os.getpid()}\n".encode())
        install_log_redaction()
        self.metrics = node_metrics()
        self.components = ComponentHealth()
        self.jobs = JobStore(jobstore_path(settings))
        self.audit = AuditLog(audit_path(settings))
        self.spool = Spool(self.data_dir / "spool", settings.node.min_free_space_mb * 2**20)
        self.pseudo = Pseudonymizer(load_or_create_key(self.data_dir / "audit.key"))
        self.stop_event = threading.Event()
        self.analyze = analyze
        self.remote: RemoteBackend | None = None  # [inference] backend = "remote"
        self.workers: list[InferenceWorker] = []
        self.scp = StorageSCP(settings.node, self.spool, self.jobs, self.audit, self.pseudo, self.metrics)
        self.selector = SelectionLoop(self.jobs, self.audit, self.metrics, settings.node.quiet_period_seconds,
                                      settings.node.poll_interval_seconds, self.stop_event,
                                      on_selected=self._wake_workers, health=self.components)
        self.selector.rules, self.selector.destinations = settings.rules, settings.destinations
        self.outbox = Outbox(settings, self.jobs, self.audit, self.metrics, self.stop_event)
        self.outbox.health = self.components
        self.http: ThreadedServer | None = None
        self._model: RadVLMModel | None = None
        self._model_load_lock = threading.Lock()
        self.model_lock = threading.Lock()  # one generation at a time: workers and the chat API
        self.chat = ChatService(self.load_model, lock=self.model_lock, cache_size=settings.api.image_cache_size)
        self.study_images = StudyImages(self.jobs, allow_colour=settings.inference.allow_colour)
        self.scp_port: int | None = None
        self.http_port: int | None = None
        self.metrics.gauges(self._state_gauges)
        self._stopped = False
        self.config_loader: Callable[[], Settings] | None = None  # re-reads the file (SIGHUP, /api/rules/reload)
        self._reload_lock = threading.Lock()

    def load_model(self) -> RadVLMModel:
        """The in-process model, loaded once and shared by the workers and the chat API."""
        with self._model_load_lock:
            if self._model is None:
                from inference.model import load_model

                self._model = load_model(self.settings.model)
            return self._model

    def _wake_workers(self) -> None:
        for worker in self.workers:
            worker.wake.set()

    def _state_gauges(self) -> list:
        counts = self.jobs.counts()
        rows = [("radvlm_studies", "studies by job state", (("state", s),), float(n))
                for s, n in counts["studies"].items()]
        rows += [("radvlm_deliveries", "deliveries by state", (("state", s),), float(n))
                 for s, n in counts["deliveries"].items()]
        rows.append(("radvlm_spool_free_bytes", "free bytes in the data directory", (), float(self.spool.free_bytes())))
        return rows

    def health(self) -> dict:
        checks: dict[str, object] = {}
        try:
            self.jobs.counts()
            checks["job_store"] = "ok"
        except Exception as exc:
            checks["job_store"] = f"error: {exc}"
        try:
            self.spool.check_room(0)
            checks["disk"] = "ok"
        except OutOfSpaceError as exc:
            checks["disk"] = str(exc)
        checks["scp"] = "ok" if self.scp_port is not None and not self._stopped else "stopped"
        alive = sum(w.is_alive() for w in self.workers)
        checks["workers"] = f"{alive}/{len(self.workers)} alive"
        checks["outbox"] = "ok" if self.outbox.is_alive() else "stopped"
        if checks["disk"] == "ok" and self.scp.refusing_for_space():
            checks["disk"] = "every instance since the last stored one was refused: not enough free space for it"
        for component, reason in self.components.failing_components().items():
            checks[component] = reason if component not in checks else f"{checks[component]}; {reason}"
        stalled = self._selection_stalled()
        if stalled:
            checks["selector"] = stalled
        if self.remote is not None:
            endpoints = self.remote.health()
            if not any(state == "ok" for state in endpoints.values()):
                checks["inference_endpoints"] = "none healthy: " + "; ".join(f"{u}: {r}" for u, r in endpoints.items())
        healthy = (checks["job_store"] == "ok" and checks["disk"] == "ok" and checks["scp"] == "ok"
                   and alive == len(self.workers) and checks["outbox"] == "ok"
                   and all(str(c) == "ok" or str(c).endswith("alive") for c in checks.values()))
        return {"status": "ok" if healthy else "degraded", "ae_title": self.settings.node.ae_title,
                "scp_port": self.scp_port, "checks": checks}

    def _selection_stalled(self) -> str | None:
        """Selection is wedged when a study waits longer than the quiet period + selection_stall_seconds."""
        node = self.settings.node
        try:
            waiting = self.jobs.studies_ready(node.quiet_period_seconds + node.selection_stall_seconds)
        except Exception:
            return None  # reported as the job store check
        if not waiting:
            return None
        return (f"{len(waiting)} studies waiting for selection longer than {node.selection_stall_seconds:.0f}s"
                " after their quiet period")

    def start(self) -> "Node":
        node = self.settings.node
        warning = startup_warning(self.settings)
        if warning:
            log.warning("*" * 100)
            log.warning(warning)
            log.warning("*" * 100)
            self.audit.write("demonstration_model", model_path=str(self.settings.model.path),
                             allow_demo_model_delivery=node.allow_demo_model_delivery)
        removed = self.spool.clean_incomplete()
        orphans = self.spool.remove_orphans(self.jobs.is_recorded)
        released, resent = self.jobs.release_all_leases()
        if removed or orphans or released or resent:
            log.info("recovery: removed %d incomplete and %d unrecorded spool files, released %d job and %d"
                     " delivery leases", removed, orphans, released, resent)
        if orphans:
            self.audit.write("spool_swept", removed_unrecorded=orphans, removed_incomplete=removed)
        model_lock: threading.Lock | None = self.model_lock
        if node.workers and self.analyze is None:
            from dicom_node.rules import inference_for_study
            from inference.tasks import run_study

            inference = self.settings.inference
            if inference.backend == "remote":  # studies go to GPU endpoints, several at once (docs/scaling.md)
                self.remote = backend = RemoteBackend(inference, self.settings.model)
                self.analyze = lambda image: run_study(backend, image, inference_for_study(inference))
                model_lock = None  # each worker its own lock: no serialisation in the node
            else:
                model = self.load_model()
                self.analyze = lambda image: run_study(model, image, inference_for_study(inference))
        self.workers = [InferenceWorker(i, self.settings, self.jobs, self.audit, self.metrics, self.analyze,
                                        self.stop_event, model_lock, on_written=self.outbox.wake.set,
                                        health=self.components)
                        for i in range(node.workers)] if self.analyze is not None else []
        for worker in self.workers:
            worker.start()
        self.selector.start()
        self.outbox.start()
        try:
            self.scp_port = self.scp.start()
        except OSError as exc:
            self._abort_start()
            raise PortInUseError(f"cannot listen on the DICOM port {node.bind}:{node.port}: "
                                 f"{exc.strerror or exc} (stop the other program or change [node] port)") from exc
        if node.http_enabled:
            app = create_node_app(self.settings, self.health, self.metrics.render, self.jobs, self.chat,
                                  self.study_images)
            from dicom_node.rules import rules_router

            app.include_router(rules_router(self.settings.api, lambda: self.settings.rules, self.reload_from_config))
            try:
                self.http = start_http_server(app, node.http_bind, node.http_port)
            except OSError as exc:
                self._abort_start()
                raise PortInUseError(f"cannot listen on the HTTP port {node.http_bind}:{node.http_port}: "
                                     f"{exc.strerror or exc} (stop the other program or change [node] http_port)"
                                     ) from exc
            self.http_port = self.http.port
        self.audit.write("node_started", ae_title=node.ae_title, scp_port=self.scp_port, http_port=self.http_port,
                         pid=os.getpid())
        return self

    def _abort_start(self) -> None:
        """A start that failed half-way: stop what runs, release the data directory."""
        try:
            self.stop(grace_seconds=1.0)
        except Exception:  # the original failure is the one to report
            log.exception("error while undoing a failed start")

    def stop(self, grace_seconds: float = 30.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        log.info("stopping: no new associations; waiting up to %.0fs for running jobs", grace_seconds)
        self.scp.stop()
        self.stop_event.set()
        for worker in self.workers:
            worker.wake.set()
        self.outbox.wake.set()
        deadline = time.monotonic() + grace_seconds
        for worker in self.workers:
            worker.join(max(deadline - time.monotonic(), 0.1))
            job = worker.current
            if worker.is_alive() and job is not None:
                self.jobs.release_job(job, "node stopped before the job finished")
        self.selector.join(5)
        self.outbox.join(max(deadline - time.monotonic(), 1))
        if self.http is not None:
            self.http.stop()
        if self.remote is not None:
            self.remote.close()
        self.audit.write("node_stopped", pid=os.getpid())
        self.audit.close()
        self.jobs.close()
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)

    def reload_from_config(self) -> list:
        """Re-read the configuration (``config_loader``: set by ``serve_forever``) and put its rules
        in force; raises ConfigError (the rules in force stay) or ReloadUnavailableError."""
        from dicom_node.rules import ReloadUnavailableError

        if self.config_loader is None:
            raise ReloadUnavailableError("this node was not started from a configuration file (radvlm serve):"
                                         " there is nothing to re-read")
        with self._reload_lock:
            settings = self.config_loader()
            self.reload_rules(settings)
        return settings.rules

    def reload_rules(self, settings: Settings) -> None:
        """Put ``settings.rules`` in force for the studies decided from now on (associations, queued
        jobs and the other settings are untouched). The worker reads a study's tasks and destinations
        from the routing recorded at selection, so a study already selected keeps its rule."""
        self.settings.rules = settings.rules
        self.selector.rules = settings.rules
        names = ", ".join(f"{i}:{r.name}" for i, r in enumerate(settings.rules))
        log.info("routing rules reloaded: %s", names)
        self.audit.write("rules_reloaded", rules=[r.name for r in settings.rules])

    def serve_forever(self, grace_seconds: float = 30.0,
                      reload: Callable[[], Settings] | None = None) -> None:
        """Run until SIGTERM/SIGINT, then stop gracefully. SIGHUP: ``reload()`` the configuration and
        put its routing rules in force; an invalid file keeps the rules in force (the error is logged)."""
        stop, hangup = threading.Event(), threading.Event()

        def _signal(signum: int, _frame: object) -> None:
            log.info("received %s", signal.Signals(signum).name)
            stop.set()

        def _hangup(_signum: int, _frame: object) -> None:
            hangup.set()

        previous = {sig: signal.signal(sig, _signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        if reload is not None:
            self.config_loader = reload  # also POST /api/rules/reload
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, _hangup)
        try:
            while not stop.wait(0.2):
                if hangup.is_set():
                    hangup.clear()
                    try:
                        self.reload_from_config()
                    except Exception as exc:  # ConfigError names the rule and field
                        log.error("SIGHUP: configuration not reloaded, the rules in force stay: %s", exc)
        finally:
            self.stop(grace_seconds)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

"""The node with ``[inference] backend = "remote"`` against real `radvlm worker` processes on loopback
(issue 15): results equal to the in-process model's, a worker killed in the middle of a study, a
worker that accepts and never answers, every endpoint down (deferred, never half-written), and the
captured requests carry pixels and prompts only.

The workers serve the shipped phantom demo model (12 MB, ~0.3 s a study on CPU): unlike the tiny
random model it answers the classification with labels, so every study also asks grounding
questions, concurrently (``ask_all``). Between the node and each worker sits a capturing loopback
proxy that forwards requests unchanged and records them (and, per test, kills its worker at a
given request or holds POSTs unanswered).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from config.settings import DEMO_MODEL_DIR, ModelSettings, Settings
from dicom_node.audit import read_audit
from dicom_node.service import Node
from inference.image import image_from_dataset
from inference.remote import png_data_url
from inference.result import StudyResult
from tests.conftest_node import free_port, storescu, wait_for
from tests.dicom_samples import chest_phantom, make_cr_dataset, write

TOKEN = "remote-worker-token-15"
ALLOWED_HEADERS = {"host", "accept-encoding", "content-type", "content-length", "authorization"}
SIZES = [(256, 208), (240, 200), (224, 176), (288, 232), (208, 208), (272, 224)]


# ---- real workers and a capturing proxy ------------------------------------------------------
class Worker:
    """`python -m dicom_node worker` (= `radvlm worker`) serving the demo model on a loopback port."""

    def __init__(self, log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "worker", "--model", str(DEMO_MODEL_DIR), "--host", "127.0.0.1",
             "--port", str(self.port), "--token", TOKEN], stdout=subprocess.PIPE, stderr=self.log, env=env)

    def wait_ready(self, timeout: float = 90.0) -> "Worker":
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        assert b'"ready"' in line, f"worker did not start: {line!r}"
        return self

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


@dataclass(frozen=True)
class Captured:
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def raw(self) -> bytes:
        head = "".join(f"{name}: {value}\n" for name, value in self.headers)
        return f"{self.method} {self.path}\n{head}\n".encode() + self.body

    def json(self) -> dict:
        return json.loads(self.body)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_ProxyServer"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        proxy = self.server.proxy
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        posts = proxy.record(Captured(self.command, self.path, tuple(self.headers.items()), body))
        if self.command == "POST":
            if proxy.hang_posts:  # accept, read, never answer
                proxy.closed.wait()
                self.close_connection = True
                return
            if proxy.before_post is not None:
                proxy.before_post(posts)
        counted = 1 if self.command == "POST" else 0  # questions in flight (health checks aside)
        proxy.in_flight(counted)
        try:
            upstream = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=60)
            upstream.request(self.command, self.path, body=body or None,
                             headers={k: v for k, v in self.headers.items()
                                      if k.lower() in ("authorization", "content-type")})
            response = upstream.getresponse()
            data = response.read()
            upstream.close()
        except OSError:  # the worker is gone: the connection drops unanswered, as the worker's would
            self.close_connection = True
            return
        finally:
            proxy.in_flight(-counted)
        self.send_response(response.status)
        self.send_header("Content-Type", response.getheader("Content-Type") or "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    proxy: "CapturingProxy"


class CapturingProxy:
    """Forwards to a worker on ``target_port`` and records every request it gets."""

    def __init__(self, target_port: int, *, port: int = 0, hang_posts: bool = False,
                 before_post: Callable[[int], None] | None = None) -> None:
        self.target_port, self.hang_posts, self.before_post = target_port, hang_posts, before_post
        self.requests: list[Captured] = []
        self._in_flight = self.max_in_flight = 0
        self.closed = threading.Event()
        self._lock = threading.Lock()
        self._server = _ProxyServer(("127.0.0.1", port), _ProxyHandler)
        self._server.proxy = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def in_flight(self, delta: int) -> None:
        with self._lock:
            self._in_flight += delta
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def record(self, request: Captured) -> int:
        with self._lock:
            self.requests.append(request)
            return sum(r.method == "POST" for r in self.requests)

    @property
    def posts(self) -> list[Captured]:
        with self._lock:
            return [r for r in self.requests if r.method == "POST"]

    def close(self) -> None:
        self.closed.set()
        self._server.shutdown()
        self._server.server_close()


# ---- helpers ---------------------------------------------------------------------------------
def remote_settings(tmp_path: Path, urls: list[str], *, workers: int = 2, **inference: object) -> Settings:
    return Settings.model_validate({
        "model": {"path": str(DEMO_MODEL_DIR)},
        "inference": {"backend": "remote", "max_grounding_questions": 4, "health_check_seconds": 0.3,
                      "unavailable_retry_seconds": 0.5, "request_timeout_seconds": 30,
                      "endpoints": [{"url": url, "token": TOKEN, "max_concurrent": 4} for url in urls],
                      **inference},
        "node": {"data_dir": str(tmp_path / "data"), "port": free_port(), "bind": "127.0.0.1",
                 "http_enabled": False, "min_free_space_mb": 0, "quiet_period_seconds": 0.3,
                 "poll_interval_seconds": 0.1, "workers": workers},
        "destinations": [{"kind": "folder", "path": str(tmp_path / "out"), "name": "archive"}],
    })


def make_studies(tmp_path: Path, count: int, tag: str) -> list[tuple[pydicom.Dataset, Path]]:
    """``count`` one-image studies with distinctive header values (names, IDs, accession, institution)."""
    studies = []
    for index in range(count):
        rows, columns = SIZES[index % len(SIZES)]
        ds = make_cr_dataset(rows=rows, columns=columns, pixel_array=chest_phantom(rows, columns),
                             patient_name=f"Leakcheck^{tag}{index}", patient_id=f"PID-{tag}-{index:04d}",
                             AccessionNumber=f"ACC{tag}{index:05d}", InstitutionName=f"Hospital {tag} Leakville",
                             PatientBirthDate="19470311", ReferringPhysicianName=f"Referrer^{tag}{index}",
                             StudyID=f"SID{tag}{index}")
        studies.append((ds, write(ds, tmp_path / f"secret-file-name-{tag}-{index}.dcm")))
    return studies


def send_and_wait(node: Node, studies: list[tuple[pydicom.Dataset, Path]], timeout: float = 120) -> None:
    sent = storescu(node.scp_port, [path for _, path in studies], calling="PACS")
    assert sent.returncode == 0, sent.stderr
    uids = [ds.StudyInstanceUID for ds, _ in studies]
    wait_for(lambda: all((node.jobs.study(uid) or {"state": None})["state"] == "delivered" for uid in uids),
             timeout, what="every study delivered")


def node_result(settings: Settings, ds: pydicom.Dataset) -> StudyResult:
    path = settings.node.data_dir / "results" / ds.StudyInstanceUID / "result.json"
    return StudyResult.model_validate_json(path.read_text())


def assert_same_answers(remote: StudyResult, local: StudyResult) -> None:
    assert remote.model == local.model
    assert remote.findings_text == local.findings_text
    assert remote.labels == local.labels
    assert remote.regions == local.regions
    assert [(a.task, a.question, a.answer, a.new_tokens) for a in remote.answers] == \
        [(a.task, a.question, a.answer, a.new_tokens) for a in local.answers]


def assert_delivered_once(settings: Settings, studies: list[tuple[pydicom.Dataset, Path]]) -> None:
    events = read_audit(settings.node.data_dir / "audit.jsonl")
    written = Counter(e["study_instance_uid"] for e in events if e["event"] == "result_written")
    delivered = Counter(e["study_instance_uid"] for e in events if e["event"] == "delivered")
    for ds, _ in studies:
        assert written[ds.StudyInstanceUID] == 1 and delivered[ds.StudyInstanceUID] == 1
        assert (settings.destinations[0].path / ds.StudyInstanceUID / "sr.dcm").is_file()


def image_url(request: Captured) -> str:
    return request.json()["messages"][0]["content"][0]["image_url"]["url"]


def question(request: Captured) -> str:
    return request.json()["messages"][0]["content"][1]["text"]


@pytest.fixture(scope="module")
def workers(tmp_path_factory) -> list[Worker]:
    logs = tmp_path_factory.mktemp("worker-logs")
    started = [Worker(logs / "a.log"), Worker(logs / "b.log")]
    try:
        yield [worker.wait_ready() for worker in started]
    finally:
        for worker in started:
            worker.stop()


@pytest.fixture(scope="module")
def local_model():
    from inference.model import load_model

    return load_model(ModelSettings(path=DEMO_MODEL_DIR))


def local_result(model, ds: pydicom.Dataset, settings: Settings) -> StudyResult:
    from inference.tasks import run_study

    return run_study(model, image_from_dataset(ds), settings.inference)


# ---- a batch through two workers -------------------------------------------------------------
@dataclass
class BatchRun:
    settings: Settings
    studies: list[tuple[pydicom.Dataset, Path]]
    proxies: list[CapturingProxy]
    health: dict[str, str]


@pytest.fixture(scope="module")
def batch(tmp_path_factory, workers) -> BatchRun:
    tmp_path = tmp_path_factory.mktemp("batch")
    proxies = [CapturingProxy(worker.port) for worker in workers]
    settings = remote_settings(tmp_path, [proxy.url for proxy in proxies], workers=4)
    studies = make_studies(tmp_path, 4, "B")
    node = Node(settings).start()
    try:
        send_and_wait(node, studies)
        health = node.remote.health()
    finally:
        node.stop(grace_seconds=10)
        for proxy in proxies:
            proxy.close()
    return BatchRun(settings, studies, proxies, health)


def test_batch_through_two_workers_equals_the_local_backend(batch, local_model):
    for ds, _ in batch.studies:
        remote = node_result(batch.settings, ds)
        assert any(region.boxes for region in remote.regions) or remote.labels
        assert_same_answers(remote, local_result(local_model, ds, batch.settings))
    assert_delivered_once(batch.settings, batch.studies)
    assert set(batch.health.values()) == {"ok"}
    # studies spread over both workers; all questions of one study went to one worker
    per_proxy = [{image_url(r) for r in proxy.posts} for proxy in batch.proxies]
    assert all(per_proxy) and not per_proxy[0] & per_proxy[1]
    assert len(per_proxy[0] | per_proxy[1]) == len(batch.studies)
    # the grounding questions went out together, never more than max_concurrent (4) to one endpoint
    assert all(1 <= proxy.max_in_flight <= 4 for proxy in batch.proxies), [p.max_in_flight for p in batch.proxies]
    assert max(proxy.max_in_flight for proxy in batch.proxies) > 1


def test_captured_requests_carry_pixels_and_prompts_only(batch):
    requests = [r for proxy in batch.proxies for r in proxy.requests]
    assert sum(r.method == "POST" for r in requests) >= 3 * len(batch.studies)
    secrets: set[str] = set()
    for ds, path in batch.studies:
        secrets |= {path.name, path.stem, str(path.parent)}
        for element in [*ds.file_meta, *ds]:
            if element.VR in ("UI", "PN", "LO", "SH", "DA", "TM", "DT", "CS", "ST", "LT") and element.value:
                value = str(element.value)
                if element.VR in ("UI", "PN", "LO", "SH", "DA") and len(value) >= 6:
                    secrets.add(value)
    assert any("Leakcheck" in s for s in secrets) and any(s.startswith("1.2") for s in secrets)
    pixels = {image_from_dataset(ds).pixels.tobytes() for ds, _ in batch.studies}
    for request in requests:
        assert {name.lower() for name, _ in request.headers} <= ALLOWED_HEADERS, request.headers
        raw = request.raw
        for part in raw.split(b"base64,")[1:]:  # also inside the encoded image
            raw += base64.b64decode(part.split(b'"', 1)[0])
        leaked = [s for s in secrets if s.encode() in raw]
        assert not leaked, f"{request.method} {request.path} carries {leaked}"
        if request.method == "GET":
            assert request.path == "/v1/models" and not request.body
            continue
        body = request.json()
        assert set(body) == {"model", "messages", "temperature", "max_tokens"} and body["temperature"] == 0
        [message] = body["messages"]
        image_part, text_part = message["content"]
        assert text_part["type"] == "text" and image_part["type"] == "image_url"
        url = image_part["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        png = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert not png.info.get("text") and not {k for k in png.info if k not in ("dpi", "gamma")}
        assert np.asarray(png).tobytes() in pixels  # the windowed 8-bit image at its original size


# ---- failures ----------------------------------------------------------------------------------
def test_worker_killed_mid_study_every_study_delivered_once(tmp_path, workers, local_model):
    doomed = Worker(tmp_path / "doomed.log").wait_ready()

    def kill_at_third_question(posts: int) -> None:
        if posts == 3:  # the first study's report and classification were answered by this worker
            doomed.kill()

    proxies = [CapturingProxy(doomed.port, before_post=kill_at_third_question), CapturingProxy(workers[1].port)]
    settings = remote_settings(tmp_path, [proxy.url for proxy in proxies], workers=2)
    studies = make_studies(tmp_path, 3, "K")
    node = Node(settings).start()
    try:
        send_and_wait(node, studies)
        health = node.remote.health()
    finally:
        node.stop(grace_seconds=10)
        for proxy in proxies:
            proxy.close()
        doomed.stop()
    assert doomed.proc.returncode == -signal.SIGKILL
    assert_delivered_once(settings, studies)
    for ds, _ in studies:
        assert_same_answers(node_result(settings, ds), local_result(local_model, ds, settings))
    [killed_name] = [name for name in health if str(proxies[0].port) in name]
    assert health[killed_name] != "ok" and health[next(n for n in health if n != killed_name)] == "ok"
    # the study cut short on the killed worker finished on the other one, without going back to the
    # queue and without asking again what the killed worker had answered
    [cut] = {image_url(r) for r in proxies[0].posts}
    answered = [question(r) for r in proxies[0].posts[:2]]
    rest = [question(r) for r in proxies[1].posts if image_url(r) == cut]
    assert rest and not set(answered) & set(rest)
    [cut_study] = [ds for ds, _ in studies if png_data_url(image_from_dataset(ds)) == cut]
    assert len(answered) + len(rest) == len(node_result(settings, cut_study).answers)
    assert not [e for e in read_audit(settings.node.data_dir / "audit.jsonl") if e["event"] == "study_deferred"]


def test_hung_worker_times_out_and_the_study_completes_on_the_other(tmp_path, workers, local_model):
    # answers /v1/models (health checks pass) but accepts chat requests and never answers them
    proxies = [CapturingProxy(workers[0].port, hang_posts=True), CapturingProxy(workers[1].port)]
    settings = remote_settings(tmp_path, [proxy.url for proxy in proxies], workers=1, request_timeout_seconds=6)
    studies = make_studies(tmp_path, 2, "H")
    node = Node(settings).start()
    started = time.monotonic()
    try:
        send_and_wait(node, studies)
    finally:
        node.stop(grace_seconds=10)
        for proxy in proxies:
            proxy.close()
    assert time.monotonic() - started >= 6
    assert proxies[0].posts, "the hung endpoint was never tried"
    assert len({image_url(r) for r in proxies[1].posts}) == len(studies)
    # each study waited for the hung endpoint once, then went on with the other, never back to the queue
    assert all(n == 1 for n in Counter(image_url(r) for r in proxies[0].posts).values())
    assert not [e for e in read_audit(settings.node.data_dir / "audit.jsonl") if e["event"] == "study_deferred"]
    assert_delivered_once(settings, studies)
    for ds, _ in studies:
        assert_same_answers(node_result(settings, ds), local_result(local_model, ds, settings))


def test_every_endpoint_down_defers_the_study_uncounted_until_one_answers(tmp_path, workers, local_model):
    port = free_port()  # nothing listens here yet: connection refused
    settings = remote_settings(tmp_path, [f"http://127.0.0.1:{port}"], workers=1)
    studies = make_studies(tmp_path, 1, "D")
    [(ds, path)] = studies
    study = ds.StudyInstanceUID
    node = Node(settings).start()
    proxy = None
    try:
        assert storescu(node.scp_port, [path], calling="PACS").returncode == 0
        row = wait_for(lambda: (lambda r: r if r and r["reason"] and "unavailable" in r["reason"] else None)(
            node.jobs.study(study)), 30, what="the study deferred")
        assert row["state"] == "selected" and row["attempts"] == 0
        assert "connection refused" in row["reason"]
        health = node.health()
        assert health["status"] == "degraded" and "connection refused" in health["checks"]["inference_endpoints"]
        time.sleep(1.5)  # taken again (every 0.5 s) and deferred again: never counted, never written
        row = node.jobs.study(study)
        assert row["state"] == "selected" and row["attempts"] == 0
        assert not (settings.node.data_dir / "results" / study).exists()
        proxy = CapturingProxy(workers[0].port, port=port)  # the endpoint comes up
        wait_for(lambda: node.jobs.study(study)["state"] == "delivered", 60, what="delivery once the endpoint is up")
    finally:
        node.stop(grace_seconds=10)
        if proxy is not None:
            proxy.close()
    assert_delivered_once(settings, studies)
    assert_same_answers(node_result(settings, ds), local_result(local_model, ds, settings))
    deferred = [e for e in read_audit(settings.node.data_dir / "audit.jsonl") if e["event"] == "study_deferred"]
    assert deferred and all("inference backend unavailable" in e["reason"] for e in deferred)


# ---- the backend on its own, and the worker's health --------------------------------------------
def backend_for(url: str, **settings: object):
    from config.settings import InferenceSettings
    from inference.remote import RemoteBackend

    model = {k: settings.pop(k) for k in ("version", "model_id") if k in settings}
    inference = InferenceSettings(backend="remote", endpoints=[{"url": url, "token": TOKEN}], **settings)
    return RemoteBackend(inference, ModelSettings(path=DEMO_MODEL_DIR, **model), health_checks=False), inference


def test_endpoint_serving_another_version_is_kept_out(workers):
    from inference.backend import BackendUnavailableError

    backend, inference = backend_for(f"http://127.0.0.1:{workers[0].port}", version="radvlm-7b-1.0")
    with pytest.raises(BackendUnavailableError, match=r"serves version phantom-v1, \[model\] version is radvlm-7b"):
        with backend.open_study(image_from_dataset(make_cr_dataset()), inference):
            pass
    assert "phantom-v1" in next(iter(backend.health().values()))


def test_refused_question_is_a_model_error_and_study_timeout_defers(workers):
    from inference.backend import BackendUnavailableError
    from inference.errors import ModelError
    from inference.remote import RemoteRequestError

    image = image_from_dataset(make_cr_dataset())
    backend, inference = backend_for(f"http://127.0.0.1:{workers[0].port}")
    with backend.open_study(image, inference) as study:
        with pytest.raises(RemoteRequestError, match="HTTP 400.*reserved token") as caught:
            study.ask("Where is the <image> located in this Chest X-ray?")  # refused the same everywhere
        assert isinstance(caught.value, ModelError)
        assert study.ask("Are there any abnormalities on this Chest X-ray?").text
    assert set(backend.health().values()) == {"ok"}  # a refused question does not make the endpoint unhealthy
    backend, inference = backend_for(f"http://127.0.0.1:{workers[0].port}", study_timeout_seconds=0.001)
    with backend.open_study(image, inference) as study:
        time.sleep(0.01)
        with pytest.raises(BackendUnavailableError, match="study_timeout_seconds"):
            study.ask("Are there any abnormalities on this Chest X-ray?")


def test_worker_healthz_reports_the_resident_model_or_503(workers, tmp_path):
    from config.settings import ApiSettings
    from inference.api import create_app
    from inference.chat_service import ChatService
    from inference.model import load_model
    from inference.serving import ThreadedServer

    connection = http.client.HTTPConnection("127.0.0.1", workers[0].port, timeout=10)
    connection.request("GET", "/healthz")
    response = connection.getresponse()
    body = json.loads(response.read())
    assert response.status == 200 and body["status"] == "ok" and body["version"] == "phantom-v1"
    assert len(body["weights_sha256"]) == 64
    missing = ChatService(lambda: load_model(ModelSettings(path=tmp_path / "no-such-model")))
    server = ThreadedServer(create_app(missing, ApiSettings(token=TOKEN)), "127.0.0.1", 0)
    server.start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        body = json.loads(response.read())
    finally:
        server.stop()
    assert response.status == 503 and body["status"] == "unavailable" and "no-such-model" in body["reason"]

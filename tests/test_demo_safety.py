"""Safe by default (issue 11 item 5): the shipped phantom demo model is recognised however its
path is spelt, its results say DEMONSTRATION PHANTOM MODEL in every SR/GSPS series description and
in the FHIR text, and they reach a PACS/EHR destination only when a setting allows it — through a
real `radvlm serve` process and a real dcmtk storescp on loopback. Folder destinations are not
affected (`radvlm demo` keeps working: tests/test_demo_model.py)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from config import load_settings
from config.settings import DEMO_MODEL_DIR, Settings
from dicom_node.audit import read_audit
from dicom_node.commands import list_jobs, list_outbox
from dicom_node.demo_safety import startup_warning
from dicom_node.service import Node
from inference.demo_model import PHANTOM_V1, demonstration_reason
from inference.model_folder import weights_sha256
from inference.result import DEMONSTRATION_LABEL, DEMONSTRATION_SERIES_DESCRIPTION
from tests.conftest_node import free_port, need_tool, storescu, wait_for

ROOT = Path(__file__).resolve().parent.parent


# ---- recognising the demo model ------------------------------------------------------------
def test_demo_model_recognised_whatever_the_path_spelling(tmp_path, monkeypatch):
    assert DEMO_MODEL_DIR.resolve() == PHANTOM_V1
    monkeypatch.chdir(ROOT)
    for spelling in ("inference/demo_model/phantom-v1", "./inference/demo_model/phantom-v1/",
                     "inference/../inference/demo_model/phantom-v1", str(PHANTOM_V1)):
        assert demonstration_reason(spelling), spelling
    link = tmp_path / "my-model"
    link.symlink_to(PHANTOM_V1, target_is_directory=True)
    assert demonstration_reason(link)


def test_renamed_copy_recognised_by_version_and_by_weights_hash(tmp_path, tiny_model_dir):
    copy = shutil.copytree(PHANTOM_V1, tmp_path / "radvlm-7b", ignore=shutil.ignore_patterns("recipe"))
    assert "radvlm_version 'phantom-v1'" in demonstration_reason(copy)
    config = json.loads((copy / "config.json").read_text())
    config.pop("radvlm_version")
    (copy / "config.json").write_text(json.dumps(config))
    assert "weights of the shipped phantom demo model" in demonstration_reason(copy)
    # the hash the check compares with is the one of the shipped weights
    recorded = json.loads((PHANTOM_V1 / "metrics.json").read_text())["weights_sha256"]
    assert weights_sha256([PHANTOM_V1 / "model.safetensors"]) == recorded
    assert demonstration_reason(tiny_model_dir) is None  # random weights: not the demo model


def test_startup_warning_only_for_the_demo_model(tiny_model_dir):
    settings = Settings.model_validate({"destinations": [
        {"kind": "dicom", "host": "127.0.0.1", "port": 104, "ae_title": "PACS", "name": "pacs"},
        {"kind": "folder", "path": "/tmp/x"}]})
    warning = startup_warning(settings)
    assert warning and "DEMONSTRATION PHANTOM MODEL" in warning and "deliveries to pacs will be refused" in warning
    settings.node.allow_demo_model_delivery = True
    assert "WILL be sent to pacs" in startup_warning(settings)
    settings.model.path = tiny_model_dir
    assert startup_warning(settings) is None


# ---- through a real node --------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom_study_files(tmp_path_factory) -> list[Path]:
    """Files of one held-out phantom study (frontal, maybe a lateral) on which the demo model finds
    something with a box, so that the node writes a GSPS too."""
    from config.settings import InferenceSettings, ModelSettings
    from inference.image import load_image
    from inference.model import load_model
    from inference.tasks import run_study
    from training.phantoms.dataset import write_phantom_dataset
    from training.phantoms.sampler import PhantomConfig

    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(root, 12, 1000, config=PhantomConfig(size=128), png=False, variants="canonical",
                          tasks=("report",))
    model = load_model(ModelSettings())
    inference = InferenceSettings(max_grounding_questions=3)
    for line in (root / "truth.jsonl").read_text().splitlines():
        files = [root / rel for rel in json.loads(line)["dicom"]]
        if any(region.boxes for region in run_study(model, load_image(files[0]), inference).regions):
            break
    else:
        pytest.fail("the demo model drew no box on 12 held-out phantoms")
    return files


def _study_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


class StoreSCP:
    """dcmtk storescp on a free loopback port, writing what it receives into ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = subprocess.Popen([need_tool("storescp"), "-aet", "PACS", "-od", str(folder), "+xa",
                                      str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def received(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in sorted(self.folder.iterdir())]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _config(tmp_path: Path, peer_port: int, allow: bool) -> Path:
    """No [model] section: the embedded default, i.e. the shipped demo model, as a new user runs it."""
    cfg = tmp_path / "radvlm.toml"
    cfg.write_text(f"""
[inference]
max_grounding_questions = 3

[node]
port = {free_port()}
bind = "127.0.0.1"
data_dir = "{tmp_path / 'data'}"
min_free_space_mb = 0
quiet_period_seconds = 0.3
poll_interval_seconds = 0.1
http_port = {free_port()}
allow_demo_model_delivery = {str(allow).lower()}

[[destinations]]
kind = "folder"
path = "{tmp_path / 'out'}"
name = "archive"

[[destinations]]
kind = "dicom"
host = "127.0.0.1"
port = {peer_port}
ae_title = "PACS"
name = "pacs"
""")
    return cfg


def _check_demonstration_labels(folder: Path) -> None:
    sr = pydicom.dcmread(folder / "sr.dcm")
    assert sr.SeriesDescription == DEMONSTRATION_SERIES_DESCRIPTION and len(sr.SeriesDescription) <= 64
    texts = _text_values(sr)  # the TEXT Comment carries the result's notice
    assert any(text.startswith(DEMONSTRATION_LABEL) for text in texts), texts
    gsps = pydicom.dcmread(folder / "gsps.dcm")
    assert gsps.SeriesDescription == DEMONSTRATION_SERIES_DESCRIPTION
    bundle = json.loads((folder / "bundle.json").read_text())
    report = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    text = base64.b64decode(report["presentedForm"][0]["data"]).decode()
    assert text.startswith(DEMONSTRATION_LABEL), text[:200]
    assert DEMONSTRATION_LABEL in report["presentedForm"][0]["title"]
    notes = [n["text"] for e in bundle["entry"] for n in e["resource"].get("note", [])]
    assert notes and any(DEMONSTRATION_LABEL in n for n in notes)
    result = json.loads((folder / "result.json").read_text())
    assert result["model"]["demonstration"] is True and result["notice"].startswith(DEMONSTRATION_LABEL)


def _text_values(ds: pydicom.Dataset) -> list[str]:
    found = []
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            found.append(str(item.TextValue))
        found += _text_values(item)
    return found


def test_serve_with_the_demo_model_warns_labels_and_refuses_pacs_delivery(tmp_path, phantom_study_files):
    peer = StoreSCP(tmp_path / "peer")
    cfg = _config(tmp_path, peer.port, allow=False)
    settings = load_settings(cfg)
    files = phantom_study_files
    study = _study_uid(files)
    log_path = tmp_path / "serve.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    node = subprocess.Popen([sys.executable, "-m", "dicom_node", "serve", "--config", str(cfg), "--grace", "10"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=open(log_path, "ab"), text=True)
    try:
        line = node.stdout.readline()
        assert line, log_path.read_text()[-3000:]
        ready = json.loads(line)
        sent = storescu(ready["scp_port"], files, calling="MODALITY")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_for(lambda: len([d for d in list_outbox(settings) if d["state"] in ("delivered", "dead")])
                 == 2, 180, what="both deliveries to be finished")
        deliveries = {d["destination"]: d for d in list_outbox(settings)}
        # the PACS delivery: refused at once (one try, dead-lettered), with the reason recorded
        assert deliveries["pacs"]["state"] == "dead" and deliveries["pacs"]["tries"] == 1
        reason = deliveries["pacs"]["last_error"]
        assert "DEMONSTRATION PHANTOM MODEL" in reason and "allow_demo_model_delivery" in reason
        row = list_jobs(settings, study_uid=study)[0]
        assert row["state"] == "failed" and "pacs" in row["reason"]
        # the folder destination is unaffected, and carries the labels
        assert deliveries["archive"]["state"] == "delivered"
        _check_demonstration_labels(tmp_path / "out" / study)
        assert peer.received() == []  # nothing ever reached the PACS
    finally:
        node.send_signal(signal.SIGTERM)
        assert node.wait(30) == 0
        peer.stop()
    log_text = log_path.read_text()
    assert "WARNING" in log_text and "DEMONSTRATION PHANTOM MODEL — NOT FOR CLINICAL USE" in log_text
    assert "deliveries to pacs will be refused" in log_text
    assert "copy attributes of module" not in log_text  # highdicom's INFO lines stay out of the node log
    events = read_audit(tmp_path / "data" / "audit.jsonl")
    assert any(e["event"] == "demonstration_model" for e in events)
    refused = [e for e in events if e["event"] == "delivery_refused"]
    assert len(refused) == 1 and refused[0]["destination"] == "pacs"
    assert "DEMONSTRATION PHANTOM MODEL" in refused[0]["error"]


def test_demo_model_delivery_allowed_by_the_setting_reaches_a_real_scp(tmp_path, phantom_study_files):
    peer = StoreSCP(tmp_path / "peer")
    settings = load_settings(_config(tmp_path, peer.port, allow=True))
    files = phantom_study_files
    study = _study_uid(files)
    node = Node(settings).start()
    try:
        sent = storescu(node.scp_port, files, calling="MODALITY")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_for(lambda: list_jobs(settings, study_uid=study) and list_jobs(settings, study_uid=study)[0]["state"]
                 in ("failed", "delivered"), 180, what="the study to be finished")
        assert list_jobs(settings, study_uid=study)[0]["state"] == "delivered", list_outbox(settings)
        received = peer.received()
        sr = pydicom.dcmread(tmp_path / "out" / study / "sr.dcm")
        assert sr.SOPInstanceUID in {r.SOPInstanceUID for r in received}
        assert {r.Modality for r in received} == {"SR", "PR"}
        assert all(r.SeriesDescription == DEMONSTRATION_SERIES_DESCRIPTION for r in received)
    finally:
        node.stop(grace_seconds=10)
        peer.stop()


def test_outbox_refuses_dicomweb_and_fhir_without_contacting_them(tmp_path):
    """The refusal happens before any connection: a real HTTP server on loopback sees no request
    for a demo result; with the setting, the same deliveries reach it; folder: unaffected."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from dicom_node.audit import AuditLog
    from dicom_node.jobstore import InstanceDecision, InstanceRecord, JobStore
    from dicom_node.metrics import node_metrics
    from dicom_node.outbox import Outbox
    from inference.result import ModelInfo, SourceImage, StudyResult

    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            requests.append(self.path)
            self.send_response(503)  # "try later": the delivery stays pending, a try was made
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    results = tmp_path / "results"
    results.mkdir()
    result = StudyResult(model=ModelInfo(model_id="phantom-v1", version="phantom-v1", weights_sha256="ab" * 32,
                                         demonstration=True), source=SourceImage(rows=8, columns=8))
    (results / "result.json").write_text(result.model_dump_json())
    (results / "sr.dcm").write_bytes(b"not sent")
    (results / "bundle.json").write_text("{}")
    try:
        for allow in (False, True):
            data = tmp_path / f"data-{allow}"
            settings = Settings.model_validate({
                "node": {"data_dir": str(data), "allow_demo_model_delivery": allow, "retry_base_seconds": 60},
                "sr": {"fhir_patient_identifier_system": "urn:oid:1.2.3"},
                "destinations": [{"kind": "dicomweb", "url": url + "/dicom-web", "name": "stow"},
                                 {"kind": "fhir", "url": url + "/fhir", "name": "ehr"},
                                 {"kind": "folder", "path": str(tmp_path / f"out-{allow}"), "name": "archive"}]})
            jobs, audit = JobStore(data / "jobs.sqlite3"), AuditLog(data / "audit.jsonl")
            try:
                study, sop = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
                jobs.record_instance(InstanceRecord(sop, "1.2.840.10008.5.1.4.1.1.1", study,
                                                    pydicom.uid.generate_uid(), "CR", None, "x", "0", 0, "PACS",
                                                    None))
                assert jobs.apply_selection(study, jobs.study(study)["last_received_at"], sop, "ViewPosition",
                                            "test", [InstanceDecision(sop, "selected", "test")])
                job = jobs.claim_job("test", 60)
                assert jobs.mark_written(job, str(results), [
                    ("stow", "dicomweb", [str(results / "sr.dcm")]),
                    ("ehr", "fhir", [str(results / "bundle.json")]),
                    ("archive", "folder", [str(results / "sr.dcm"), str(results / "result.json")])])
                outbox = Outbox(settings, jobs, audit, node_metrics(), threading.Event())
                while outbox.run_once():
                    pass
                states = {d.destination: (d.state, d.last_error or "") for d in jobs.deliveries()}
            finally:
                jobs.close()
                audit.close()
            assert states["archive"][0] == "delivered"
            if not allow:
                assert requests == []
                for name in ("stow", "ehr"):
                    assert states[name][0] == "dead" and "DEMONSTRATION PHANTOM MODEL" in states[name][1]
                assert sorted(e["destination"] for e in read_audit(data / "audit.jsonl")
                              if e["event"] == "delivery_refused") == ["ehr", "stow"]
            else:
                assert sorted(requests) == ["/dicom-web/studies", "/fhir"]
                assert all(states[name][0] == "pending" for name in ("stow", "ehr"))  # 503: retried later
    finally:
        server.shutdown()
        server.server_close()

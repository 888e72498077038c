"""A real node on loopback for the API/viewer tests: a CR sent with dcmtk storescu, inferred by the
tiny model, its SR stored; then the SR rewritten through sr_writer from a StudyResult with one
grounded box (a random tiny model rarely answers with coordinates), as a real model's would be."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pydicom

from config.settings import Settings
from dicom_node.results import write_result_files
from dicom_node.service import Node
from inference.result import Box, Region, StudyResult
from tests.conftest_node import free_port, storescu, wait_for
from tests.dicom_samples import chest_phantom, make_cr_dataset, write

TOKEN = "viewer-token-456"
BOX = Box(x1=0.30, y1=0.35, x2=0.70, y2=0.80)
FINDINGS = "The cardiac silhouette is enlarged. No pleural effusion."


@dataclass
class RunningNode:
    node: Node
    settings: Settings
    study_uid: str
    sop_uid: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.node.http_port}"


def start_node_with_study(tmp_path: Path, model_dir: Path, **api: object) -> RunningNode:
    settings = Settings.model_validate({
        "model": {"path": str(model_dir), "max_new_tokens": 12},
        "inference": {"max_grounding_questions": 1, "phrase_grounding": False},
        "node": {"data_dir": str(tmp_path / "data"), "port": free_port(), "bind": "127.0.0.1",
                 "http_port": free_port(), "min_free_space_mb": 0, "quiet_period_seconds": 0.2,
                 "poll_interval_seconds": 0.1, "http_token": "metrics-token"},
        "api": {"token": TOKEN, **api},
        "sr": {"gsps_enabled": False},
    })
    node = Node(settings).start()
    try:
        ds = make_cr_dataset(rows=256, columns=208, pixel_array=chest_phantom(256, 208), photometric="MONOCHROME1",
                             WindowCenter=2048, WindowWidth=4096)
        sent = storescu(node.scp_port, [write(ds, tmp_path / "cr.dcm")], calling="PACS")
        assert sent.returncode == 0, sent.stderr
        study = ds.StudyInstanceUID
        wait_for(lambda: (node.jobs.study(study) or {"state": None})["state"] == "written", 120,
                 what="the study's SR written by the node")
        add_region_to_stored_sr(node, study)
    except BaseException:
        node.stop(grace_seconds=5)
        raise
    return RunningNode(node, settings, study, ds.SOPInstanceUID)


def add_region_to_stored_sr(node: Node, study: str) -> Path:
    """Rewrite the node's result for ``study`` through sr_writer with one grounded box."""
    settings = node.settings
    result_dir = Path(settings.node.data_dir) / "results" / study
    result = StudyResult.model_validate_json((result_dir / "result.json").read_text())
    labels = dict.fromkeys(result.labels or {"cardiomegaly": False}, False)
    labels.update({"cardiomegaly": True, "pleural effusion": False})
    result = result.model_copy(update={
        "findings_text": FINDINGS, "labels": labels,
        "regions": (Region(task="abnormality_grounding", query="cardiomegaly", label="cardiomegaly", boxes=(BOX,)),)})
    result = StudyResult.model_validate(result.model_dump())
    selected = node.jobs.instance(node.jobs.study(study)["selected_sop_instance_uid"])
    write_result_files(result, pydicom.dcmread(selected["path"]), settings.sr, result_dir, fhir=False)
    return result_dir / "sr.dcm"


def http(method: str, url: str, body: dict | None = None, token: str | None = TOKEN) -> tuple[int, bytes, str]:
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")

"""The chat API and the viewer's data as the node serves them: a study received over DICOM is
referenced as dicom:study/<uid>; the viewer's study view reads the STORED SR back; conversations
are kept in the job store; /healthz and /metrics behave as before; everything else needs the token."""

from __future__ import annotations

import io
import json

import numpy as np
import openai
import pydicom
import pytest
from PIL import Image

from dicom_node.jobstore import JobStore
from inference.image import image_from_dataset
from inference.result import UNVERIFIED_NOTICE
from tests.api_node_helpers import BOX, FINDINGS, TOKEN, http, start_node_with_study


@pytest.fixture(scope="module")
def running(tmp_path_factory, tiny_model_dir):
    running = start_node_with_study(tmp_path_factory.mktemp("api-node"), tiny_model_dir, max_request_bytes=64 * 1024)
    yield running
    running.node.stop(grace_seconds=5)


def test_health_and_metrics_unchanged(running):
    code, body, kind = http("GET", running.url + "/healthz", token=None)
    assert code == 200 and kind.startswith("application/json") and json.loads(body)["status"] == "ok"
    code, body, kind = http("GET", running.url + "/metrics", token=None)
    assert code == 401 and body == b"missing or wrong bearer token\n" and kind.startswith("text/plain")
    code, body, kind = http("GET", running.url + "/metrics", token="metrics-token")
    assert code == 200 and kind == "text/plain; version=0.0.4; charset=utf-8"
    assert b'radvlm_studies{state="written"} 1' in body


def test_chat_by_study_reference(running):
    client = openai.OpenAI(base_url=running.url + "/v1", api_key=TOKEN, max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    ref = f"dicom:study/{running.study_uid}"
    answer = client.chat.completions.create(model=model, max_tokens=6, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": ref}}, {"type": "text", "text": "Is the heart enlarged?"}]}])
    assert answer.model_extra["radvlm"]["image"] == {"columns": 208, "rows": 256, "reference": ref}
    by_instance = client.chat.completions.create(model=model, max_tokens=6, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"dicom:instance/{running.sop_uid}"}},
        {"type": "text", "text": "Is the heart enlarged?"}]}])
    assert by_instance.choices[0].message.content == answer.choices[0].message.content

    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "dicom:study/1.2.3.999"}}, {"type": "text", "text": "?"}]}])
    assert info.value.body["code"] == "unknown_study" and "1.2.3.999" in info.value.body["message"]


def test_viewer_data_needs_the_token(running):
    for path in ("/api/studies", f"/api/studies/{running.study_uid}", f"/api/studies/{running.study_uid}/image.png",
                 f"/api/studies/{running.study_uid}/chat"):
        assert http("GET", running.url + path, token=None)[0] == 401
        assert http("GET", running.url + path, token="wrong")[0] == 401
    assert http("POST", running.url + f"/api/studies/{running.study_uid}/chat", {"question": "x"}, token=None)[0] == 401
    code, page, kind = http("GET", running.url + "/viewer/", token=None)  # the static page holds no data
    assert code == 200 and kind.startswith("text/html") and b"UNVERIFIED AI RESULT" in page


def test_viewer_study_reads_the_stored_sr(running):
    code, body, _ = http("GET", running.url + "/api/studies")
    studies = json.loads(body)["studies"]
    assert [(s["study_instance_uid"], s["state"]) for s in studies] == [(running.study_uid, "written")]
    code, body, _ = http("GET", running.url + f"/api/studies/{running.study_uid}")
    study = json.loads(body)
    assert code == 200 and study["notice"] == UNVERIFIED_NOTICE
    assert study["image"] == {"sop_instance_uid": running.sop_uid, "columns": 208, "rows": 256, "view_position": "PA"}
    sr = study["sr"]
    assert sr["available"] and sr["verification_flag"] == "UNVERIFIED"
    assert sr["findings_text"] == FINDINGS and sr["labels"]["cardiomegaly"] is True
    [region] = sr["regions"]
    assert region["label"] == "cardiomegaly"
    assert region["box"] == pytest.approx(BOX.as_list(), abs=1e-6)
    assert http("GET", running.url + "/api/studies/1.2.3.999")[0] == 404


def test_viewer_image_is_the_model_image(running):
    code, body, kind = http("GET", running.url + f"/api/studies/{running.study_uid}/image.png")
    assert code == 200 and kind == "image/png"
    shown = np.asarray(Image.open(io.BytesIO(body)))
    row = running.node.jobs.instance(running.sop_uid)
    expected = image_from_dataset(pydicom.dcmread(row["path"])).pixels
    assert shown.shape == (256, 208) and np.array_equal(shown, expected)


def test_conversation_is_kept_in_the_job_store(running):
    url = running.url + f"/api/studies/{running.study_uid}/chat"
    assert http("DELETE", url)[0] == 200
    code, body, _ = http("POST", url, {"question": "Where is the heart located?"})
    first = json.loads(body)
    assert code == 200 and first["notice"] == UNVERIFIED_NOTICE and isinstance(first["boxes"], list)
    code, body, _ = http("POST", url, {"question": "Is there a pneumothorax?"})
    assert code == 200
    code, body, _ = http("GET", url)
    turns = json.loads(body)["turns"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[0]["text"] == "Where is the heart located?" and turns[1]["text"] == first["answer"]
    # stored durably: a second connection to the SQLite file sees the same conversation
    store = JobStore(running.settings.node.data_dir / "jobs.sqlite3")
    try:
        assert [t["text"] for t in store.chat_turns(running.study_uid)] == [t["text"] for t in turns]
    finally:
        store.close()
    assert http("POST", url, {"question": ""})[0] == 400
    assert http("POST", url, {"nope": 1})[0] == 400
    assert http("POST", running.url + "/api/studies/1.2.3.999/chat", {"question": "q"})[0] == 404


def test_request_size_limit_applies_to_the_viewer_too(running):
    code, body, _ = http("POST", running.url + f"/api/studies/{running.study_uid}/chat",
                         {"question": "x" * (running.settings.api.max_request_bytes + 10)})
    assert code == 413 and json.loads(body)["error"]["code"] == "request_too_large"


def test_no_cors_headers_by_default(running):
    import urllib.request

    request = urllib.request.Request(running.url + "/api/studies", headers={
        "Origin": "https://evil.example", "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert "access-control-allow-origin" not in {k.lower() for k in response.headers.keys()}

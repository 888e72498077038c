"""The OpenAI-compatible chat API (stand-alone, as `radvlm worker` serves it) on loopback with the
tiny model, driven by the official `openai` client; auth and bad-request cases; `radvlm chat --url`."""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
from PIL import Image

from config.settings import ApiSettings, ModelSettings, Settings
from dicom_node.commands import run_worker
from inference.api import ApiError, ChatMessage, box_payload, conversation, create_app
from inference.api_client import ChatApiClient, image_url_for_file, run_remote_chat
from inference.chat_service import ChatService
from inference.model import load_model
from inference.result import UNVERIFIED_NOTICE
from inference.serving import ThreadedServer
from tests.conftest_node import free_port, wait_for
from tests.dicom_samples import chest_phantom, make_cr_dataset, write

TOKEN = "test-token-123"


def png_data_url(rows: int = 64, columns: int = 48, seed: int = 0) -> str:
    pixels = (np.random.default_rng(seed).random((rows, columns)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def first_turn(url: str, text: str = "Where is the heart located in this Chest X-ray?") -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    service = ChatService(lambda: load_model(ModelSettings(path=tiny_model_dir, max_new_tokens=12)))
    app = create_app(service, ApiSettings(token=TOKEN, max_request_bytes=256 * 1024))
    srv = ThreadedServer(app, "127.0.0.1", 0)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.models.list().data[0].id


def post(server, path: str, body: bytes, token: str | None = TOKEN) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_models_list(client, model_id):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_id]
    assert models.data[0].model_extra["radvlm"]["notice"] == UNVERIFIED_NOTICE


def test_single_turn_png_and_multi_turn_reuses_the_image(client, model_id):
    url = png_data_url()
    first = client.chat.completions.create(model=model_id, messages=[first_turn(url)], max_tokens=8)
    assert first.object == "chat.completion" and first.model == model_id
    choice = first.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 0 < first.usage.completion_tokens <= 8
    extra = first.model_extra["radvlm"]
    assert extra["notice"] == UNVERIFIED_NOTICE and extra["image"] == {"columns": 48, "rows": 64, "reference": None}
    assert isinstance(extra["boxes"], list)

    second = client.chat.completions.create(model=model_id, max_tokens=8, messages=[
        first_turn(url), {"role": "assistant", "content": choice.message.content},
        {"role": "user", "content": "Is there a pleural effusion?"}])
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    # the image prefix was cached by the first request: only the text after it was prefilled
    assert second.model_extra["radvlm"]["prefilled_tokens"] < second.usage.prompt_tokens


def test_dicom_data_url_uses_the_dicom_pipeline(client, model_id, tmp_path):
    ds = make_cr_dataset(rows=40, columns=32, pixel_array=chest_phantom(40, 32), photometric="MONOCHROME1")
    path = write(ds, tmp_path / "cr.dcm")
    dicom_url = "data:application/dicom;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    answer = client.chat.completions.create(model=model_id, max_tokens=4, messages=[first_turn(dicom_url)])
    assert answer.model_extra["radvlm"]["image"]["columns"] == 32
    assert answer.model_extra["radvlm"]["image"]["rows"] == 40


def test_streaming_returns_the_same_answer(client, model_id):
    messages = [first_turn(png_data_url(seed=3))]
    full = client.chat.completions.create(model=model_id, messages=messages, max_tokens=6)
    chunks = list(client.chat.completions.create(model=model_id, messages=messages, max_tokens=6, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_wrong_or_missing_token_is_401(server, model_id):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.status_code == 401 and "bearer token" in info.value.body["message"]
    code, body = post(server, "/v1/chat/completions", json.dumps(
        {"model": model_id, "messages": [first_turn(png_data_url())]}).encode(), token=None)
    assert code == 401 and body["error"]["type"] == "authentication_error"


def test_oversize_body_is_413(server, model_id):
    big = "data:image/png;base64," + "A" * (300 * 1024)
    code, body = post(server, "/v1/chat/completions",
                      json.dumps({"model": model_id, "messages": [first_turn(big)]}).encode())
    assert code == 413 and "max_request_bytes" in body["error"]["message"]


@pytest.mark.parametrize("url, fragment", [
    ("https://example.org/cxr.png", "does not fetch remote URLs"),
    ("file:///etc/passwd", "unsupported image URL scheme"),
    ("data:image/png;base64,@@@not-base64@@@", "cannot be decoded"),
    ("data:text/plain;base64,aGVsbG8=", "unsupported image type"),
    ("data:image/png;base64," + base64.b64encode(b"definitely not a PNG").decode(), "uploaded image"),
    ("dicom:study/not-a-uid", "bad image reference"),
    ("dicom:study/1.2.3.4", "stand-alone worker"),
])
def test_bad_image_urls_are_400(client, model_id, url, fragment):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=[first_turn(url)])
    assert fragment in info.value.body["message"]
    assert info.value.body["code"] == "bad_image"


@pytest.mark.parametrize("messages, fragment", [
    ([], "must not be empty"),
    ([{"role": "user", "content": "no image here"}], "exactly one image_url"),
    ([{"role": "system", "content": "be brief"}], "hold no user message"),
    ([{"role": "tool", "content": "x"}], "role 'tool' is not supported"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}], "empty question"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                   {"type": "text", "text": "q"}]},
      {"role": "assistant", "content": "a"},
      {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                   {"type": "text", "text": "q2"}]}], "first user message only"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                   {"type": "text", "text": "q"}]},
      {"role": "assistant", "content": "a"}], "last message must be a user question"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "invalid request"),
])
def test_bad_conversations_are_400(client, model_id, messages, fragment):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=messages)
    assert fragment in info.value.body["message"]


def test_control_token_in_a_question_is_400_not_500(client, model_id):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=[first_turn(png_data_url(), "What is <image> here?")])
    assert info.value.body["code"] == "reserved_token"


def test_unknown_model_is_404_and_n_must_be_one(client, model_id):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[first_turn(png_data_url())])
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_id, n=2, messages=[first_turn(png_data_url())])


def test_not_json_is_400(server):
    code, body = post(server, "/v1/chat/completions", b"{not json")
    assert code == 400 and body["error"]["type"] == "invalid_request_error"


def test_token_unset_disables_the_api(tiny_model_dir):
    service = ChatService(lambda: load_model(ModelSettings(path=tiny_model_dir)))
    srv = ThreadedServer(create_app(service, ApiSettings()), "127.0.0.1", 0)
    srv.start()
    try:
        code, body = post(srv, "/v1/chat/completions", b"{}", token="anything")
        assert code == 503 and body["error"]["code"] == "api_disabled"
    finally:
        srv.stop()


def test_boxes_are_parsed_into_the_extra_field():
    image = load_image_stub(rows=200, columns=100)
    payload = box_payload("The heart is located at the coordinates [0.25, 0.5, 0.75, 1.0] and [0.1, 0.1, 0.2, 0.3].",
                          image)
    assert payload["boxes"] == [[0.25, 0.5, 0.75, 1.0], [0.1, 0.1, 0.2, 0.3]]
    assert payload["boxes_pixels"][0] == [25.0, 100.0, 75.0, 200.0]


def load_image_stub(rows: int, columns: int):
    from inference.image import ModelImage
    from inference.result import SourceImage

    return ModelImage(pixels=np.zeros((rows, columns), np.uint8), source=SourceImage(rows=rows, columns=columns))


def test_conversation_helper_rejects_too_many_messages():
    messages = [ChatMessage(role="user", content="q")] * 5
    with pytest.raises(ApiError, match="too many messages"):
        conversation(messages, max_messages=4)


def test_remote_terminal_chat_against_the_api(server, tmp_path):
    ds = make_cr_dataset(rows=48, columns=40, pixel_array=chest_phantom(48, 40))
    path = write(ds, tmp_path / "cr.dcm")
    out = io.StringIO()
    asked = run_remote_chat(ChatApiClient(server.url, TOKEN), image_url_for_file(path),
                            input_stream=io.StringIO("Where is the heart?\nAny effusion?\n/quit\n"), output_stream=out)
    assert asked == 2
    text = out.getvalue()
    assert UNVERIFIED_NOTICE in text and text.count("radvlm> ") == 2


def test_radvlm_chat_url_cli_reports_a_wrong_token(server, tmp_path, capsys, monkeypatch):
    from dicom_node.cli import main

    path = write(make_cr_dataset(), tmp_path / "cr.dcm")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", str(path), "--url", server.url, "--token", "wrong"]) == 2
    assert "HTTP 401" in capsys.readouterr().err
    assert main(["chat", "--url", server.url]) == 2  # neither FILE nor --study


def test_radvlm_worker_serves_until_stopped(tiny_model_dir):
    settings = Settings.model_validate({"model": {"path": str(tiny_model_dir), "max_new_tokens": 4},
                                        "api": {"token": TOKEN}})
    stop, out = threading.Event(), io.StringIO()
    port = free_port()
    thread = threading.Thread(target=run_worker, args=(settings, "127.0.0.1", port, out, stop), daemon=True)
    thread.start()
    try:
        wait_for(lambda: "ready" in out.getvalue(), 60, what="worker ready")
        ready = json.loads(out.getvalue().splitlines()[0])
        client = openai.OpenAI(base_url=ready["url"] + "/v1", api_key=TOKEN, max_retries=0)
        assert client.models.list().data[0].id == ready["model"]
    finally:
        stop.set()
        thread.join(20)
    assert not thread.is_alive()

"""What OpenAI chat front-ends send and expect (issue 14 item 4): a system prompt (accepted, ignored by
rule), text-only follow-ups, text-only first turns (a 400 naming the rule), real token streaming,
an access-log line per request without PHI, API metrics and prefix-cache hits — against the
stand-alone API (`radvlm worker`) and the node's app, tiny model on loopback."""

from __future__ import annotations

import http.client as http_client
import json
import logging
import re
import time
import urllib.parse

import openai
import pytest

from config.settings import ApiSettings, ModelSettings
from inference.api import create_app, loggable_path
from inference.chat_service import ChatService
from inference.model import load_model
from inference.serving import ThreadedServer
from tests.api_node_helpers import TOKEN as NODE_TOKEN
from tests.api_node_helpers import http, start_node_with_study
from tests.test_api_chat import TOKEN, first_turn, png_data_url

QUESTION = "Describe the findings."  # the tiny model answers it with ~200 tokens (no early stop)


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    return ChatService(lambda: load_model(ModelSettings(path=tiny_model_dir, max_new_tokens=200)))


@pytest.fixture(scope="module")
def server(service):
    srv = ThreadedServer(create_app(service, ApiSettings(token=TOKEN)), "127.0.0.1", 0)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.models.list().data[0].id


def test_a_system_message_is_accepted_and_ignored(client, model_id):
    url = png_data_url(seed=5)
    plain = client.chat.completions.create(model=model_id, max_tokens=8, messages=[first_turn(url)])
    with_system = client.chat.completions.create(model=model_id, max_tokens=8, messages=[
        {"role": "system", "content": "You are a helpful assistant."}, first_turn(url)])
    developer = client.chat.completions.create(model=model_id, max_tokens=8, messages=[
        {"role": "developer", "content": "Answer in French."}, first_turn(url)])
    assert with_system.choices[0].message.content == plain.choices[0].message.content
    assert developer.choices[0].message.content == plain.choices[0].message.content
    assert with_system.model_extra["radvlm"]["system_messages"] == {"count": 1, "handling": "ignored"}
    assert plain.model_extra["radvlm"]["system_messages"] is None
    assert with_system.usage.prompt_tokens == plain.usage.prompt_tokens  # nothing of it reached the prompt


def test_text_only_turn_after_the_image_turn(client, model_id):
    url = png_data_url(seed=6)
    first = client.chat.completions.create(model=model_id, max_tokens=6, messages=[
        {"role": "system", "content": "You are a helpful assistant."}, first_turn(url)])
    follow_up = client.chat.completions.create(model=model_id, max_tokens=6, messages=[
        {"role": "system", "content": "You are a helpful assistant."}, first_turn(url),
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Is the heart enlarged?"}])
    assert follow_up.choices[0].finish_reason in ("stop", "length")
    extra = follow_up.model_extra["radvlm"]
    assert extra["cache_hit"] is True  # same image: its prefix came from the cache
    assert extra["prefilled_tokens"] < follow_up.usage.prompt_tokens


def test_text_only_first_turn_is_a_400_naming_the_rule(client, model_id):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello, what can you do?"}])
    body = info.value.body
    assert body["code"] == "image_required" and body["param"] == "messages[1]"
    assert "exactly one image_url" in body["message"] and "later questions may be text only" in body["message"]


def test_cache_hit_reported(client, model_id):
    url = png_data_url(seed=7)
    first = client.chat.completions.create(model=model_id, max_tokens=4, messages=[first_turn(url)])
    again = client.chat.completions.create(model=model_id, max_tokens=4, messages=[first_turn(url, "Any effusion?")])
    assert first.model_extra["radvlm"]["cache_hit"] is False
    assert again.model_extra["radvlm"]["cache_hit"] is True




def test_streaming_sends_tokens_as_they_are_produced(server, service, model_id):
    messages = [first_turn(png_data_url(seed=3), QUESTION)]
    generating_at_first_chunk: list[bool] = []
    parts = urllib.parse.urlsplit(server.url)
    connection = http_client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    connection.request("POST", "/v1/chat/completions",
                       json.dumps({"model": model_id, "messages": messages, "max_tokens": 200, "stream": True}),
                       {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    response = connection.getresponse()
    events = []
    while (line := response.fp.readline()):
        if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
            event = json.loads(line[6:])
            content = event["choices"][0]["delta"].get("content") if event.get("choices") else None
            if content and not generating_at_first_chunk:
                # the model lock is held until generate returns: still generating = first chunk before the last token
                generating_at_first_chunk.append(service.lock.locked())
            events.append(event)
    connection.close()
    content_chunks = [e for e in events if e["choices"][0]["delta"].get("content")]
    final = events[-1]
    assert final["usage"]["completion_tokens"] > 100
    assert len(content_chunks) > 10, len(content_chunks)
    assert generating_at_first_chunk == [True]
    text = "".join(e["choices"][0]["delta"]["content"] for e in content_chunks)
    full = openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0).chat.completions.create(
        model=model_id, messages=messages, max_tokens=200)
    assert text == full.choices[0].message.content
    assert final["choices"][0]["finish_reason"] == full.choices[0].finish_reason
    assert final["radvlm"]["cache_hit"] is False and final["usage"] == full.usage.model_dump(exclude_none=True)


def test_streaming_with_the_openai_client(client, model_id):
    chunks = list(client.chat.completions.create(
        model=model_id, max_tokens=50, stream=True,
        messages=[{"role": "system", "content": "You are a helpful assistant."},
                  first_turn(png_data_url(seed=3), QUESTION)]))
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    assert chunks[-1].choices[0].finish_reason == "length"


def test_access_log_line_without_phi(server, client, model_id, caplog):
    question = "Patient DOE^JANE, MRN 123456: is there a pneumothorax?"
    with caplog.at_level(logging.INFO, logger="radvlm.access"):
        client.chat.completions.create(model=model_id, max_tokens=4, messages=[
            first_turn(png_data_url(seed=8), question)])
        http("GET", server.url + "/api/studies/1.2.826.0.1.3680043.8.498.1/image.png?name=DOE", token=TOKEN)
        # an earlier test's streamed request may still log its line (after its last chunk): pick ours
        def ours() -> tuple[list[str], list[str]]:
            lines = [r.getMessage() for r in caplog.records if r.name == "radvlm.access"]
            return ([line for line in lines if line.startswith("POST /v1/chat/completions")
                     and re.search(r"completion_tokens=4\b", line)],
                    [line for line in lines if line.startswith("GET /api/studies/")])
        deadline = time.monotonic() + 5
        while not all(ours()) and time.monotonic() < deadline:
            time.sleep(0.05)
    chats, others = ours()
    assert len(chats) == 1 and len(others) == 1, (chats, others)
    lines = [r.getMessage() for r in caplog.records if r.name == "radvlm.access"]
    chat_line, other = chats[0], others[0]
    assert chat_line.startswith("POST /v1/chat/completions 200 ")
    assert "prompt_tokens=" in chat_line and "completion_tokens=4" in chat_line and "cache_hit=False" in chat_line
    assert other.startswith("GET /api/studies/{uid}/image.png 404 ")
    for line in lines:
        for phi in ("DOE", "123456", "pneumothorax", "1.2.826", "base64"):
            assert phi not in line


def test_loggable_path_hides_uids():
    assert loggable_path("/api/studies/1.2.840.10008.5.1/chat") == "/api/studies/{uid}/chat"
    assert loggable_path("/api/studies/1.2.3") == "/api/studies/{uid}"
    assert loggable_path("/v1/chat/completions") == "/v1/chat/completions"
    assert loggable_path("/x/<script>") == "/x/_script_"


def test_worker_metrics(server, client, model_id):
    url = png_data_url(seed=9)
    for _ in range(2):
        client.chat.completions.create(model=model_id, max_tokens=3, messages=[first_turn(url)])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "no image"}])
    assert http("GET", server.url + "/metrics", token=None)[0] == 401
    code, body, kind = http("GET", server.url + "/metrics", token=TOKEN)
    text = body.decode()
    assert code == 200 and kind.startswith("text/plain")
    assert 'radvlm_api_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text
    assert 'radvlm_api_errors_total{route="/v1/chat/completions",status="400"}' in text
    assert 'radvlm_api_prefix_cache_total{result="hit"}' in text
    assert 'radvlm_api_prefix_cache_total{result="miss"}' in text
    assert 'radvlm_api_tokens_total{kind="completion"}' in text
    assert "radvlm_api_request_seconds_count" in text


def test_node_metrics_and_access_log(tmp_path_factory, tiny_model_dir, caplog):
    running = start_node_with_study(tmp_path_factory.mktemp("api-compat-node"), tiny_model_dir)
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key=NODE_TOKEN, max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        with caplog.at_level(logging.INFO, logger="radvlm.access"):
            for question in ("Is the heart enlarged?", "Any effusion?"):
                client.chat.completions.create(model=model, max_tokens=4, messages=[
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": [{"type": "image_url",
                                                  "image_url": {"url": f"dicom:study/{running.study_uid}"}},
                                                 {"type": "text", "text": question}]}])
            http("GET", running.url + f"/api/studies/{running.study_uid}", token=NODE_TOKEN)
            deadline = time.monotonic() + 5  # the access line is written once the response has gone out
            while time.monotonic() < deadline and not any(
                    r.name == "radvlm.access" and r.getMessage().startswith("GET /api/studies/{uid} 200")
                    for r in caplog.records):
                time.sleep(0.05)
        code, body, _ = http("GET", running.url + "/metrics", token="metrics-token")
    finally:
        running.node.stop(grace_seconds=5)
    text = body.decode()
    assert code == 200 and 'radvlm_studies{state="written"} 1' in text  # the node's own metrics still there
    assert 'radvlm_api_requests_total{method="POST",route="/v1/chat/completions",status="200"} 2' in text
    assert 'radvlm_api_prefix_cache_total{result="hit"}' in text
    lines = [r.getMessage() for r in caplog.records if r.name == "radvlm.access"]
    assert any(line.startswith("GET /api/studies/{uid} 200") for line in lines), lines
    assert all(running.study_uid not in line for line in lines)

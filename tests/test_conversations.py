"""Conversation generator against a real OpenAI-compatible HTTP server on loopback."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dicom_node.cli import main as radvlm
from training.conversation_prompt import ConversationInput, build_prompt, scrub_text
from training.conversations import (APIError, ConversationJobConfig, EndpointSettings, MalformedAnswerError,
                                    generate_conversations, parse_conversation)

API_KEY = "sk-test-loopback-key"


def conversation_json(rounds: int = 5, box: str = "[0.10, 0.20, 0.40, 0.60]") -> str:
    turns = []
    for i in range(rounds):
        turns.append({"from": "human", "value": f"Question {i}?"})
        turns.append({"from": "gpt", "value": f"Answer {i}, possibly at {box}." if i == 0 else f"Answer {i}."})
    return json.dumps(turns, indent=1)


class FakeLLM:
    """A scripted chat-completions server: each response is (status, content, headers)."""

    def __init__(self):
        self.script: list[tuple[int, str, dict]] = []
        self.default: tuple[int, str, dict] = (200, conversation_json(), {})
        self.requests: list[dict] = []
        llm = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                return

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                llm.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                     "body": json.loads(body), "raw": body.decode(), "at": time.monotonic()})
                status, content, headers = llm.script.pop(0) if llm.script else llm.default
                payload = (json.dumps({"id": "x", "object": "chat.completion", "model": "m",
                                       "choices": [{"index": 0, "finish_reason": "stop",
                                                    "message": {"role": "assistant", "content": content}}]})
                           if status == 200 else json.dumps({"error": {"message": content}}))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload.encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def llm():
    with FakeLLM() as server:
        yield server


INPUTS = [
    {"id": "p10-s5001-img1", "image": "files/p10/p10000032/s5001/img1.jpg", "patient_name": "Jane Roe",
     "mrn": "99887766",
     "report": "Exam 03/14/2180 10:45 AM. Dr. Smith reviewed. Heart size normal. Small left pleural effusion. "
               "MRN 99887766.",
     "labels": ["pleural effusion"], "view": "PA", "gender": "F"},
    {"id": "p11-s6002-img2", "image": "files/p11/p11000045/s6002/img2.jpg", "report": "Right lower lobe opacity.",
     "labels": ["lung opacity"], "view": "AP", "gender": "M",
     "observations": [{"text": "Right lower lobe opacity", "boxes": [[0.1, 0.2, 0.4, 0.6]]}]},
]
IDENTIFIERS = ("p10-s5001", "p10000032", "img1.jpg", "Jane Roe", "99887766", "03/14/2180", "10:45", "Smith",
               "p11000045", "img2.jpg")


def write_inputs(folder: Path, items=INPUTS) -> Path:
    path = folder / "facts.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def job(tmp_path: Path, url: str, **overrides) -> ConversationJobConfig:
    endpoint = {"url": url, "model": "gpt-test", "api_key_env": "RADVLM_TEST_LLM_KEY", "backoff_s": 0.0,
                "requests_per_minute": 6000, **overrides.pop("endpoint", {})}
    return ConversationJobConfig(input=write_inputs(tmp_path), output=tmp_path / "conversations.jsonl",
                                 endpoint=EndpointSettings(**endpoint), **overrides)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_prompt_carries_facts_but_no_identifiers():
    standard = build_prompt(ConversationInput.model_validate(INPUTS[0]))
    assert "Heart size normal. Small left pleural effusion." in standard
    assert "View: PA" in standard and "Gender: female" in standard and "Labels: pleural effusion" in standard
    assert "5-10 round" in standard and '"from": "human"' in standard
    assert "$" not in standard
    for identifier in IDENTIFIERS:
        assert identifier not in standard
    grounded = build_prompt(ConversationInput.model_validate(INPUTS[1]))
    assert "- Right lower lobe opacity: [0.10, 0.20, 0.40, 0.60]" in grounded
    assert "[x_min, y_min, x_max, y_max]" in grounded and "Gender: male" in grounded


@pytest.mark.parametrize("grounded", [False, True])
def test_shipped_prompt_states_the_papers_rules(grounded):
    prompt = build_prompt(ConversationInput.model_validate(INPUTS[int(grounded)]))
    assert "prior or previous studies" in prompt and 'never use the word "changes"' in prompt
    assert "no external data" in prompt
    assert "(report, abnormality labels, view, gender" in prompt          # the facts given
    assert "general ones" in prompt and "exploratory ones" in prompt and "specific ones" in prompt
    assert "layperson" not in prompt


def test_conversation_prompt_files_are_replaceable(tmp_path, llm):
    own = tmp_path / "mine.txt"
    own.write_text("MY RULES for $ROUNDS rounds\n$FACTS\n")
    cfg = job(tmp_path, llm.url, prompts={"standard": own}, limit=1)
    generate_conversations(cfg)
    sent = llm.requests[0]["body"]["messages"][0]["content"]
    assert sent.startswith("MY RULES for 5-10 rounds\nFacts about the X-ray:\n")
    (tmp_path / "bad.txt").write_text("no placeholders")
    from training.prompts import PromptFileError
    with pytest.raises(PromptFileError, match=r"\$ROUNDS, \$FACTS"):
        generate_conversations(job(tmp_path, llm.url, prompts={"grounded": tmp_path / "bad.txt"}))


def test_scrub_text_keeps_clinical_numbers():
    assert scrub_text("A 7 mm nodule at T10, seen 2180-03-14.") == "A 7 mm nodule at T10, seen ___."
    assert scrub_text("Call 555-123-4567 or a@b.org") == "Call ___ or ___"


def test_unknown_label_is_rejected():
    with pytest.raises(ValueError, match="unknown label"):
        ConversationInput.model_validate({**INPUTS[0], "labels": ["broken heart"]})


@pytest.mark.parametrize("answer, reason", [
    ("Sure! Here is a conversation about the X-ray.", "no JSON list"),
    ('[{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"},]', "invalid JSON"),
    (conversation_json(rounds=3), "3 rounds"),
    (conversation_json(rounds=11), "11 rounds"),
    (json.dumps([{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}] * 5), "turn 0"),
    (conversation_json(box="[0.5, 0.2, 1.4, 0.6]"), "not a normalised box"),
])
def test_parse_conversation_rejects_malformed(answer, reason):
    with pytest.raises(MalformedAnswerError, match=reason):
        parse_conversation(answer)


def test_parse_conversation_accepts_fenced_json():
    turns = parse_conversation("Here you go:\n```json\n" + conversation_json(rounds=6) + "\n```")
    assert len(turns) == 12 and turns[0] == {"from": "human", "value": "Question 0?"}


def test_generation_retries_caches_and_resumes(tmp_path, llm, monkeypatch):
    monkeypatch.setenv("RADVLM_TEST_LLM_KEY", API_KEY)
    llm.script = [(200, "I cannot produce JSON today.", {}),  # malformed → asked again
                  (429, "slow down", {"Retry-After": "0"}),  # rate limited → retried
                  (200, "```json\n" + conversation_json(rounds=7) + "\n```", {}),  # valid, fenced
                  (200, conversation_json(rounds=5), {})]  # second image
    cfg = job(tmp_path, llm.url)
    summary = generate_conversations(cfg)
    assert (summary.written, summary.failed, summary.requests) == (2, 0, 4)
    records = read_jsonl(cfg.output)
    assert [r["id"] for r in records] == ["p10-s5001-img1-conversation", "p11-s6002-img2-grounded_conversation"]
    assert records[0]["image"] == "files/p10/p10000032/s5001/img1.jpg"
    assert len(records[0]["conversations"]) == 14
    assert records[0]["conversations"][0]["value"].startswith("<image>\n")
    assert all("<image>" not in turn["value"] for turn in records[0]["conversations"][1:])
    assert [r["path"] for r in llm.requests] == ["/v1/chat/completions"] * 4
    assert {r["auth"] for r in llm.requests} == {f"Bearer {API_KEY}"}
    assert llm.requests[0]["body"]["model"] == "gpt-test"
    for request in llm.requests:
        for identifier in IDENTIFIERS:
            assert identifier not in request["raw"], identifier
    assert "[0.10, 0.20, 0.40, 0.60]" in llm.requests[-1]["body"]["messages"][0]["content"]

    # Re-run: everything already in the output, no request.
    again = generate_conversations(cfg)
    assert (again.written, again.already_done, again.requests) == (0, 2, 0)
    # Output lost: rebuilt from the cache, still no request.
    cfg.output.unlink()
    rebuilt = generate_conversations(cfg)
    assert (rebuilt.written, rebuilt.from_cache, rebuilt.requests) == (2, 2, 0)
    assert read_jsonl(cfg.output) == records
    assert len(llm.requests) == 4


def test_interrupted_run_resumes_where_it_stopped(tmp_path, llm):
    cfg = job(tmp_path, llm.url, limit=1)
    assert generate_conversations(cfg).written == 1
    with cfg.output.open("a") as handle:  # a line cut by a crash
        handle.write('{"id": "p11-s6002-img2-grounded_conv')
    cfg = job(tmp_path, llm.url)
    summary = generate_conversations(cfg)
    assert (summary.already_done, summary.written, summary.requests) == (1, 1, 1)
    assert len(llm.requests) == 2


def test_cli_reports_images_that_never_got_a_valid_answer(tmp_path, llm):
    llm.default = (200, conversation_json(rounds=2), {})  # always too short
    config = tmp_path / "conv.toml"
    config.write_text(f'input = "{write_inputs(tmp_path)}"\noutput = "{tmp_path / "out.jsonl"}"\n'
                      f'[endpoint]\nurl = "{llm.url}"\nmodel = "m"\nmax_attempts = 2\nbackoff_s = 0\n'
                      f'requests_per_minute = 6000\n')
    assert radvlm(["generate-conversations", "--config", str(config), "--limit", "1"]) == 1
    assert len(llm.requests) == 4  # two images × two attempts, nothing written
    assert read_jsonl(tmp_path / "out.jsonl") == []


def test_authentication_error_stops_the_job(tmp_path, llm):
    llm.default = (401, "invalid api key", {})
    with pytest.raises(APIError, match="HTTP 401"):
        generate_conversations(job(tmp_path, llm.url))
    assert len(llm.requests) == 1


def test_requests_are_rate_limited(tmp_path, llm):
    cfg = job(tmp_path, llm.url, endpoint={"requests_per_minute": 300})  # one request per 0.2 s
    llm.script = [(200, "not json", {})]
    generate_conversations(cfg)
    times = [r["at"] for r in llm.requests]
    assert len(times) == 3
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.18


def test_unknown_config_key_is_refused(tmp_path, llm):
    config = tmp_path / "conv.toml"
    config.write_text(f'input = "x"\noutput = "y"\ntemperatur = 1\n[endpoint]\nurl = "{llm.url}"\nmodel = "m"\n')
    assert radvlm(["generate-conversations", "--config", str(config)]) == 2


def test_generation_reads_facts_from_the_build_dataset_config(tmp_path, llm, monkeypatch):
    """Facts from the same job file as build-dataset: MIMIC report + labels + view + gender (MIMIC-IV
    patients.csv), MS-CXR and PadChest-GR boxes; identifiers and paths never reach the LLM."""
    from training.conversation_facts import conversation_inputs, load_build_config

    fixtures = Path(__file__).parent / "fixtures" / "datasets"
    (tmp_path / "patients.csv").write_text("subject_id,gender,anchor_age\n10000032,F,52\n")
    build = tmp_path / "build.toml"
    build.write_text(f'[sources.mimic_cxr]\nroot = "{fixtures / "MIMIC-CXR-JPG"}"\npatients_csv = "patients.csv"\n'
                     f'[sources.ms_cxr]\nroot = "{fixtures / "MS-CXR"}"\n'
                     f'[sources.padchest_gr]\nroot = "{fixtures / "PadChest"}"\n')
    items = {item.id: item for item in conversation_inputs(load_build_config(build))}
    mimic = items["mimic-02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"]
    assert (mimic.view, mimic.gender, mimic.labels) == ("PA", "F", ["cardiomegaly", "pleural effusion"])
    assert mimic.report.startswith("The heart size is mildly enlarged.") and not mimic.observations
    grounded = items["mscxr-02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"]
    assert [o.text for o in grounded.observations] == ["The heart size is mildly enlarged"]
    assert grounded.image == mimic.image and grounded.image.endswith(".jpg")
    padchest = items["padchest-216840111366964012819207061112010315104455352_04-024-184"]
    assert (padchest.gender, padchest.view, padchest.labels) == ("F", "AP", [])
    assert [o.text for o in padchest.observations] == ["Cardiomegaly.", "Left basal atelectasis."]
    assert padchest.report == "Cardiomegaly. No pleural effusion. Left basal atelectasis."   # all its sentences

    cfg = ConversationJobConfig(dataset_config=build, output=tmp_path / "out.jsonl",
                                endpoint=EndpointSettings(url=llm.url, model="m", backoff_s=0.0,
                                                          requests_per_minute=6000))
    summary = generate_conversations(cfg)
    records = read_jsonl(cfg.output)
    assert summary.written == len(items) == len(records)
    tasks = {r["id"]: r["task"] for r in records}
    assert tasks[f"{mimic.id}-conversation"] == "conversation"
    assert tasks[f"{grounded.id}-grounded_conversation"] == "grounded_conversation"
    prompts = [r["body"]["messages"][0]["content"] for r in llm.requests]
    assert any("Gender: female" in p and "View: PA" in p and "Labels: cardiomegaly, pleural effusion" in p
               for p in prompts)
    assert any("- Left basal atelectasis.: [0.55, 0.60, 0.80, 0.75] and [0.60, 0.70, 0.85, 0.82]" in p for p in prompts)
    for request in llm.requests:
        assert "02aa804e" not in request["raw"] and "10000032" not in request["raw"] and ".jpg" not in request["raw"]
    with pytest.raises(ValueError, match="exactly one of input"):
        ConversationJobConfig(output=tmp_path / "x.jsonl", endpoint=EndpointSettings(url=llm.url, model="m"))

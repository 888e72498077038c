"""LLM judge: score parsing on judge-like answers, the prompt, and a run against a real loopback HTTP server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from training.evaluation.judge import (
    JudgeClient,
    JudgeError,
    build_judge_prompt,
    judge_conversations,
    judge_prompt,
    parse_overall_score,
)
from training.prompts import PromptFileError


@pytest.mark.parametrize("answer, score", [
    ("Overall score: 7", 7.0),
    ("Overall score: 6.5/10", 6.5),
    ("Round 1: correct (2/2).\nRound 2: misses the effusion (0/2).\n\nOverall score: 4 / 10", 4.0),
    ("**Overall score:** 8/10", 8.0),
    ("overall Score: 9 out of 10", 9.0),
    ("Overall score: 3/10 ... on reflection, Overall score: 5/10", 5.0),   # the last one counts
    ("Round 1 is close; round 2 names the wrong side.\nOverall score: 6/10.", 6.0),
    ("Overall score - 7/10", 7.0),
    ("The overall score is 8/10", 8.0),
    ("Overall score: **7**/10", 7.0),
    ("Overall score: <score>/10", None),        # the placeholder of the requested format
    ("Overall score: <score>", None),           # the placeholder echoed back
    ("Overall score: 7/5", None),               # not out of 10
    ("Overall score: 11", None),                # out of range
    ("The model did well. Score: 8", None),     # not the requested line
    ("", None),
])
def test_parse_overall_score(answer, score):
    assert parse_overall_score(answer) == score


CONVERSATION = {
    "id": "c1", "task": "conversation", "labels": ["pleural effusion"], "txt": "Small left pleural effusion.",
    "view": "PA", "gender": "female",
    "conversation": [{"from": "human", "value": "<image>\nIs there an effusion?"},
                     {"from": "gpt", "value": "Yes, a small left pleural effusion."},
                     {"from": "human", "value": "Which side?"},
                     {"from": "gpt", "value": "The left side."}],
    "output": ["Yes, there is a small effusion.", "On the right."],
}


def test_shipped_judge_prompt_states_the_papers_rules():
    text = judge_prompt().text
    assert "step by step" in text and "concise" in text          # concise step-by-step reasoning
    assert "lenient with small deviations" in text
    assert "integer" in text and "Overall score: <score>/10" in text
    assert "$DATA" in text


def test_judge_prompt_is_a_replaceable_file(tmp_path):
    own = tmp_path / "upstream_judge.txt"
    own.write_text("MY JUDGE RULES\n$DATA\nOverall score: <score>\n")
    prompt = build_judge_prompt(CONVERSATION, judge_prompt(own))
    assert prompt.startswith("MY JUDGE RULES\nList of Abnormalities: pleural effusion\n")
    (tmp_path / "bad.txt").write_text("no placeholder")
    with pytest.raises(PromptFileError, match=r"lacks the placeholder\(s\) \$DATA"):
        judge_prompt(tmp_path / "bad.txt")
    with pytest.raises(PromptFileError, match="cannot read"):
        judge_prompt(tmp_path / "missing.txt")


def test_prompt_follows_upstream_layout():
    prompt = build_judge_prompt(CONVERSATION)
    assert prompt.startswith(judge_prompt().text.split("$DATA")[0])
    assert "List of Abnormalities: pleural effusion\nRadiology report: Small left pleural effusion.\nView: PA\n" \
           "Gender: female\nHere is the conversation to evaluate: \n\nUser: Is there an effusion?\n" \
           "Expected answer: Yes, a small left pleural effusion.\nGenerated answer: Yes, there is a small effusion.\n\n" \
           "User: Which side?\n" in prompt
    assert prompt.endswith('Remember to end your reply with the line "Overall score: <score>/10".\n')
    grounded = dict(CONVERSATION, sentencesBBox=[{"sentence": "Small left effusion", "boxes": [[0.6, 0.7, 0.9, 0.95]]}])
    assert "Selected observations with bounding boxes coordinates\nSmall left effusion: [0.60, 0.70, 0.90, 0.95]\n" \
        in build_judge_prompt(grounded)
    with pytest.raises(ValueError, match="1 generated answers for 2"):
        build_judge_prompt(dict(CONVERSATION, output=["only one"]))


class _Judge(BaseHTTPRequestHandler):
    answers: list[str] = []
    seen: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        content = type(self).answers[(len(type(self).seen) - 1) % len(type(self).answers)]
        payload = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def judge_server():
    _Judge.answers = ["Round 1: close. Round 2: wrong side.\nOverall score: 6/10",
                      "Overall score: 8", "I cannot evaluate this conversation."]
    _Judge.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_judge_run_against_a_loopback_openai_compatible_server(judge_server):
    records = [CONVERSATION, dict(CONVERSATION, id="c2", task="grounded_conversation"), dict(CONVERSATION, id="c3")]
    client = JudgeClient(judge_server, "judge-model", api_key="secret", retries=0)
    result = judge_conversations(records, client)
    assert result["scores"] == [6.0, 8.0, None]
    assert result["judge_score"] == pytest.approx(7.0)
    assert result["n_valid"] == 2 and result["n_invalid"] == 1 and result["n_failed"] == 0
    request = _Judge.seen[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer secret"
    assert request["body"]["model"] == "judge-model" and request["body"]["temperature"] == 0
    assert request["body"]["messages"][0]["content"] == build_judge_prompt(CONVERSATION)
    assert result["judge_model"] == "judge-model" and len(result["prompt_sha256"]) == 64


def test_unreachable_judge_is_counted_as_failed_not_scored():
    client = JudgeClient("http://127.0.0.1:9/v1", "m", retries=0, timeout_s=2)
    with pytest.raises(JudgeError, match="unreachable"):
        client.complete("x")
    result = judge_conversations([CONVERSATION], client)
    assert result["n_failed"] == 1 and result["judge_score"] == "not computed: no valid judge score"
    assert judge_conversations([CONVERSATION], None)["judge_score"].startswith("not computed: judge endpoint")

"""Grounded-report scoring (RadFact-style) on hand-computed cases, with the entailment checks sent
to a real OpenAI-compatible server on loopback that decides entailment deterministically (a
statement is entailed by the reference sentences it equals, case and final period ignored)."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dicom_node.cli import main as radvlm
from training.evaluation.grounded_report import (
    GroundedReportError,
    GroundedSentence,
    LLMEntailment,
    box_precision,
    grounded_report_metrics,
    parse_grounded_report,
    parse_judgement,
    score_grounded_report,
    union_area,
)
from training.evaluation.judge import JudgeClient


def _norm(text: str) -> str:
    return text.strip().rstrip(".").lower()


class _Entailer(BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_POST(self):  # noqa: N802 (http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        type(self).seen.append(prompt)
        premise = prompt.split("numbered:\n", 1)[1].split("\n\nStatement (the hypothesis):\n", 1)[0]
        hypothesis = prompt.split("Statement (the hypothesis):\n", 1)[1].split("\n\n", 1)[0]
        sentences = {int(m.group(1)): m.group(2) for m in re.finditer(r"^(\d+)\. (.*)$", premise, re.MULTILINE)}
        if hypothesis.startswith("GARBLE"):
            content = "I am not sure what to say."
        else:
            evidence = [n for n, s in sentences.items() if _norm(s) == _norm(hypothesis)]
            content = (f"The statement matches.\nVerdict: entailed\nEvidence: {', '.join(map(str, evidence))}"
                       if evidence else "Verdict: not entailed\nEvidence: none")
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
def entailer():
    _Entailer.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Entailer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


REFERENCE = [{"sentence": "Cardiomegaly.", "boxes": [[0.25, 0.25, 0.75, 0.75]]},   # binary fractions: exact areas
             {"sentence": "Left pleural effusion.", "boxes": [[0.6, 0.6, 0.9, 0.9]]},
             {"sentence": "No pneumothorax.", "boxes": []}]
GENERATED = [{"sentence": "Cardiomegaly.", "boxes": [[0.25, 0.25, 0.75, 0.5]]},     # inside its reference box
             {"sentence": "Left pleural effusion.", "boxes": [[0.2, 0.6, 0.5, 0.9]]},  # right words, wrong place
             {"sentence": "Right upper lobe nodule.", "boxes": [[0.1, 0.1, 0.2, 0.2]]},  # not in the reference
             {"sentence": "No pneumothorax.", "boxes": []}]
PERFECT = [{"sentence": "Cardiomegaly.", "boxes": [[0.25, 0.25, 0.75, 0.75]]}]


def test_union_area_and_box_precision_by_hand():
    assert union_area([(0, 0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75)]) == pytest.approx(0.25 + 0.25 - 0.0625)
    assert union_area([(0, 0, 0.5, 0.5)], clip=[(0.25, 0.25, 0.75, 0.75)]) == pytest.approx(0.0625)
    # a box against two evidence boxes: covered 0.25 + 0.125 of its 0.5 → 0.75
    assert box_precision([(0, 0, 1, 0.5)], [(0, 0, 0.5, 0.5), (0.5, 0, 1, 0.25)]) == pytest.approx(0.75)
    assert box_precision([(0, 0, 0.5, 0.5)], []) == 0.0
    assert box_precision([(0.25, 0.25, 0.75, 0.75)], [(0.25, 0.25, 0.75, 0.5)]) == 0.5      # exactly


def test_parse_grounded_report_list_and_inline_text():
    inline = parse_grounded_report("Cardiomegaly [0.30, 0.40, 0.70, 0.80]. No pneumothorax. "
                                   "Left effusion [0.6, 0.6, 0.9, 0.9] [0.1, 0.6, 0.3, 0.9].")
    assert inline == [GroundedSentence("Cardiomegaly.", ((0.3, 0.4, 0.7, 0.8),)),
                      GroundedSentence("No pneumothorax."),
                      GroundedSentence("Left effusion.", ((0.6, 0.6, 0.9, 0.9), (0.1, 0.6, 0.3, 0.9)))]
    assert parse_grounded_report([("A.", [[0.1, 0.1, 0.2, 0.2]])]) == [GroundedSentence("A.", ((0.1, 0.1, 0.2, 0.2),))]
    with pytest.raises(GroundedReportError, match="not normalised"):
        parse_grounded_report([{"sentence": "A.", "boxes": [[0.5, 0.1, 0.2, 0.2]]}])


def test_parse_judgement():
    assert parse_judgement("Reasoning…\nVerdict: entailed\nEvidence: 2, 3, 9", 3).evidence == (1, 2)
    assert parse_judgement("**Verdict:** not entailed\nEvidence: none", 3).entailed is False
    judgement = parse_judgement("no idea", 3)
    assert (judgement.entailed, judgement.valid) == (False, False)


def test_one_report_by_hand(entailer):
    entails = LLMEntailment(JudgeClient(entailer, "entail-model", retries=0))
    scores = score_grounded_report(parse_grounded_report(GENERATED), parse_grounded_report(REFERENCE), entails)
    # generated: 3 of 4 entailed (the nodule is not); grounded generated: cardiomegaly (box precision
    # 1.0 against its evidence box → spatial), effusion (0.0 → not), nodule (not entailed)
    assert scores["logical_precision"] == pytest.approx(3 / 4)
    assert scores["grounding_precision"] == pytest.approx(1 / 2)     # 1 spatial of 2 entailed grounded
    assert scores["spatial_precision"] == pytest.approx(1 / 3)       # 1 spatial of 3 grounded
    # reference: all 3 entailed; cardiomegaly's box is covered 0.125 / 0.25 = 0.5 exactly by the generated
    # box, not above the 0.5 threshold; the effusion box not at all → no reference sentence spatially entailed
    assert scores["logical_recall"] == pytest.approx(1.0)
    assert scores["grounding_recall"] == 0.0 and scores["spatial_recall"] == 0.0
    assert scores["generated"][1] == {"sentence": "Left pleural effusion.", "entailed": True, "evidence": [1],
                                      "grounded": True}
    assert "1. Cardiomegaly.\n2. Left pleural effusion.\n3. No pneumothorax." in _Entailer.seen[0]


def test_mean_over_reports_and_cli(entailer, tmp_path, capsys):
    records = [{"id": "r1", "output": GENERATED, "reference": REFERENCE},
               {"id": "r2", "output": "Cardiomegaly [0.25, 0.25, 0.75, 0.75].", "reference": PERFECT},
               {"id": "r3", "output": [{"sentence": "GARBLE.", "boxes": []}], "reference": [{"sentence": "No finding."}]}]
    entails = LLMEntailment(JudgeClient(entailer, "entail-model", retries=0))
    metrics = grounded_report_metrics(records, entails)
    # r3: no grounded sentences; logical precision 0 (invalid answer = not entailed), recall 0
    assert metrics["logical_precision"] == pytest.approx((0.75 + 1 + 0) / 3)
    assert metrics["logical_recall"] == pytest.approx((1 + 1 + 0) / 3)
    assert metrics["grounding_precision"] == pytest.approx((0.5 + 1) / 2) and metrics["n_grounding_precision"] == 2
    assert metrics["grounding_recall"] == pytest.approx((0 + 1) / 2)
    assert metrics["spatial_precision"] == pytest.approx((1 / 3 + 1) / 2)
    assert metrics["spatial_recall"] == pytest.approx((0 + 1) / 2)
    assert metrics["n_invalid_judgements"] == 1 and metrics["n_scored"] == 3 and len(metrics["prompt_sha256"]) == 64
    assert grounded_report_metrics(records, None)["spatial_recall"].startswith("not computed")

    path = tmp_path / "grounded.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert radvlm(["evaluate", "--score", str(path), "--task", "grounded_report", "--judge-url", entailer,
                   "--judge-model", "m"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["spatial_precision"] == pytest.approx((1 / 3 + 1) / 2)

"""`radvlm filter-reports` against a real OpenAI-compatible HTTP server on loopback that edits
reports deterministically (drops the sentences that mention a prior study), and fails on cue:
slow answers (timeouts), refusals, empty answers, "None"."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dicom_node.cli import main as radvlm
from training.conversations import EndpointSettings
from training.filter_reports import FOLDER, LOG_FILE, RUN_FILE, decide, filter_reports, items_from_config, iter_log
from training.instructions import BuildConfig, build_dataset
from training.prompts import load_prompt

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
PRIOR = re.compile(r"prior|compared|unchanged|previous", re.IGNORECASE)


def edit(report: str) -> str:
    """The fake model's edit: drop every sentence that mentions a prior study."""
    sentences = re.split(r"(?<=\.)\s+", report.strip())
    kept = [s for s in sentences if not PRIOR.search(s)]
    return " ".join(kept) if kept else "None"


class FakeEditor:
    def __init__(self, slow_s: float = 1.5):
        self.requests: list[dict] = []
        editor = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                return

            def do_POST(self):  # noqa: N802 (http.server API)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                report = prompt.split("Report:\n", 1)[1].strip()
                editor.requests.append({"body": body, "report": report})
                if report.startswith("SLOW"):
                    time.sleep(slow_s)
                    content = report
                elif report.startswith("REFUSE"):
                    content = "I'm sorry, but I can't help with editing medical reports."
                elif report.startswith("EMPTY"):
                    content = "   "
                elif report.startswith("VERBOSE"):
                    content = report + " Additionally, the lungs appear well expanded and clear bilaterally. " * 3
                else:
                    content = edit(report)
                payload = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": content}}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):   # the client gave up (timeout)
                    pass

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
def editor():
    with FakeEditor() as server:
        yield server


HEADER = ("path_to_image,frontal_lateral,split,section_findings,section_impression,"
          "section_end_of_impression\n")
ROWS = [
    ("train/patient1/study1/view1_frontal.jpg", "train",
     "Heart size is normal. Compared to the prior study, the effusion is unchanged.\nLungs are clear.", ""),
    ("train/patient1/study1/view2_frontal.jpg", "train",   # second frontal image of the same study
     "Heart size is normal. Compared to the prior study, the effusion is unchanged.\nLungs are clear.", ""),
    ("train/patient2/study1/view1_frontal.jpg", "train", "SLOW report. No effusion.", ""),
    ("train/patient3/study1/view1_frontal.jpg", "train", "REFUSE this one. Small effusion.", ""),
    ("train/patient4/study1/view1_frontal.jpg", "train", "EMPTY answer here. Mild edema.", ""),
    ("train/patient6/study1/view1_frontal.jpg", "train", "VERBOSE answer. No pneumothorax.", ""),
    ("valid/patient5/study1/view1_frontal.jpg", "valid", "", "Unchanged since the prior exam."),
]


def chexpert_plus_tree(tmp_path: Path) -> Path:
    root = tmp_path / "CheXpertPlus"
    root.mkdir()
    lines = [HEADER] + [f'{path},Frontal,{split},"{findings}","{impression}",I have personally reviewed the images.\n'
                        for path, split, findings, impression in ROWS]
    (root / "df_chexpert_plus_240401.csv").write_text("".join(lines))
    return root


def job_file(tmp_path: Path, root: Path, mimic: Path | None = None) -> Path:
    text = f'[sources.chexpert_plus]\nroot = "{root}"\nreport_source = "filtered_reports"\n'
    if mimic is not None:
        text += f'[sources.mimic_cxr]\nroot = "{mimic}"\n'
    path = tmp_path / "build.toml"
    path.write_text(text)
    return path


def endpoint(url: str, **overrides) -> EndpointSettings:
    return EndpointSettings(**{"url": url, "model": "editor-7b", "api_key_env": "RADVLM_TEST_FILTER_KEY",
                               "timeout_s": 0.5, "temperature": 0.0, "max_attempts": 2, "backoff_s": 0.0,
                               **overrides})


def test_decide_by_hand():
    assert decide("A. B.", "A.").status == "filtered"
    assert decide("A. B.", "  None.  ").status == "removed"
    assert decide("A. B.", "").reason == "empty answer"
    assert decide("A. B.", "Sorry, I cannot do that.").reason.startswith("refusal")
    assert decide("Short.", "Short. " + "Added text. " * 10).reason.startswith("answer longer than the report")
    assert decide("A.\nB.", "A.\nB.").text == "A.\nB."                  # whitespace kept as answered


def test_filter_reports_writes_the_builders_layout_and_records_failures(tmp_path, editor):
    root = chexpert_plus_tree(tmp_path)
    mimic = Path(shutil.copytree(FIXTURES / "MIMIC-CXR-JPG", tmp_path / "MIMIC-CXR-JPG"))
    config = BuildConfig.model_validate({"sources": {"chexpert_plus": {"root": root, "report_source": "filtered_reports"},
                                                     "mimic_cxr": {"root": mimic}}})
    items = items_from_config(config)
    assert sorted(i.key for i in items if i.source == "chexpert_plus") == [
        "train_patient1_study1", "train_patient2_study1", "train_patient3_study1", "train_patient4_study1",
        "train_patient6_study1", "valid_patient5_study1"]      # one per study, train + test (CSV "valid")
    summary = filter_reports(items, endpoint(editor.url), progress=False)

    folder = root / FOLDER
    assert (folder / "train_patient1_study1.txt").read_text() == "Heart size is normal. Lungs are clear."
    for key in ("train_patient2_study1", "train_patient3_study1", "train_patient4_study1", "train_patient6_study1"):
        original = next(i.text for i in items if i.key == key)
        assert (folder / f"{key}.txt").read_text() == original          # failures keep the original text
    assert not (folder / "valid_patient5_study1.txt").exists()         # nothing left → no file, as upstream
    reasons = {e["key"]: (e["status"], e["reason"]) for e in iter_log(folder)}
    assert reasons["train_patient1_study1"] == ("filtered", "")
    assert reasons["train_patient2_study1"][0] == "original_kept"
    assert reasons["train_patient2_study1"][1].startswith("request failed") and "timed out" in \
        reasons["train_patient2_study1"][1]
    assert reasons["train_patient3_study1"][1].startswith("refusal: I'm sorry")
    assert reasons["train_patient4_study1"][1] == "empty answer"
    assert reasons["train_patient6_study1"][1].startswith("answer longer than the report")
    assert reasons["valid_patient5_study1"][0] == "removed"
    mimic_items = [i for i in items if i.source == "mimic_cxr"]
    assert len(mimic_items) == 3                        # frontal train (2 studies) + test (1), valid left out
    assert summary.counts["filtered"] == 1 + 3 and summary.counts["original_kept"] == 4
    mimic_files = sorted(p.name for p in (mimic / FOLDER).glob("*.txt"))
    assert mimic_files and all(p.removesuffix(".txt").isdigit() for p in mimic_files)     # {study_id}.txt
    run = json.loads((folder / RUN_FILE).read_text())
    assert run["model"] == "editor-7b" and run["prompt_sha256"] == load_prompt("filter_reports").sha256
    assert run["prompt_text"] == load_prompt("filter_reports").text
    assert editor.requests[0]["body"]["temperature"] == 0.0

    # the builder reads what was written
    built = build_dataset(BuildConfig.model_validate({"sources": {"chexpert_plus": {
        "root": root, "report_source": "filtered_reports"}}, "check_images": False}), tmp_path / "out", progress=False)
    train = [json.loads(line) for line in built.files["train"].read_text().splitlines()]
    answers = {r["conversations"][1]["value"] for r in train}
    assert "Heart size is normal. Lungs are clear." in answers
    assert not [line for line in built.files["test"].read_text().splitlines() if line.strip()]  # removed one

    # resumable: nothing is asked again; --retry-failed asks the four kept originals only
    asked = len(editor.requests)
    again = filter_reports(items, endpoint(editor.url), progress=False)
    assert len(editor.requests) == asked and again.counts["already_done"] == len(items)
    retry = filter_reports(items, endpoint(editor.url, max_attempts=1), retry_failed=True, progress=False)
    assert len(editor.requests) == asked + 4 and retry.counts["original_kept"] == 4


def test_cli_filter_reports(tmp_path, editor, capsys):
    root = chexpert_plus_tree(tmp_path)
    job = job_file(tmp_path, root)
    own = tmp_path / "upstream_prompt.txt"
    own.write_text("Remove prior studies.\nReport:\n$REPORT\n")
    code = radvlm(["filter-reports", "--config", str(job), "--url", editor.url, "--model", "m", "--timeout", "0.5",
                   "--max-attempts", "1", "--backoff", "0", "--prompt", str(own), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1 and "filtered 1, removed (nothing left) 1, original kept 4" in out   # some originals kept
    assert "original kept (refusal): 1" in out and "original kept (empty answer): 1" in out
    assert editor.requests[0]["body"]["messages"][0]["content"].startswith("Remove prior studies.\nReport:\n")
    assert json.loads((root / FOLDER / RUN_FILE).read_text())["prompt_path"] == str(own)
    assert len(list(iter_log(root / FOLDER))) == 6
    (tmp_path / "bad.txt").write_text("no placeholder")
    assert radvlm(["filter-reports", "--config", str(job), "--url", editor.url, "--model", "m",
                   "--prompt", str(tmp_path / "bad.txt")]) == 2
    assert "$REPORT" in capsys.readouterr().err
    assert (root / FOLDER / LOG_FILE).is_file()

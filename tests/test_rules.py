"""Routing rules (config.routing, dicom_node.rules): matching across attribute kinds and missing
tags, precise start-up errors, `radvlm rules test`, the rule recorded with the study, the
documented examples on pydicom-data's chest CR, and reload by SIGHUP on a running node."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from config import ConfigError, load_settings
from config.routing import RoutingRule
from dicom_node.cli import main
from dicom_node.jobstore import InstanceRecord, JobStore
from dicom_node.rules import explain_files, match
from dicom_node.scheduler import decide_study
from tests.conftest_node import storescu, wait_for
from tests.dicom_samples import make_cr_dataset, write

ROOT = Path(__file__).resolve().parent.parent
SECRET = "SMITH^JOHN-SECRET"


def _rules(*rules: dict) -> list[RoutingRule]:
    return [RoutingRule.model_validate(r) for r in rules]


def _load(tmp_path: Path, text: str, name: str = "rules.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_matching_across_attribute_kinds_and_missing_tags():
    ds = make_cr_dataset(view_position="PA")
    ds.Modality, ds.BodyPartExamined, ds.PatientAge = "CR", "CHEST", "045Y"
    ds.StudyDescription = f"Chest PA {SECRET}"
    rules = _rules(
        {"name": "equals", "action": "skip", "reason": "r", "when": [{"attribute": "Modality", "equals": "ct"}]},
        {"name": "in", "action": "skip", "reason": "r", "when": [{"attribute": "ViewPosition", "in": ["AP", "LL"]}]},
        {"name": "not_in", "action": "skip", "reason": "r", "when": [{"attribute": "BodyPartExamined",
                                                                      "not_in": ["chest"]}]},
        {"name": "regex", "action": "skip", "reason": "r", "when": [{"attribute": "StudyDescription",
                                                                     "matches": "^abdo"}]},
        {"name": "child", "action": "skip", "reason": "r", "when": [{"attribute": "PatientAge", "max": 17}]},
        {"name": "no-view", "action": "skip", "reason": "r", "when": [{"attribute": "ViewPosition",
                                                                       "present": False}]},
        {"name": "sender", "action": "skip", "reason": "r", "when": [{"attribute": "CallingAETitle",
                                                                      "equals": "WARD"}]},
        {"name": "adult-pa-chest", "action": "infer", "tasks": ["report"], "when": [
            {"attribute": "PatientAge", "min": 18, "max": 120},
            {"attribute": "StudyDescription", "matches": "chest"},
            {"attribute": "ViewPosition", "equals": "pa"},
            {"attribute": "SOPClassUID", "in": ["1.2.840.10008.5.1.4.1.1.1"]},
            {"attribute": "CallingAETitle", "present": True}]},
    )
    m = match(rules, ds, "ER_CR1")
    assert (m.index, m.name, m.action, m.tasks) == (7, "adult-pa-chest", "infer", ("report",))
    assert m.why == ("PatientAge (years) within [18, 120]", "StudyDescription matches /chest/",
                     "ViewPosition equals 'pa'", "SOPClassUID is one of ['1.2.840.10008.5.1.4.1.1.1']",
                     "CallingAETitle present")
    assert m.not_matched[0] == "rules[0] 'equals': Modality differs from 'ct'"
    assert m.not_matched[4] == "rules[4] 'child': PatientAge (years) outside [-, 17]"
    assert m.not_matched[6] == "rules[6] 'sender': CallingAETitle differs from 'WARD'"
    # reasons never carry header values (they may be patient data)
    assert not any(SECRET in line or "045" in line for line in (*m.why, *m.not_matched, m.explain()))
    # missing attributes: fail every test but present = false; the calling AE is unknown without a sender
    del ds.ViewPosition, ds.PatientAge
    m = match(rules, ds)
    assert (m.index, m.name) == (5, "no-view")
    assert "rules[4] 'child': PatientAge missing" in m.not_matched
    # age units: months, weeks, days in years; an unreadable age makes the rule not match, named
    for age, child in (("006M", True), ("010W", True), ("003D", True), ("017Y", True), ("018Y", False)):
        ds.PatientAge = age
        assert (match(rules[4:5], ds).index == 0) is child, age
    ds.PatientAge = "old"
    m = match(rules[4:5], ds)
    assert m.index is None and m.not_matched == ("rules[0] 'child': PatientAge is not a DICOM age string (nnnD/W/M/Y)",)
    # numeric VRs compare as numbers
    ds.Rows = 2048
    big = _rules({"name": "big", "action": "infer", "when": [{"attribute": "Rows", "min": 1024}]})
    assert match(big, ds).index == 0
    # no rule matches: no index, every reason listed
    assert match(_rules({"name": "ct", "action": "infer", "when": [{"attribute": "Modality", "equals": "CT"}]}),
                 ds).explain() == "no rule matched: rules[0] 'ct': Modality differs from 'CT'"


def test_default_rules_infer_everything():
    settings = load_settings(None, environ={})
    assert [(r.name, r.action, r.when, r.tasks, r.destinations) for r in settings.rules] == [
        ("default", "infer", [], None, None)]
    m = match(settings.rules, Dataset())
    assert m.index == 0 and m.explain() == "rules[0] 'default' → infer: no conditions (matches every instance)"


def test_invalid_rules_are_rejected_with_rule_and_field(tmp_path):
    cases = {
        '[[rules]]\nname = "typo"\naction = "infer"\nwhen = [{ attribute = "ViewPositon", equals = "PA" }]\n':
            "rules.0: Value error, rule 'typo': when[0] (ViewPositon): attribute 'ViewPositon' is not a DICOM"
            " keyword (e.g. Modality, ViewPosition) nor CallingAETitle",
        '[[rules]]\nname = "ok"\naction = "infer"\n[[rules]]\nname = "re"\naction = "skip"\nreason = "x"\n'
        'when = [{ attribute = "StudyDescription", matches = "(chest" }]\n':
            "rules.1: Value error, rule 're': when[0] (StudyDescription): matches: invalid regular expression"
            " (missing ), unterminated subpattern at position 0)",
        '[[rules]]\nname = "ages"\naction = "infer"\nwhen = [{ attribute = "PatientAge", min = 60, max = 18 }]\n':
            "rule 'ages': when[0] (PatientAge): min (60) is above max (18)",
        '[[rules]]\nname = "two"\naction = "infer"\nwhen = [{ attribute = "Modality", equals = "CR", in = ["DX"] }]\n':
            "rule 'two': when[0] (Modality): needs exactly one of equals, in, not_in, matches, min/max, present"
            " (has equals, in)",
        '[[rules]]\nname = "none"\naction = "infer"\nwhen = [{ attribute = "Modality" }]\n':
            "rule 'none': when[0] (Modality): needs exactly one of equals, in, not_in, matches, min/max, present"
            " (has none)",
        '[[rules]]\nname = "textrange"\naction = "infer"\nwhen = [{ attribute = "StudyDescription", min = 1 }]\n':
            "rule 'textrange': when[0] (StudyDescription): min/max need a numeric attribute (age string or number);"
            " StudyDescription is not one",
        '[[rules]]\nname = "noreason"\naction = "skip"\n':
            "rule 'noreason': action 'skip' needs a reason (recorded with every skipped study)",
        '[[rules]]\nname = "sk"\naction = "skip"\nreason = "x"\ntasks = ["report"]\n':
            "rule 'sk': tasks: only an 'infer' rule runs tasks (action is 'skip')",
        '[[rules]]\nname = "t"\naction = "infer"\ntasks = ["summary"]\n':
            "rules.0.tasks.0: Input should be 'report', 'classification' or 'grounding'",
        '[[rules]]\nname = "fwd"\naction = "forward"\n':
            "rule 'fwd': action 'forward' needs destinations (names of dicom, dicomweb or folder [[destinations]]",
        '[sr]\nfhir_patient_identifier_system = "urn:x"\n[[destinations]]\nname = "ehr"\nkind = "fhir"\n'
        'url = "http://ehr"\n[[rules]]\nname = "fwd"\naction = "forward"\ndestinations = ["ehr"]\n':
            "rules[0] 'fwd': destinations: ['ehr'] are fhir destinations; 'forward' sends source DICOM instances",
        '[[rules]]\nname = "x"\naction = "infer"\nwhen = [{ attribute = "Modality", equal = "CR" }]\n':
            "rules.0.when.0.equal: unknown key",
        '[[destinations]]\nname = "pacs"\nkind = "folder"\npath = "/tmp/x"\n'
        '[[rules]]\nname = "to-pacs2"\naction = "infer"\ndestinations = ["pacs2"]\n':
            "rules[0] 'to-pacs2': destinations: ['pacs2'] not among the named [[destinations]] (pacs)",
        'rules = []\n': "rules: List should have at least 1 item",
    }
    for text, expected in cases.items():
        with pytest.raises(ConfigError) as info:
            load_settings(_load(tmp_path, text), environ={})
        assert expected in str(info.value), (text, str(info.value))


def test_rules_test_cli_prints_the_match_and_why(tmp_path, rg1_uncr, capsys):
    config = _load(tmp_path, """
[[rules]]
name = "er-senders"
action = "infer"
tasks = ["report", "classification"]
when = [{ attribute = "CallingAETitle", in = ["ER_CR1"] }]

[[rules]]
name = "rest"
action = "skip"
reason = "sender is not an emergency-room modality"
""")
    assert main(["rules", "test", "--config", str(config), "--calling-ae", "ER_CR1", str(rg1_uncr)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{rg1_uncr}: rules[0] 'er-senders' → infer: CallingAETitle is one of ['ER_CR1']",
        "  tasks: report, classification; destinations: all",
        "  selector: frontal: frontal chest: ViewPosition=PA; BodyPartExamined=CHEST"]
    not_dicom = _load(tmp_path, "not dicom", "x.dcm")
    assert main(["rules", "test", "--config", str(config), str(rg1_uncr), str(not_dicom)]) == 2
    assert capsys.readouterr().out.splitlines() == [
        f"{rg1_uncr}: rules[1] 'rest' → skip: no conditions (matches every instance)",
        "  skipped with reason: sender is not an emergency-room modality",
        "  not matched: rules[0] 'er-senders': CallingAETitle missing",
        f"{not_dicom}: cannot be read: InvalidDicomError (not a readable DICOM file)"]
    assert main(["rules", "test", "--json", "--config", str(config), "--calling-ae", "ER_CR1", str(rg1_uncr)]) == 0
    [verdict] = json.loads(capsys.readouterr().out)
    assert (verdict["rule_index"], verdict["rule"], verdict["action"], verdict["tasks"]) == (
        0, "er-senders", "infer", ["report", "classification"])
    bad = _load(tmp_path, '[[rules]]\nname = "noreason"\naction = "skip"\n', "bad.toml")
    assert main(["rules", "test", "--config", str(bad), str(rg1_uncr)]) == 2
    assert "rule 'noreason': action 'skip' needs a reason" in capsys.readouterr().err


def _record(jobs: JobStore, ds: Dataset, path: Path, calling_ae: str = "ER_CR1") -> None:
    jobs.record_instance(InstanceRecord(
        ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality,
        str(ds.file_meta.TransferSyntaxUID), str(path), "0" * 64, 1, calling_ae, "p-x"))


def _decide(jobs: JobStore, rules: list[RoutingRule]):
    [(uid, last)] = jobs.studies_ready(quiet_seconds=0, now=time.time() + 1)
    return uid, decide_study(jobs, uid, last, rules)


def test_matched_rule_is_recorded_with_the_study_and_its_instances(tmp_path):
    jobs = JobStore(tmp_path / "jobs.sqlite3")
    rules = _rules(
        {"name": "pa-only", "action": "infer", "tasks": ["report"], "when": [{"attribute": "ViewPosition",
                                                                              "equals": "PA"}]},
        {"name": "not-pa", "action": "skip", "reason": "only PA views are sent to the model"})
    study = "1.2.826.0.1.3680043.8.498.77"
    pa = make_cr_dataset(view_position="PA", study_instance_uid=study)
    lat = make_cr_dataset(view_position="LL", study_instance_uid=study)
    _record(jobs, pa, write(pa, tmp_path / "pa.dcm"))
    _record(jobs, lat, write(lat, tmp_path / "lat.dcm"))
    uid, sel = _decide(jobs, rules)
    assert sel is not None and sel.chosen == pa.SOPInstanceUID
    row = jobs.study(uid)
    routing = json.loads(row["routing"])
    assert (routing["index"], routing["name"], routing["action"], routing["tasks"]) == (0, "pa-only", "infer",
                                                                                        ["report"])
    assert routing["why"] == ["ViewPosition equals 'PA'"]
    assert row["state"] == "selected" and row["rule"] == "ViewPosition"
    decisions = {r["sop_instance_uid"]: (r["decision"], r["reason"]) for r in jobs.instances_of(uid)}
    assert decisions[lat.SOPInstanceUID] == ("rule-skip", "rules[1] 'not-pa': only PA views are sent to the model")
    job = jobs.claim_job("w1", lease_seconds=60)
    assert job is not None and json.loads(job.routing)["tasks"] == ["report"]

    # an AP-only study: skipped by the rule, with its reason; the rule recorded
    ap = make_cr_dataset(view_position="AP", study_instance_uid="1.2.826.0.1.3680043.8.498.78")
    _record(jobs, ap, write(ap, tmp_path / "ap.dcm"))
    uid, sel = _decide(jobs, rules)
    row = jobs.study(uid)
    assert sel is not None and sel.chosen is None and row["state"] == "skipped"
    assert row["reason"] == "skipped by routing rule: rules[1] 'not-pa': only PA views are sent to the model"
    assert json.loads(row["routing"])["name"] == "not-pa"
    assert [e["detail"] for e in jobs.events(uid)][-1].startswith("routing-rule: skipped by routing rule")

    # the default rules keep today's behaviour: the same decision the selector alone makes
    lat2 = make_cr_dataset(view_position="LL", study_instance_uid="1.2.826.0.1.3680043.8.498.79")
    _record(jobs, lat2, write(lat2, tmp_path / "lat2.dcm"))
    [(uid, last)] = jobs.studies_ready(quiet_seconds=0, now=time.time() + 1)
    sel = decide_study(jobs, uid, last)
    row = jobs.study(uid)
    assert row["state"] == "skipped" and row["rule"] == "no-frontal-chest" and "lateral view" in row["reason"]
    assert json.loads(row["routing"])["name"] == "default"
    # a re-run forgets the routing: the rules in force then decide again
    jobs.rerun_study(uid)
    assert jobs.study(uid)["routing"] is None
    jobs.close()


def test_forward_sends_the_source_instances_without_inference(tmp_path):
    from dicom_node.audit import AuditLog
    from dicom_node.metrics import node_metrics
    from dicom_node.outbox import Outbox

    settings = load_settings(_load(tmp_path, f"""
[node]
data_dir = "{tmp_path / 'data'}"
[[destinations]]
name = "ct-archive"
kind = "folder"
path = "{tmp_path / 'ct-archive'}"
[[destinations]]
name = "pacs"
kind = "folder"
path = "{tmp_path / 'pacs'}"
[[rules]]
name = "ct-elsewhere"
action = "forward"
destinations = ["ct-archive"]
when = [{{ attribute = "Modality", equals = "CT" }}]
[[rules]]
name = "chest"
action = "infer"
"""), environ={})
    jobs = JobStore(tmp_path / "jobs.sqlite3")
    study = "1.2.826.0.1.3680043.8.498.90"
    ct = [make_cr_dataset(view_position="", study_instance_uid=study) for _ in range(2)]
    for n, ds in enumerate(ct):
        ds.Modality = "CT"
        _record(jobs, ds, write(ds, tmp_path / f"ct{n}.dcm"))
    [(uid, last)] = jobs.studies_ready(quiet_seconds=0, now=time.time() + 1)
    sel = decide_study(jobs, uid, last, settings.rules, settings.destinations)
    assert sel is not None and sel.chosen is None and sel.rule == "routing-forward"
    row = jobs.study(uid)
    assert row["state"] == "written" and json.loads(row["routing"])["name"] == "ct-elsewhere"
    assert row["reason"] == "forwarded by rules[0] 'ct-elsewhere': 2 instance(s) to ct-archive without inference"
    assert {r["decision"] for r in jobs.instances_of(uid)} == {"forwarded"}
    [delivery] = jobs.deliveries(study_uid=uid)
    assert (delivery.destination, delivery.kind, len(delivery.files)) == ("ct-archive", "folder", 2)
    outbox = Outbox(settings, jobs, AuditLog(tmp_path / "audit.jsonl"), node_metrics(), __import__("threading").Event())
    assert outbox.run_once("ct-archive")
    assert jobs.study(uid)["state"] == "delivered"
    sent = sorted((tmp_path / "ct-archive" / study).iterdir())
    assert sorted(dcmread(p).SOPInstanceUID for p in sent) == sorted(ds.SOPInstanceUID for ds in ct)
    assert not (tmp_path / "pacs").exists()
    jobs.close()


def _doc_examples() -> list[str]:
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("\n## Rules\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```toml\n(.*?)```", section, re.S)


def _rg1(rg1_uncr: Path, tmp_path: Path, name: str, **changes: str | None) -> Path:
    ds = dcmread(rg1_uncr)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path)
    return path


def test_documented_examples_on_the_chest_cr(tmp_path, rg1_uncr):
    examples = _doc_examples()
    assert len(examples) == 4
    verdicts: dict[str, list[tuple[str, str]]] = {}
    variants = {
        "er-senders": [({}, "ER_CR1", "er-senders", "infer"), ({}, "WARD_CR", "other-senders", "skip")],
        "adults": [({}, None, "children-or-age-unknown", "skip"), ({"PatientAge": "045Y"}, None, "adults", "infer"),
                   ({"PatientAge": "009Y"}, None, "children-or-age-unknown", "skip"),
                   ({"PatientAge": "006M"}, None, "children-or-age-unknown", "skip")],
        "pa-only": [({}, None, "pa-only", "infer"), ({"ViewPosition": "AP"}, None, "not-pa", "skip")],
        "ct-elsewhere": [({}, None, "chest-radiographs", "infer"), ({"Modality": "CT"}, None, "ct-elsewhere", "forward"),
                        ({"StudyDescription": None}, None, "rest", "skip")],
    }
    for index, example in enumerate(examples):
        rules = load_settings(_load(tmp_path, example, f"example{index}.toml"), environ={}).rules
        first = rules[0].name
        assert first in variants, first
        for n, (changes, calling_ae, name, action) in enumerate(variants[first]):
            path = _rg1(rg1_uncr, tmp_path, f"{first}-{n}", **changes) if changes else rg1_uncr
            [verdict] = explain_files(rules, [path], calling_ae)
            assert verdict.match is not None and (verdict.match.name, verdict.match.action) == (name, action), (
                first, changes, verdict.lines())
            if action == "infer":  # the real CR is a frontal chest image: the selector takes it
                assert verdict.selector.startswith("frontal: frontal chest: ViewPosition=PA")
            if action == "forward":
                assert verdict.lines()[1] == "  forwarded without inference to: ct-archive"
            verdicts.setdefault(first, []).append((name, action))
    assert set(verdicts) == set(variants)
    ct = load_settings(_load(tmp_path, examples[3], "ct.toml"), environ={})
    assert ct.rules[0].destinations == ["ct-archive"] and ct.rules[1].tasks == ["report"]
    assert ct.rules[1].destinations == ["pacs"]


def _node_config(tmp_path: Path, rules: str) -> Path:
    from tests.conftest_node import free_port

    cfg = tmp_path / "radvlm.toml"
    cfg.write_text(f"""
[node]
ae_title = "RADVLM"
port = {free_port()}
bind = "127.0.0.1"
data_dir = "{tmp_path / 'data'}"
min_free_space_mb = 0
quiet_period_seconds = 0.2
poll_interval_seconds = 0.1
http_port = {free_port()}
workers = 0

[api]
token = "rules-token"
{rules}""")
    return cfg


INFER_PA = '''
[[rules]]
name = "pa-only"
action = "infer"
when = [{ attribute = "ViewPosition", equals = "PA" }]

[[rules]]
name = "not-pa"
action = "skip"
reason = "only PA views"
'''
SKIP_ER = '''
[[rules]]
name = "er-senders"
action = "infer"
when = [{ attribute = "CallingAETitle", equals = "ER_CR1" }]

[[rules]]
name = "other-senders"
action = "skip"
reason = "sender is not an emergency-room modality"
'''


def _routing(db: Path, study: str) -> tuple[str, str] | None:
    with sqlite3.connect(db, timeout=10) as conn:
        row = conn.execute("SELECT state, routing FROM studies WHERE study_instance_uid=?", (study,)).fetchone()
    if row is None or row[0] == "received":
        return None
    return row[0], json.loads(row[1])["name"]


def _api(port: int, method: str, path: str, token: str | None = "rules-token") -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     data=b"" if method == "POST" else None)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_sighup_and_api_reload_the_rules_for_the_next_study(tmp_path):
    from tests.test_node_serve import ServeProcess

    config = _node_config(tmp_path, INFER_PA)
    node = ServeProcess(config)
    db = tmp_path / "data" / "jobs.sqlite3"
    try:
        port = node.ready["scp_port"]
        first = make_cr_dataset(view_position="PA", study_instance_uid="1.2.826.0.1.3680043.8.498.101")
        assert storescu(port, [write(first, tmp_path / "first.dcm")], calling="WARD_CR").returncode == 0
        assert wait_for(lambda: _routing(db, first.StudyInstanceUID), what="first decision") == ("selected", "pa-only")
        # an invalid file is refused: the rules in force stay
        config.write_text(config.read_text().replace('reason = "only PA views"\n', ""))
        node.proc.send_signal(signal.SIGHUP)
        log = tmp_path / "serve.log"
        wait_for(lambda: "configuration not reloaded" in log.read_text(), what="refused reload")
        assert "rule 'not-pa': action 'skip' needs a reason" in log.read_text()
        # the edit: same node settings, new rules
        text = config.read_text()
        config.write_text(text[: text.index("[[rules]]")] + SKIP_ER)
        node.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "routing rules reloaded: 0:er-senders, 1:other-senders" in log.read_text(), what="reload")
        second = make_cr_dataset(view_position="PA", study_instance_uid="1.2.826.0.1.3680043.8.498.102")
        assert storescu(port, [write(second, tmp_path / "second.dcm")], calling="WARD_CR").returncode == 0
        assert wait_for(lambda: _routing(db, second.StudyInstanceUID), what="second decision") == (
            "skipped", "other-senders")
        third = make_cr_dataset(view_position="PA", study_instance_uid="1.2.826.0.1.3680043.8.498.103")
        assert storescu(port, [write(third, tmp_path / "third.dcm")], calling="ER_CR1").returncode == 0
        assert wait_for(lambda: _routing(db, third.StudyInstanceUID), what="third decision") == (
            "selected", "er-senders")
        assert _routing(db, first.StudyInstanceUID) == ("selected", "pa-only")  # decided before: unchanged

        # the same through the API: an invalid file is refused with the rule and field, a valid one reloads
        http = node.ready["http_port"]
        assert _api(http, "GET", "/api/rules", token=None)[0] == 401
        status, body = _api(http, "GET", "/api/rules")
        assert status == 200 and [r["name"] for r in body["rules"]] == ["er-senders", "other-senders"]
        text = config.read_text()
        config.write_text(text[: text.index("[[rules]]")] + INFER_PA.replace("ViewPosition", "ViewPositon"))
        status, body = _api(http, "POST", "/api/rules/reload")
        assert status == 400 and "rule 'pa-only': when[0] (ViewPositon): attribute 'ViewPositon' is not a DICOM" \
            " keyword" in body["error"]["message"]
        config.write_text(text[: text.index("[[rules]]")] + INFER_PA)
        status, body = _api(http, "POST", "/api/rules/reload")
        assert status == 200 and [r["name"] for r in body["rules"]] == ["pa-only", "not-pa"]
        assert body["rules"][0]["when"] == [{"attribute": "ViewPosition", "equals": "PA"}]
        fourth = make_cr_dataset(view_position="PA", study_instance_uid="1.2.826.0.1.3680043.8.498.104")
        assert storescu(port, [write(fourth, tmp_path / "fourth.dcm")], calling="WARD_CR").returncode == 0
        assert wait_for(lambda: _routing(db, fourth.StudyInstanceUID), what="fourth decision") == (
            "selected", "pa-only")
    finally:
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(30) == 0
    audit = [json.loads(line) for line in (tmp_path / "data" / "audit.jsonl").read_text().splitlines()]
    assert [e.get("rules") for e in audit if e.get("event") == "rules_reloaded"] == [
        ["er-senders", "other-senders"], ["pa-only", "not-pa"]]
    from dicom_node.commands import list_jobs

    listed = {j["study_instance_uid"]: j for j in list_jobs(load_settings(config, environ={}))}
    assert listed[second.StudyInstanceUID]["routing"]["name"] == "other-senders"
    assert listed[third.StudyInstanceUID]["routing"]["why"] == ["CallingAETitle equals 'ER_CR1'"]


def test_rule_tasks_and_destinations_reach_the_worker(tmp_path, tiny_model_dir):
    """In-process node with the tiny model: the matched rule's tasks run (report only) and its
    results go to its destination only."""
    import pydicom

    from dicom_node.commands import list_outbox
    from dicom_node.service import Node
    from tests.dicom_samples import chest_phantom
    from tests.test_node_pipeline import node_settings

    settings = node_settings(tmp_path, tiny_model_dir, [
        {"kind": "folder", "path": str(tmp_path / "a"), "name": "a"},
        {"kind": "folder", "path": str(tmp_path / "b"), "name": "b"}])
    settings.rules = _rules({"name": "report-to-a", "action": "infer", "tasks": ["report"], "destinations": ["a"]})
    node = Node(settings).start()
    try:
        study = pydicom.uid.generate_uid()
        pa = make_cr_dataset(rows=96, columns=80, pixel_array=chest_phantom(96, 80), study_instance_uid=study)
        assert storescu(node.scp_port, [write(pa, tmp_path / "pa.dcm")], calling="ER_CR1").returncode == 0
        wait_for(lambda: (tmp_path / "a" / study / "result.json").is_file(), 120, what="result in destination a")
        result = json.loads((tmp_path / "a" / study / "result.json").read_text())
        assert {a["task"] for a in result["answers"]} == {"report"} and result["labels"] == {}
        assert [d["destination"] for d in list_outbox(settings)] == ["a"]
        assert not (tmp_path / "b").exists()
    finally:
        node.stop(5)

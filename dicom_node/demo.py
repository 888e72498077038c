"""`radvlm demo`: the whole chain on synthetic phantoms whose truth is known.

1. starts the node (``dicom_node.service.Node``) on embedded defaults — the shipped phantom demo
   model unless ``--model``/``[model] path`` says otherwise — in a temporary data directory, on
   free ports, with a folder destination that collects the delivered SR and FHIR Bundle;
2. writes held-out phantoms (a seed the demo model never saw in training) as DICOM studies, some
   with a lateral image the node must skip, and sends every file by C-STORE (pynetdicom SCU);
3. waits until every study is delivered (or failed), reads each delivered SR back
   (``sr_writer.readback``: labels, and each region's box from its pixel coordinates) and the
   FHIR Bundle, and prints per study: truth vs predicted labels and the IoU of every SR region
   against the phantom truth of its label;
4. scores the same held-out phantoms with the evaluation pipeline
   (``training.evaluation.phantoms``: report ROUGE-L, classification macro-F1, abnormality and
   anatomical grounding mAP@0.5) against issue 8's targets.

Synthetic phantoms and a phantom-trained model: a demonstration of the plumbing, not of
radiology. Nothing here is for clinical use.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from config import Settings, load_settings
from config.settings import FolderDestination
from dicom_node.errors import NodeError
from dicom_node.jobstore import DELIVERED, FAILED, SKIPPED, JobStore
from dicom_node.service import Node, jobstore_path

DEMO_SEED = 1000          # held out: the demo model trained on seeds 1–3, its tokenizer corpus is seed 9000
DEMO_PHANTOM_SIZE = 128   # what the demo model was trained on
DEMO_AE_TITLE = "RADVLM"
CALLING_AE_TITLE = "RADVLM-DEMO"
TERMINAL_STATES = (DELIVERED, SKIPPED, FAILED)


@dataclass
class RegionCheck:
    """One SR region read back, scored against the phantom truth boxes of its label."""

    label: str | None
    query: str | None
    box: list[float]
    iou: float | None  # best IoU with a truth box of the same label; None: the label is not true


@dataclass
class StudyCheck:
    phantom: str
    study_instance_uid: str
    state: str
    truth_labels: list[str]
    predicted_labels: list[str]
    regions: list[RegionCheck] = field(default_factory=list)
    laterals_skipped: int = 0
    fhir_resources: dict[str, int] = field(default_factory=dict)  # FHIR Bundle: resource type → count
    reason: str | None = None


@dataclass
class DemoResult:
    studies: list[StudyCheck]
    metrics: dict
    seconds: dict[str, float]
    work_dir: Path

    @property
    def completed(self) -> bool:
        return bool(self.studies) and all(s.state == DELIVERED for s in self.studies)


def demo_settings(base: Settings, data_dir: Path, delivered: Path) -> Settings:
    """The node's settings for the demo: embedded defaults (model included), a private data
    directory, a short quiet period and a folder destination. Ports: a configured ``[node] port`` /
    ``http_port`` (one that differs from the built-in default, from --config or RADVLM_NODE__*) is
    used as given, the HTTP endpoint then on (viewer and API during the demo); left at the defaults,
    the demo takes free ports and no HTTP endpoint, so it never collides with a node running there."""
    from config.settings import NodeSettings

    defaults = NodeSettings()
    settings = base.model_copy(deep=True)
    settings.node.data_dir = data_dir
    settings.node.port = base.node.port if base.node.port != defaults.port else 0
    if base.node.http_port != defaults.http_port:
        settings.node.http_port = base.node.http_port
        settings.node.http_enabled = base.node.http_enabled
    else:
        settings.node.http_port = 0
        settings.node.http_enabled = False  # not needed; its server (uvicorn) would reconfigure logging
    settings.node.bind = "127.0.0.1"
    settings.node.ae_title = DEMO_AE_TITLE
    settings.node.allowed_calling_ae_titles = []
    settings.node.quiet_period_seconds = 1.0
    settings.node.poll_interval_seconds = 0.2
    settings.node.min_free_space_mb = 16
    settings.node.workers = 1
    settings.destinations = [FolderDestination(kind="folder", path=delivered, name="demo-folder")]
    return settings


def send_files(paths: list[Path], port: int, host: str = "127.0.0.1", ae_title: str = DEMO_AE_TITLE) -> None:
    """C-STORE every file over one association; NodeError when a store is refused."""
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation

    ae = AE(ae_title=CALLING_AE_TITLE)
    for sop_class in (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation):
        ae.add_requested_context(sop_class)
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        raise NodeError(f"the demo could not open an association with the node on port {port}")
    try:
        for path in paths:
            status = assoc.send_c_store(dcmread(path))
            if not status or status.Status != 0x0000:
                raise NodeError(f"C-STORE of {path.name} refused: {getattr(status, 'Status', 'no status')}")
    finally:
        assoc.release()


def wait_for_studies(store_path: Path, study_uids: set[str], timeout: float) -> dict[str, str]:
    """Poll the job store until every study is delivered, skipped or failed; returns uid → state."""
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while True:
        jobs = JobStore(store_path)
        try:
            states = {uid: (row["state"] if (row := jobs.study(uid)) is not None else "not received")
                      for uid in study_uids}
        finally:
            jobs.close()
        if all(state in TERMINAL_STATES for state in states.values()) or time.monotonic() > deadline:
            return states
        time.sleep(0.25)


def _best_iou(box: list[float], truths: list[list[float]]) -> float | None:
    from training.evaluation.grounding import box_iou

    return max((box_iou(box, truth) for truth in truths), default=None)


def check_study(truth: dict, study_uid: str, state: str, delivered: Path, store_path: Path) -> StudyCheck:
    """Read the delivered SR and FHIR Bundle of one study and compare them with the phantom truth."""
    from pydicom import dcmread

    from inference.labels import NO_FINDING
    from inference.parsing import parse_labels
    from sr_writer.readback import read_sr_labels, read_sr_regions

    truth_labels = [label for label, present in truth["labels"].items() if present]
    check = StudyCheck(phantom=truth["id"], study_instance_uid=study_uid, state=state,
                       truth_labels=truth_labels, predicted_labels=[])
    jobs = JobStore(store_path)
    try:
        row = jobs.study(study_uid)
        check.reason = row["reason"] if row is not None else "never received"
        check.laterals_skipped = sum(1 for i in jobs.instances_of(study_uid) if i["decision"] == "lateral")
    finally:
        jobs.close()
    sr_path = delivered / study_uid / "sr.dcm"
    if not sr_path.is_file():
        return check
    sr = dcmread(sr_path)
    check.predicted_labels = [label for label, present in read_sr_labels(sr).items() if present]
    truth_boxes: dict[str, list[list[float]]] = {}
    for finding in truth["findings"]:
        truth_boxes.setdefault(finding["label"], []).extend(finding["boxes"])
    for region in read_sr_regions(sr, columns=truth["columns"], rows=truth["rows"]):
        label = region.label
        if label is None and region.text:
            label = next((name for name, present in parse_labels(region.text).items()
                          if present and name != NO_FINDING), None)
        box = [round(v, 4) for v in region.box.as_list()]
        check.regions.append(RegionCheck(label=label, query=region.text, box=box,
                                         iou=_best_iou(box, truth_boxes.get(label, []))))
    bundle_path = delivered / study_uid / "bundle.json"
    if bundle_path.is_file():
        bundle = json.loads(bundle_path.read_text(encoding="utf-8"))
        for entry in bundle.get("entry", []):
            kind = entry.get("resource", {}).get("resourceType", "?")
            check.fhir_resources[kind] = check.fhir_resources.get(kind, 0) + 1
    return check


def _labels_text(labels: list[str]) -> str:
    return ", ".join(labels) or "-"


def format_table(studies: list[StudyCheck]) -> str:
    """Per study: truth vs predicted labels, each SR region's IoU with the truth, laterals skipped."""
    lines = [f"{'phantom':<22} {'state':<10} {'lat.':>4}  truth labels → predicted labels (SR)",
             f"{'':<22} {'':<10} {'':>4}  SR region: label  IoU vs truth  [x1, y1, x2, y2]"]
    for study in studies:
        match = "=" if sorted(study.truth_labels) == sorted(study.predicted_labels) else "≠"
        lines.append(f"{study.phantom:<22} {study.state:<10} {study.laterals_skipped:>4}  "
                     f"{_labels_text(study.truth_labels)} {match} {_labels_text(study.predicted_labels)}")
        if study.fhir_resources:
            fhir = ", ".join(f"{n} {kind}" for kind, n in sorted(study.fhir_resources.items()))
            lines.append(f"{'':<22} {'':<10} {'':>4}  FHIR: {fhir}")
        for region in study.regions:
            iou = "n/a (label not true)" if region.iou is None else f"{region.iou:.2f}"
            box = ", ".join(f"{v:.3f}" for v in region.box)
            lines.append(f"{'':<22} {'':<10} {'':>4}  ↳ {region.label or '?'}: IoU {iou}  [{box}]")
        if study.state != DELIVERED and study.reason:
            lines.append(f"{'':<22} {'':<10} {'':>4}  reason: {study.reason}")
    return "\n".join(lines)


def format_metrics(metrics: dict) -> str:
    from training.evaluation.phantoms import TARGETS

    lines = [f"held-out phantoms: {metrics['n_phantoms']} (evaluation pipeline: training.evaluation)"]
    if "error" in metrics:
        return "\n".join(lines + [f"  {metrics['error']}"])
    names = {"classification_macro_f1": "classification macro-F1 (phantom labels, parser rule)",
             "grounding_abnormality_map_0.5": "abnormality grounding mAP@0.5",
             "grounding_anatomy_map_0.5": "anatomical grounding mAP@0.5",
             "report_rouge_l": "report ROUGE-L"}
    for key, name in names.items():
        value = metrics.get(key)
        if value is None:
            lines.append(f"  {name:<56} n/a")
            continue
        verdict = "met" if value >= TARGETS[key] else "MISSED"
        lines.append(f"  {name:<56} {value:.3f}   target ≥ {TARGETS[key]:.2f}  {verdict}")
    for key in ("grounding_abnormality_mean_iou", "grounding_anatomy_mean_iou"):
        if metrics.get(key) is not None:
            lines.append(f"  {key.replace('_', ' '):<56} {metrics[key]:.3f}")
    return "\n".join(lines)


def run_demo(count: int = 16, seed: int = DEMO_SEED, settings: Settings | None = None,
             work_dir: Path | None = None, timeout: float = 600.0, out: TextIO | None = None) -> DemoResult:
    """Run the demo; ``work_dir`` (kept) or a temporary directory (removed afterwards)."""
    out = out or sys.stdout  # looked up per call: a default bound at import outlives a closed stream
    from training.evaluation.phantoms import evaluate_phantoms
    from training.phantoms.dataset import write_phantom_dataset
    from training.phantoms.sampler import PhantomConfig

    if count < 1:
        raise ValueError("count must be at least 1")
    temporary = work_dir is None
    root = Path(tempfile.mkdtemp(prefix="radvlm-demo-")) if temporary else Path(work_dir)
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    try:
        started = time.perf_counter()
        config = PhantomConfig(size=DEMO_PHANTOM_SIZE)
        write_phantom_dataset(root / "phantoms", count, seed, config=config, png=False, variants="canonical",
                              tasks=("report",))
        truths = [json.loads(line) for line in (root / "phantoms" / "truth.jsonl").read_text().splitlines()]
        timings["phantoms"] = time.perf_counter() - started
        node_settings = demo_settings(settings or load_settings(), root / "node", root / "delivered")
        print(f"radvlm demo: {count} held-out phantom studies (seed {seed}) → node {DEMO_AE_TITLE} "
              f"with model {node_settings.model.path}", file=out, flush=True)
        started = time.perf_counter()
        node = Node(node_settings).start()
        timings["node_start"] = time.perf_counter() - started
        try:
            files = [root / "phantoms" / rel for truth in truths for rel in truth["dicom"]]
            study_of = {}
            from pydicom import dcmread

            for truth in truths:
                frontal = dcmread(root / "phantoms" / truth["dicom"][0], stop_before_pixels=True)
                study_of[str(frontal.StudyInstanceUID)] = truth
            started = time.perf_counter()
            send_files(files, node.scp_port)
            http = (f"; viewer and API on http://{node_settings.node.http_bind}:{node.http_port}/"
                    if node_settings.node.http_enabled and node.http_port else "")
            print(f"sent {len(files)} instances ({len(files) - len(truths)} laterals) by C-STORE to port "
                  f"{node.scp_port}{http}; waiting for results…", file=out, flush=True)
            states = wait_for_studies(jobstore_path(node_settings), set(study_of), timeout)
            timings["node_studies"] = time.perf_counter() - started
            studies = [check_study(study_of[uid], uid, states[uid], root / "delivered",
                                   jobstore_path(node_settings)) for uid in study_of]
            started = time.perf_counter()
            try:
                with node.model_lock:
                    metrics, _ = evaluate_phantoms(node.load_model(), seed, range(count), DEMO_PHANTOM_SIZE)
            except ImportError as exc:  # the metric packages are the `eval` extra
                metrics = {"n_phantoms": count, "error": f"metrics need the eval extra "
                                                         f"(pip install 'radvlm-pacs[eval]'): {exc}"}
            timings["evaluation"] = time.perf_counter() - started
        finally:
            node.stop(grace_seconds=5)
        print(format_table(studies), file=out)
        print(file=out)
        print(format_metrics(metrics), file=out)
        print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()), file=out)
        print("Synthetic phantoms and a phantom-trained demonstration model: not for clinical use.", file=out,
              flush=True)
        return DemoResult(studies=studies, metrics=metrics, seconds=timings, work_dir=root)
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)

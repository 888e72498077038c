"""The selection loop: once a study has been quiet for ``quiet_period_seconds``, decide it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from dicom_node.audit import AuditLog
from dicom_node.jobstore import JobStore
from dicom_node.metrics import Metrics
from dicom_node.selector import Candidate, Selection, read_header, select

log = logging.getLogger(__name__)


def decide_study(jobs: JobStore, study_uid: str, last_received_at: float) -> Selection | None:
    """Select one study; None when a new instance arrived meanwhile (the study waits again)."""
    candidates = []
    for order, row in enumerate(jobs.instances_of(study_uid)):
        try:
            candidates.append(Candidate(row["sop_instance_uid"], read_header(Path(row["path"])), None, order))
        except Exception as exc:  # corrupt file: recorded, never fatal
            candidates.append(Candidate(row["sop_instance_uid"], None, f"{type(exc).__name__}: {exc}", order))
    selection = select(candidates)
    if not jobs.apply_selection(study_uid, last_received_at, selection.chosen, selection.rule, selection.reason,
                                selection.decisions):
        return None
    return selection


class SelectionLoop(threading.Thread):
    def __init__(self, jobs: JobStore, audit: AuditLog, metrics: Metrics, quiet_seconds: float,
                 poll_seconds: float, stop: threading.Event,
                 on_selected: Callable[[], None] | None = None) -> None:
        super().__init__(name="radvlm-selector", daemon=True)
        self.jobs, self.audit, self.metrics = jobs, audit, metrics
        self.quiet_seconds, self.poll_seconds = quiet_seconds, poll_seconds
        self.stop_event = stop
        self.on_selected = on_selected

    def run(self) -> None:
        while not self.stop_event.wait(min(self.poll_seconds, max(self.quiet_seconds / 4, 0.05))):
            try:
                self.run_once()
            except Exception:
                log.exception("selection loop error")

    def run_once(self) -> int:
        decided = 0
        for study_uid, last in self.jobs.studies_ready(self.quiet_seconds):
            selection = decide_study(self.jobs, study_uid, last)
            if selection is None:
                continue
            decided += 1
            outcome = "selected" if selection.chosen else "skipped"
            self.metrics.inc("radvlm_studies_selected_total", outcome=outcome, rule=selection.rule)
            for d in selection.decisions:
                if d.decision != "selected":
                    self.metrics.inc("radvlm_instances_skipped_total", decision=d.decision)
            self.audit.write(f"study_{outcome}", study_instance_uid=study_uid, rule=selection.rule,
                             reason=selection.reason, sop_instance_uid=selection.chosen,
                             instances=[{"sop_instance_uid": d.sop_instance_uid, "decision": d.decision,
                                         "reason": d.reason} for d in selection.decisions])
            log.info("study %s %s (%s): %s", study_uid, outcome, selection.rule, selection.reason)
            if selection.chosen and self.on_selected is not None:
                self.on_selected()
        return decided

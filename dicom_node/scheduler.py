"""The selection loop: once a study has been quiet for ``quiet_period_seconds``, decide it.

One bad study never stops the others: an instance whose header cannot be interpreted gets its
own decision (``unreadable-header``, naming the attribute); should deciding a study still raise,
that study is failed with the reason and the loop goes on. ``/healthz`` reports the selector
degraded while a pass fails (e.g. the job store is unavailable).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from dicom_node.audit import AuditLog
from dicom_node.health import ComponentHealth
from dicom_node.jobstore import JobStore
from dicom_node.metrics import Metrics
from dicom_node.phi import code_location, error_reason
from config.routing import RoutingRule, default_rules
from config.settings import DestinationSettings
from dicom_node.jobstore import InstanceDecision
from dicom_node.rules import RuleMatch, match
from dicom_node.selector import Candidate, Selection, read_header, select

log = logging.getLogger(__name__)


def decide_study(jobs: JobStore, study_uid: str, last_received_at: float,
                 rules: Sequence[RoutingRule] | None = None,
                 destinations: Sequence[DestinationSettings] = ()) -> Selection | None:
    """Route and select one study; None when a new instance arrived meanwhile (the study waits again).

    Each readable instance is matched against the routing rules (first match wins): those a
    ``skip`` rule (or no rule) matches are left out with the rule's reason; the frontal selector
    chooses among the rest. The study records the rule of its chosen instance (else of the first
    instance a rule left out, else of the first instance). When no instance is chosen for inference
    and a ``forward`` rule matched, the instances it matched are queued to its ``destinations``
    (named in ``destinations``) and the study goes to 'written' (``Selection.rule`` "routing-forward")."""
    rules = default_rules() if rules is None else rules
    candidates: list[Candidate] = []
    left_out: list[InstanceDecision] = []
    matches: dict[str, RuleMatch] = {}
    forwards: list[tuple[str, str, RuleMatch]] = []
    for order, row in enumerate(jobs.instances_of(study_uid)):
        uid = row["sop_instance_uid"]
        try:
            header = read_header(Path(row["path"]))
        except Exception as exc:  # corrupt file: recorded, never fatal
            candidates.append(Candidate(uid, None, error_reason(exc), order))
            continue
        routed = matches[uid] = match(rules, header, row["calling_ae"])
        if routed.action == "infer":
            candidates.append(Candidate(uid, header, None, order))
        elif routed.action == "forward":
            forwards.append((uid, row["path"], routed))
        else:
            left_out.append(InstanceDecision(uid, "rule-skip", f"{routed.label}: {routed.reason}"))
    if forwards and (not candidates or select(candidates).chosen is None):
        return _forward(jobs, study_uid, last_received_at, forwards, candidates, left_out, destinations)
    for uid, _, routed in forwards:  # another instance is inferred: a study is inferred or forwarded
        left_out.append(InstanceDecision(uid, "rule-forward-not-sent", f"{routed.label}: not forwarded, another"
                                         " instance of the study was chosen for inference"))
    if candidates or not left_out:
        selection = select(candidates)
        decisions = selection.decisions + tuple(left_out)
        chosen, rule, reason = selection.chosen, selection.rule, selection.reason
        if chosen is None and left_out:
            reason += f"; {len(left_out)} instance(s) left out by routing rules: {left_out[0].reason}"
    else:
        decisions, chosen, rule = tuple(left_out), None, "routing-rule"
        reason = f"skipped by routing rule: {left_out[0].reason}" + (
            f" ({len(left_out)} instances)" if len(left_out) > 1 else "")
    routed = matches.get(chosen or "") or (matches.get(left_out[0].sop_instance_uid) if left_out else None) \
        or next(iter(matches.values()), None)
    routing = routed.to_json() if routed is not None else None
    if not jobs.apply_selection(study_uid, last_received_at, chosen, rule, reason, decisions, routing):
        return None
    return Selection(chosen, rule, reason, decisions)


def _forward(jobs: JobStore, study_uid: str, last_received_at: float,
             forwards: list[tuple[str, str, RuleMatch]], candidates: list[Candidate],
             left_out: list[InstanceDecision], destinations: Sequence[DestinationSettings]) -> Selection | None:
    by_name = {d.name: d for d in destinations if d.name}
    files: dict[str, list[str]] = {}
    decisions = list(left_out)
    for uid, path, routed in forwards:
        for name in routed.destinations or ():
            files.setdefault(name, []).append(path)
        decisions.append(InstanceDecision(uid, "forwarded", f"{routed.label}: to {', '.join(routed.destinations or ())}"))
    for candidate in candidates:  # matched an infer rule but not a frontal chest image
        decisions.append(InstanceDecision(candidate.sop_instance_uid, "not-forwarded",
                                          "matched an infer rule; no frontal chest image to infer"))
    missing = sorted(name for name in files if name not in by_name)
    if missing:  # rules reloaded with destinations the running node does not have
        raise ValueError(f"forward destination(s) {missing} not configured on this node (restart to add them)")
    first = forwards[0][2]
    deliveries = [(name, by_name[name].kind, paths) for name, paths in files.items()]
    reason = (f"forwarded by {first.label}: {len(forwards)} instance(s) to "
              f"{', '.join(files)} without inference")
    if not jobs.apply_forward(study_uid, last_received_at, "routing-forward", reason, decisions, first.to_json(),
                              deliveries):
        return None
    return Selection(None, "routing-forward", reason, tuple(decisions))


class SelectionLoop(threading.Thread):
    def __init__(self, jobs: JobStore, audit: AuditLog, metrics: Metrics, quiet_seconds: float,
                 poll_seconds: float, stop: threading.Event,
                 on_selected: Callable[[], None] | None = None, health: ComponentHealth | None = None) -> None:
        super().__init__(name="radvlm-selector", daemon=True)
        self.jobs, self.audit, self.metrics = jobs, audit, metrics
        self.quiet_seconds, self.poll_seconds = quiet_seconds, poll_seconds
        self.stop_event = stop
        self.on_selected = on_selected
        self.health = health or ComponentHealth()
        self.rules: Sequence[RoutingRule] = default_rules()
        """The routing rules in force; replaced as a whole on reload (SIGHUP), read once per study."""
        self.destinations: Sequence[DestinationSettings] = ()  # the node's destinations (forward rules name them)

    def run(self) -> None:
        while not self.stop_event.wait(min(self.poll_seconds, max(self.quiet_seconds / 4, 0.05))):
            try:
                self.run_once()
                self.health.ok("selector")
            except Exception as exc:
                reason = f"selection pass failed: {error_reason(exc)}"
                log.error("%s at %s", reason, code_location(exc))
                self.health.failing("selector", reason)

    def run_once(self) -> int:
        decided = 0
        for study_uid, last in self.jobs.studies_ready(self.quiet_seconds):
            if self.stop_event.is_set():
                break
            try:
                selection = decide_study(self.jobs, study_uid, last, self.rules, self.destinations)
            except Exception as exc:
                self._study_failed(study_uid, exc)
                continue
            if selection is None:
                continue
            decided += 1
            outcome = "selected" if selection.chosen else "forwarded" if selection.rule == "routing-forward" \
                else "skipped"
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

    def _study_failed(self, study_uid: str, exc: Exception) -> None:
        """Deciding this study raised: it gets a terminal state with the reason; the loop goes on.
        A job-store error is re-raised (it is not the study's fault: the pass is retried)."""
        if isinstance(exc, sqlite3.Error):
            raise exc
        reason = f"selection failed: {error_reason(exc)} at {code_location(exc)}"
        log.error("study %s: %s", study_uid, reason)
        if self.jobs.fail_study(study_uid, reason):
            self.metrics.inc("radvlm_studies_selected_total", outcome="failed", rule="error")
            self.audit.write("study_failed", study_instance_uid=study_uid, reason=reason)

"""The operations view of the node: studies with their per-stage timeline, deliveries with every
attempt, the queue, and the two actions (retry a delivery, re-run a study).

One set of functions over a :class:`JobStore` serves three front-ends: the CLI (``radvlm jobs``,
``radvlm outbox``), the token-protected JSON API below (``/api/operations/…``) and the page
``/viewer/operations.html`` that calls it.

* ``GET  /api/operations/queue`` — queue depth (studies waiting, inferring; deliveries pending) and
  throughput over the last 5 minutes and hour;
* ``GET  /api/operations/studies`` — studies, newest change first, with patient name, patient ID,
  accession number and study date read from the stored DICOM header (PHI: only in these
  authenticated answers, never logged);
* ``GET  /api/operations/studies/{uid}`` — one study: the above, matched rule, selection reason,
  per-instance decisions, timeline, deliveries with every attempt;
* ``GET  /api/operations/studies/{uid}/timeline`` — the stages alone;
* ``POST /api/operations/studies/{uid}/rerun`` — ``radvlm jobs rerun UID`` (outputs replaced);
* ``GET  /api/operations/deliveries`` — ``radvlm outbox list``, with attempts;
* ``POST /api/operations/deliveries/{id}/retry`` — ``radvlm outbox retry ID`` (a delivered one is
  re-sent, as ``--resend``).

The timeline comes from the job store's ``events`` table (every state change has been recorded
there with its time since the first release), so databases written before this page show it too.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.jobstore import (DEAD, DELIVERED, FAILED, INFERRING, PENDING, RECEIVED, SELECTED, SENDING, SKIPPED,
                                 WRITTEN, Delivery, JobStore)

if TYPE_CHECKING:
    from fastapi import APIRouter

    from config.settings import Settings

STAGES = (RECEIVED, SELECTED, INFERRING, WRITTEN, DELIVERED)
HEADER_TAGS = ("PatientName", "PatientID", "AccessionNumber", "StudyDate", "StudyTime", "StudyDescription",
               "Modality")


class UnknownDeliveryError(LookupError):
    """No delivery with that id in the job store."""


class UnknownStudyError(LookupError):
    """No study with that Study Instance UID in the job store."""


class ActionRefusedError(ValueError):
    """The action does not apply in the current state (e.g. a study still in progress)."""


def iso(value: float | None) -> str | None:
    return None if value is None else datetime.fromtimestamp(value, timezone.utc).isoformat(timespec="seconds")


# ---- header (PHI) -----------------------------------------------------------------------------
@lru_cache(maxsize=4096)
def _header(path: str, mtime_ns: int) -> dict[str, str | None]:
    from pydicom import dcmread  # here, not at import: the CLI starts without pydicom

    ds = dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
    return {tag: (str(ds.get(tag)) if ds.get(tag) not in (None, "") else None) for tag in HEADER_TAGS}


def _read_header(path: str) -> dict[str, str | None] | None:
    from pydicom.errors import InvalidDicomError

    try:
        return _header(path, Path(path).stat().st_mtime_ns)
    except (OSError, InvalidDicomError):
        return None


def study_header(jobs: JobStore, row: sqlite3.Row) -> dict[str, str | None]:
    """Patient name/ID, accession, study date and description from the selected (else first) stored
    instance; all None when no readable instance is left."""
    paths = []
    if row["selected_sop_instance_uid"]:
        selected = jobs.instance(row["selected_sop_instance_uid"])
        if selected is not None:
            paths.append(selected["path"])
    paths += [i["path"] for i in jobs.instances_of(row["study_instance_uid"])[:1]]
    for path in paths:
        header = _read_header(path)
        if header is None:
            continue
        return {"patient_name": header["PatientName"], "patient_id": header["PatientID"],
                "accession_number": header["AccessionNumber"], "study_date": _date(header["StudyDate"]),
                "study_description": header["StudyDescription"], "modality": header["Modality"]}
    return dict.fromkeys(("patient_name", "patient_id", "accession_number", "study_date", "study_description",
                          "modality"))


def _date(value: str | None) -> str | None:
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


# ---- timeline ---------------------------------------------------------------------------------
def timeline(jobs: JobStore, study_uid: str) -> dict[str, Any]:
    """The current run's stages (received → selected → inferring → written → delivered) with the
    time each was first reached and the seconds to the next one; a re-run starts a new run. Also
    the terminal skipped/failed state when the run ended there, and every event."""
    events = jobs.events(study_uid)
    start = 0
    for i, event in enumerate(events):
        if event["state"] == RECEIVED and (event["detail"] or "").startswith("re-run requested"):
            start = i
    run = events[start:]
    reached: dict[str, float] = {}
    for event in run:
        if event["state"] in STAGES and event["state"] not in reached:
            reached[event["state"]] = event["at"]
    stages = []
    times = [reached.get(s) for s in STAGES]
    for i, stage in enumerate(STAGES):
        at = times[i]
        following = next((t for t in times[i + 1:] if t is not None), None)
        stages.append({"stage": stage, "at": iso(at), "at_epoch": at,
                       "seconds_to_next": None if at is None or following is None else round(following - at, 3)})
    last = next((e for e in reversed(run) if e["state"] in (*STAGES, SKIPPED, FAILED)), None)
    ended = last if last is not None and last["state"] in (SKIPPED, FAILED) else None
    first, latest = (run[0]["at"], run[-1]["at"]) if run else (None, None)
    return {"study_instance_uid": study_uid, "stages": stages,
            "ended": None if ended is None else {"state": ended["state"], "at": iso(ended["at"]),
                                                 "reason": ended["detail"]},
            "total_seconds": None if first is None else round((reached.get(DELIVERED) or latest) - first, 3),
            "runs": sum(1 for e in events if e["state"] == RECEIVED and (e["detail"] or "").startswith("re-run")) + 1,
            "events": [{"at": iso(e["at"]), "state": e["state"], "detail": e["detail"]} for e in events]}


# ---- studies and deliveries --------------------------------------------------------------------
def _rule(row: sqlite3.Row) -> dict[str, Any]:
    """The image-selection rule, and the routing rule that decided the study when the job store
    records one (``studies.routing``, JSON of ``dicom_node.rules.RuleMatch``)."""
    out: dict[str, Any] = {"selection_rule": row["rule"]}
    if "routing" in row.keys():
        try:
            routing = json.loads(row["routing"]) if row["routing"] else None
        except json.JSONDecodeError:
            routing = None
        out["matched_rule"] = None if not isinstance(routing, dict) else {
            "name": routing.get("name"), "index": routing.get("index"), "action": routing.get("action"),
            "why": list(routing.get("why") or ()), "tasks": routing.get("tasks"),
            "destinations": routing.get("destinations"), "reason": routing.get("reason")}
    return out


def delivery_view(jobs: JobStore, delivery: Delivery) -> dict[str, Any]:
    attempts = jobs.delivery_attempts(delivery.id)
    return {"id": delivery.id, "study_instance_uid": delivery.study_instance_uid,
            "destination": delivery.destination, "kind": delivery.kind, "state": delivery.state,
            "tries": delivery.tries,
            "attempts_total": sum(1 for a in attempts if a["outcome"] != "requeued"),
            "next_attempt": iso(delivery.next_attempt_at) if delivery.state == PENDING else None,
            "delivered": iso(delivery.delivered_at), "last_error": delivery.last_error,
            "attempts": [{"try": a["try"], "started": iso(a["started_at"]), "ended": iso(a["ended_at"]),
                          "seconds": None if a["ended_at"] is None else round(a["ended_at"] - a["started_at"], 3),
                          "outcome": a["outcome"], "error": a["error"]} for a in attempts]}


def study_summary(jobs: JobStore, row: sqlite3.Row, *, phi: bool = True) -> dict[str, Any]:
    deliveries = jobs.deliveries(study_uid=row["study_instance_uid"])
    summary = {"study_instance_uid": row["study_instance_uid"], "state": row["state"], "reason": row["reason"],
               **_rule(row), "instances": row["instances"], "calling_ae": row["calling_ae"],
               "received": iso(row["first_received_at"]), "updated": iso(row["updated_at"]),
               "deliveries": {d.destination: d.state for d in deliveries}}
    if phi:
        summary.update(study_header(jobs, row))
    return summary


def _row(jobs: JobStore, study_uid: str) -> sqlite3.Row:
    row = jobs.study(study_uid)
    if row is None:
        raise UnknownStudyError(f"no study {study_uid} in the job store")
    return row


def study_detail(jobs: JobStore, study_uid: str, *, phi: bool = True) -> dict[str, Any]:
    row = _row(jobs, study_uid)
    return {**study_summary(jobs, row, phi=phi), "flags": row["flags"], "attempts": row["attempts"],
            "selected_sop_instance_uid": row["selected_sop_instance_uid"],
            "decisions": [{"sop_instance_uid": i["sop_instance_uid"], "modality": i["modality"],
                           "decision": i["decision"], "reason": i["reason"]}
                          for i in jobs.instances_of(study_uid)],
            "timeline": timeline(jobs, study_uid),
            "deliveries": [delivery_view(jobs, d) for d in jobs.deliveries(study_uid=study_uid)]}


def queue_status(jobs: JobStore, now: float | None = None) -> dict[str, Any]:
    now = now or time.time()
    counts = jobs.counts()
    studies, deliveries = counts["studies"], counts["deliveries"]
    return {"at": iso(now),
            "queue": {"studies_waiting": studies[RECEIVED] + studies[SELECTED], "studies_inferring": studies[INFERRING],
                      "deliveries_pending": deliveries[PENDING], "deliveries_sending": deliveries[SENDING],
                      "deliveries_dead": deliveries[DEAD]},
            "study_states": studies, "delivery_states": deliveries,
            "throughput": {"last_5_minutes": jobs.throughput(now - 300), "last_hour": jobs.throughput(now - 3600)}}


# ---- actions ----------------------------------------------------------------------------------
def retry_deliveries(jobs: JobStore, ids: Sequence[int] = (), study_uid: str | None = None,
                     include_delivered: bool = False) -> int:
    """``radvlm outbox retry``: re-queue deliveries, attempt history kept. Unknown ids raise
    :class:`UnknownDeliveryError` (nothing queued), an unknown study :class:`UnknownStudyError`."""
    missing = [i for i in ids if jobs.delivery(i) is None]
    if missing:
        raise UnknownDeliveryError("no deliver" + ("y" if len(missing) == 1 else "ies") + " with id "
                                   + ", ".join(map(str, missing)) + " (see `radvlm outbox list`)")
    if study_uid is not None:
        _row(jobs, study_uid)
    return jobs.retry_deliveries(ids, study_uid, include_delivered)


def retry_delivery(jobs: JobStore, delivery_id: int) -> dict[str, Any]:
    """The page's Retry: a dead or pending delivery is tried again now, a delivered one re-sent."""
    delivery = jobs.delivery(delivery_id)
    if delivery is None:
        raise UnknownDeliveryError(f"no delivery with id {delivery_id} (see `radvlm outbox list`)")
    if delivery.state == SENDING:
        raise ActionRefusedError(f"delivery {delivery_id} is being sent right now; retry when the try ends")
    queued = jobs.retry_deliveries([delivery_id], include_delivered=delivery.state == DELIVERED)
    return {"id": delivery_id, "queued": queued, "was": delivery.state}


def rerun_study(jobs: JobStore, study_uid: str) -> dict[str, Any]:
    """``radvlm jobs rerun``: selection and inference again; the results folder and the deliveries
    of the study are overwritten (one row per destination), never duplicated."""
    try:
        was = jobs.rerun_study(study_uid)
    except KeyError:
        raise UnknownStudyError(f"no study {study_uid} in the job store") from None
    except ValueError as exc:
        raise ActionRefusedError(str(exc)) from None
    return {"study_instance_uid": study_uid, "queued": True, "was": was}


# ---- HTTP --------------------------------------------------------------------------------------
def operations_router(settings: Settings, jobs: JobStore) -> APIRouter:
    from fastapi import APIRouter, Depends

    from inference.api import ApiError, bearer_auth

    router = APIRouter(prefix="/api/operations", dependencies=[Depends(bearer_auth(settings.api))])

    def _study_or_404(uid: str) -> dict[str, Any]:
        try:
            return study_detail(jobs, uid)
        except UnknownStudyError as exc:
            raise ApiError(404, str(exc), type_="not_found_error", code="unknown_study") from None

    @router.get("/queue")
    def queue() -> dict[str, Any]:
        return queue_status(jobs)

    @router.get("/studies")
    def studies(limit: int = 200, state: str | None = None) -> dict[str, Any]:
        rows = jobs.studies(state, max(1, min(limit, 1000)))
        return {"studies": [study_summary(jobs, r) for r in rows], **queue_status(jobs)}

    @router.get("/studies/{uid}")
    def study(uid: str) -> dict[str, Any]:
        return _study_or_404(uid)

    @router.get("/studies/{uid}/timeline")
    def study_timeline(uid: str) -> dict[str, Any]:
        if jobs.study(uid) is None:
            raise ApiError(404, f"no study {uid} in the job store", type_="not_found_error", code="unknown_study")
        return timeline(jobs, uid)

    @router.post("/studies/{uid}/rerun")
    def rerun(uid: str) -> dict[str, Any]:
        try:
            return rerun_study(jobs, uid)
        except UnknownStudyError as exc:
            raise ApiError(404, str(exc), type_="not_found_error", code="unknown_study") from None
        except ActionRefusedError as exc:
            raise ApiError(409, str(exc), type_="invalid_request_error", code="study_in_progress") from None

    @router.get("/deliveries")
    def deliveries(state: str | None = None) -> dict[str, Any]:
        return {"deliveries": [delivery_view(jobs, d) for d in jobs.deliveries(state)]}

    @router.post("/deliveries/{delivery_id}/retry")
    def retry(delivery_id: int) -> dict[str, Any]:
        try:
            return retry_delivery(jobs, delivery_id)
        except UnknownDeliveryError as exc:
            raise ApiError(404, str(exc), type_="not_found_error", code="unknown_delivery") from None
        except ActionRefusedError as exc:
            raise ApiError(409, str(exc), type_="invalid_request_error", code="delivery_in_progress") from None

    return router

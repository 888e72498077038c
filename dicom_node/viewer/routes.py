"""Data of the web viewer, all behind the ``[api] token`` bearer check:

* ``GET /api/studies`` — received studies with their state (no patient names or IDs);
* ``GET /api/studies/{uid}`` — state, image geometry and the AI result READ BACK FROM THE STORED
  SR (findings text, labels, one region per grounded box), so the page shows what the PACS got;
* ``GET /api/studies/{uid}/image.png`` — the selected image as the model saw it (same windowing);
* ``GET|POST|DELETE /api/studies/{uid}/chat`` — the conversation about the study, kept in the
  job store; POST ``{"question": "..."}`` asks the model (image prefix reused) and saves both turns.
"""

from __future__ import annotations

import io
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from config.settings import Settings
from dicom_node.jobstore import JobStore
from dicom_node.study_images import StudyImages
from inference.api import ApiError, answer_or_400, bearer_auth, box_payload, load_request_image
from inference.api_images import DicomReference
from inference.chat_service import ChatService, ModelUnavailableError
from inference.model import Turn
from inference.result import UNVERIFIED_NOTICE
from sr_writer.errors import SRReadError
from sr_writer.readback import read_sr

STATIC = Path(__file__).resolve().parent / "static"


class Question(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, max_length=2000)


def _time(value: float | None) -> str | None:
    return None if value is None else datetime.fromtimestamp(value, timezone.utc).isoformat(timespec="seconds")


def _study_row(jobs: JobStore, uid: str):
    row = jobs.study(uid)
    if row is None:
        raise ApiError(404, f"no study {uid} was received by this node", type_="not_found_error",
                       code="unknown_study")
    return row


def sr_summary(result_dir: str | None) -> dict[str, Any]:
    """The stored SR read back through sr_writer.readback (or why there is none)."""
    if not result_dir:
        return {"available": False, "reason": "no result written yet"}
    path = Path(result_dir) / "sr.dcm"
    try:
        sr = dcmread(path)
        contents = read_sr(sr)
    except FileNotFoundError:
        return {"available": False, "reason": "the SR file is missing from the results folder"}
    except (InvalidDicomError, SRReadError) as exc:
        return {"available": False, "reason": f"the stored SR cannot be read: {exc}"}
    return {
        "available": True, "sop_instance_uid": str(sr.SOPInstanceUID),
        "series_description": str(sr.get("SeriesDescription", "")),
        "verification_flag": str(sr.get("VerificationFlag", "")),
        "algorithm": {"name": contents.algorithm_name, "version": contents.algorithm_version},
        "findings_text": contents.findings_text, "labels": contents.labels,
        "referenced_sop_instance_uid": contents.referenced_sop_instance_uid,
        "regions": [{"tracking_uid": r.tracking_uid, "label": r.label, "text": r.text,
                     "finding": r.finding.meaning if r.finding else None, "finding_sites": list(r.finding_sites),
                     "box": r.box.as_list()} for r in contents.regions],
    }


def viewer_router(settings: Settings, jobs: JobStore, chat: ChatService, images: StudyImages) -> APIRouter:
    router = APIRouter(prefix="/api/studies", dependencies=[Depends(bearer_auth(settings.api))])

    @router.get("")
    def studies(limit: int = 200) -> dict[str, Any]:
        rows = jobs.studies(None, max(1, min(limit, 1000)))
        return {"notice": UNVERIFIED_NOTICE, "studies": [
            {"study_instance_uid": r["study_instance_uid"], "state": r["state"], "reason": r["reason"],
             "instances": r["instances"], "received": _time(r["first_received_at"]),
             "updated": _time(r["updated_at"]), "has_result": bool(r["result_dir"])} for r in rows]}

    @router.get("/{uid}")
    def study(uid: str) -> dict[str, Any]:
        row = _study_row(jobs, uid)
        image: dict[str, Any] | None = None
        if row["selected_sop_instance_uid"]:
            instance = jobs.instance(row["selected_sop_instance_uid"])
            try:
                header = dcmread(instance["path"], stop_before_pixels=True) if instance else None
            except (OSError, InvalidDicomError):
                header = None
            if header is not None:
                image = {"sop_instance_uid": row["selected_sop_instance_uid"], "columns": int(header.Columns),
                         "rows": int(header.Rows), "view_position": str(header.get("ViewPosition", "")) or None}
        return {"study_instance_uid": uid, "state": row["state"], "reason": row["reason"], "rule": row["rule"],
                "updated": _time(row["updated_at"]), "image": image, "notice": UNVERIFIED_NOTICE,
                "sr": sr_summary(row["result_dir"])}

    @router.get("/{uid}/image.png")
    def image_png(uid: str) -> Response:
        _study_row(jobs, uid)
        image = load_request_image(DicomReference("study", uid).url, images, settings.inference.allow_colour)
        buffer = io.BytesIO()
        Image.fromarray(image.pixels).save(buffer, format="PNG", compress_level=3)
        return Response(buffer.getvalue(), media_type="image/png", headers={"Cache-Control": "no-store"})

    @router.get("/{uid}/chat")
    def conversation(uid: str) -> dict[str, Any]:
        _study_row(jobs, uid)
        return {"study_instance_uid": uid, "turns": jobs.chat_turns(uid)}

    @router.post("/{uid}/chat")
    def ask(uid: str, body: Question) -> dict[str, Any]:
        _study_row(jobs, uid)
        question = body.question.strip()
        if not question:
            raise ApiError(400, "empty question", param="question")
        image = load_request_image(DicomReference("study", uid).url, images, settings.inference.allow_colour)
        history = [Turn(t["role"], t["text"]) for t in jobs.chat_turns(uid)]
        try:
            generation = answer_or_400(chat, image, [*history, Turn("user", question)])
        except ModelUnavailableError as exc:
            raise ApiError(503, str(exc), type_="service_unavailable", code="model_unavailable") from exc
        boxes = box_payload(generation.text, image)
        jobs.add_chat_exchange(uid, question, generation.text, boxes["boxes"])
        return {"study_instance_uid": uid, "question": question, "answer": generation.text, **boxes,
                "model": chat.info.model_id, "seconds": round(generation.seconds, 3), "notice": UNVERIFIED_NOTICE}

    @router.delete("/{uid}/chat")
    def clear(uid: str) -> dict[str, Any]:
        _study_row(jobs, uid)
        return {"study_instance_uid": uid, "deleted_turns": jobs.clear_chat(uid)}

    return router


def mount_viewer(app: FastAPI, settings: Settings, jobs: JobStore, chat: ChatService, images: StudyImages) -> None:
    app.include_router(viewer_router(settings, jobs, chat, images))
    app.mount("/viewer", StaticFiles(directory=STATIC, html=True), name="viewer")

"""Data of the web viewer, all behind the ``[api] token`` bearer check:

* ``GET /api/studies`` — received studies with their state, patient name, accession, date and
  description from the stored header (for the authenticated user, as on the operations page; never
  logged; no patient ID);
* ``GET /api/studies/{uid}`` — state, image geometry, ``display`` (window presets with the DICOM
  window as default, Patient Orientation) and the AI result READ BACK FROM THE STORED
  SR (findings text, labels, one region per grounded box), so the page shows what the PACS got;
* ``GET /api/studies/{uid}/image.png`` — the selected image as the model saw it (same windowing);
  with ``?center=C&width=W`` rendered server-side from the DICOM with that window (modality
  values, in the units of Window Center/Width; the decoded values are cached per instance);
  ``&preview=N`` gives a decimated image with the longer side ≤ N (sent while the mouse drags);
* ``GET|POST|DELETE /api/studies/{uid}/chat`` — the conversation about the study, kept in the
  job store; POST ``{"question": "..."}`` asks the model (image prefix reused) and saves both turns.
"""

from __future__ import annotations

import copy
import io
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from config.settings import Settings
from dicom_node.jobstore import JobStore
from dicom_node.operations import study_header
from dicom_node.study_images import StudyImages
from inference.api import ApiError, answer_or_400, bearer_auth, box_payload, load_request_image
from inference.api_images import DicomReference
from inference.chat_service import ChatService, ModelUnavailableError
from inference.errors import InputImageError
from inference.image import _apply_modality, _decode, _has_window, _lut_view, _window_fraction
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


@dataclass(frozen=True)
class WindowSource:
    """Modality values of one grayscale instance (float32) and what windowing them needs."""

    values: np.ndarray
    view: Any  # pydicom Dataset from inference.image._lut_view (no patient data)
    monochrome1: bool
    presets: list[dict[str, Any]]
    orientation: list[str] | None
    view_position: str | None


class WindowCache:
    """Decoded modality values per instance file, a few kept (re-windowing must not re-decode)."""

    def __init__(self, size: int = 4) -> None:
        self._items: OrderedDict[str, WindowSource] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, path: str) -> WindowSource:
        with self._lock:
            if path in self._items:
                self._items.move_to_end(path)
                return self._items[path]
        source = _window_source(path)
        with self._lock:
            self._items[path] = source
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return source


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _values(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]


def _window_source(path: str) -> WindowSource:
    ds = dcmread(path)
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    if int(ds.get("SamplesPerPixel") or 1) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputImageError("window/level needs a grayscale image")
    values = np.asarray(_apply_modality(_decode(ds, Path(path).name), ds), dtype=np.float32)
    sample = values[::4, ::4] if values.size > 250_000 else values
    low, p1, p99, high = (float(v) for v in np.percentile(sample, [0, 1, 99, 100]))
    low, high = min(low, float(values.min())), max(high, float(values.max()))
    presets: list[dict[str, Any]] = []
    if ds.get("VOILUTSequence"):
        presets.append({"name": "DICOM VOI LUT", "center": None, "width": None, "default": True})
    if _has_window(ds):
        centers, widths = _values(ds.WindowCenter), _values(ds.WindowWidth)
        explanations = _values(ds.get("WindowCenterWidthExplanation") or [])
        for i, (c, w) in enumerate(zip(centers, widths)):
            c, w = _number(c), _number(w)
            if c is None or w is None or w < 1:
                continue
            name = str(explanations[i]) if i < len(explanations) and explanations[i] else f"DICOM window {i + 1}"
            presets.append({"name": name, "center": c, "width": w, "default": not presets})
    # without a stored window the model saw min..max: "Full range" is the default then
    presets.append({"name": "Full range", "center": (low + high) / 2, "width": max(high - low, 1.0),
                    "default": not presets})
    presets.append({"name": "Auto (1–99 %)", "center": (p1 + p99) / 2, "width": max(p99 - p1, 1.0), "default": False})
    presets.append({"name": "High contrast", "center": (p1 + p99) / 2, "width": max((p99 - p1) / 2, 1.0),
                    "default": False})
    orientation = ds.get("PatientOrientation")
    orientation = [str(v) for v in orientation] if orientation and len(orientation) == 2 else None
    view = _lut_view(ds)
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in view:
            delattr(view, keyword)
    values.flags.writeable = False
    return WindowSource(values, view, photometric == "MONOCHROME1", presets, orientation,
                        str(ds.get("ViewPosition") or "") or None)


def render_window(source: WindowSource, center: float, width: float, preview: int | None = None) -> np.ndarray:
    """8-bit display pixels of `source` with the window (center, width), inverted for MONOCHROME1;
    with `preview`, every k-th pixel so that the longer side is at most `preview` (fast while dragging)."""
    view = copy.deepcopy(source.view)  # small (LUT attributes only); a shallow copy shares its elements
    view.WindowCenter, view.WindowWidth = center, width
    values = source.values
    if preview and max(values.shape) > preview:
        step = math.ceil(max(values.shape) / preview)
        values = values[::step, ::step]
    fraction = _window_fraction(values, view)
    pixels = np.rint(np.clip(fraction, 0.0, 1.0) * 255.0).astype(np.uint8)
    return 255 - pixels if source.monochrome1 else pixels


def viewer_router(settings: Settings, jobs: JobStore, chat: ChatService, images: StudyImages) -> APIRouter:
    router = APIRouter(prefix="/api/studies", dependencies=[Depends(bearer_auth(settings.api))])
    windows = WindowCache()

    def window_source(uid: str) -> WindowSource:
        path = str(images.instance_path(DicomReference("study", uid)))
        return windows.get(path)

    @router.get("")
    def studies(limit: int = 200) -> dict[str, Any]:
        rows = jobs.studies(None, max(1, min(limit, 1000)))
        return {"notice": UNVERIFIED_NOTICE, "studies": [
            {"study_instance_uid": r["study_instance_uid"], "state": r["state"], "reason": r["reason"],
             "instances": r["instances"], "received": _time(r["first_received_at"]),
             "updated": _time(r["updated_at"]), "has_result": bool(r["result_dir"]),
             **{k: v for k, v in study_header(jobs, r).items() if k in ("accession_number", "study_date",
                                                                       "study_description", "patient_name")}}
            for r in rows]}

    @router.get("/{uid}")
    def study(uid: str) -> dict[str, Any]:
        row = _study_row(jobs, uid)
        image: dict[str, Any] | None = None
        display: dict[str, Any] | None = None  # window presets (modality units), Patient Orientation
        if row["selected_sop_instance_uid"]:
            instance = jobs.instance(row["selected_sop_instance_uid"])
            try:
                header = dcmread(instance["path"], stop_before_pixels=True) if instance else None
            except (OSError, InvalidDicomError):
                header = None
            if header is not None:
                image = {"sop_instance_uid": row["selected_sop_instance_uid"], "columns": int(header.Columns),
                         "rows": int(header.Rows), "view_position": str(header.get("ViewPosition", "")) or None}
                try:
                    source = window_source(uid)
                    display = {"presets": source.presets, "orientation": source.orientation, "window_error": None}
                except Exception as exc:  # noqa: BLE001 - the viewer then shows the model's image only
                    display = {"presets": [], "orientation": None, "window_error": type(exc).__name__}
        return {"study_instance_uid": uid, "state": row["state"], "reason": row["reason"], "rule": row["rule"],
                "updated": _time(row["updated_at"]), "image": image, "display": display, "notice": UNVERIFIED_NOTICE,
                "sr": sr_summary(row["result_dir"])}

    @router.get("/{uid}/image.png")
    def image_png(uid: str, center: float | None = None, width: float | None = None,
                  preview: int | None = Query(default=None, ge=64, le=8192)) -> Response:
        _study_row(jobs, uid)
        if (center is None) != (width is None):
            raise ApiError(400, "give both center and width, or neither",
                           param="center" if center is None else "width")
        if center is None or width is None:
            reference = DicomReference("study", uid).url
            pixels = load_request_image(reference, images, settings.inference.allow_colour).pixels
        else:
            if not (math.isfinite(center) and math.isfinite(width)) or width < 1:
                raise ApiError(400, "width must be a number ≥ 1 and center a finite number", param="width")
            load_request_image(DicomReference("study", uid).url, images, settings.inference.allow_colour)  # 404/409
            try:
                pixels = render_window(window_source(uid), center, width, preview)
            except (InputImageError, OSError, InvalidDicomError, ValueError, TypeError, ZeroDivisionError) as exc:
                raise ApiError(409, f"this image cannot be re-windowed ({type(exc).__name__})",
                               code="no_window") from exc
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
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

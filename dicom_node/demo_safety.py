"""Safe by default: results of the shipped phantom demo model never reach a PACS or an EHR unasked.

The demo model (``inference/demo_model/phantom-v1``, the embedded default of ``[model] path``) was
trained only on synthetic phantoms; on a real radiograph its findings are meaningless. Its results
are labelled DEMONSTRATION PHANTOM MODEL by the writers (``ModelInfo.demonstration``), and the
outbox refuses to send them to ``dicom``, ``dicomweb`` and ``fhir`` destinations unless
``[node] allow_demo_model_delivery = true``. Folder destinations are unaffected.

Whether a delivery holds a demo result is read from the ``result.json`` that the worker writes
beside its files (``dicom_node.results``) — the model that produced the result decides, not the
model the node runs now (a node restarted on real weights still refuses its earlier demo results).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from config.settings import Settings
from dicom_node.destinations import Destination, PermanentDeliveryError
from inference.demo_model import demonstration_reason

log = logging.getLogger(__name__)

REFUSED_KINDS = ("dicom", "dicomweb", "fhir")
ALLOW_SETTING = "[node] allow_demo_model_delivery"


class DemoModelDeliveryRefused(PermanentDeliveryError):
    """A demo-model result was not sent to a PACS/EHR destination (dead-lettered at once, with this reason)."""


def startup_warning(settings: Settings) -> str | None:
    """The loud start-up warning of a node whose ``[model] path`` is the demo model, else None."""
    reason = demonstration_reason(settings.model.path)
    if reason is None:
        return None
    refused = [d.name or d.kind for d in settings.destinations if d.kind in REFUSED_KINDS]
    if not refused:
        delivery = "no dicom/dicomweb/fhir destination is configured"
    elif settings.node.allow_demo_model_delivery:
        delivery = (f"{ALLOW_SETTING} = true: its results WILL be sent to {', '.join(refused)}")
    else:
        delivery = (f"deliveries to {', '.join(refused)} will be refused; set [model] path to the RadVLM "
                    f"weights (or {ALLOW_SETTING} = true for a demonstration)")
    return (f"DEMONSTRATION PHANTOM MODEL — NOT FOR CLINICAL USE: {reason}. It was trained only on synthetic "
            f"phantoms and its findings on real radiographs are meaningless; every SR, GSPS and FHIR result is "
            f"labelled DEMONSTRATION PHANTOM MODEL; {delivery}.")


def _result_is_demonstration(files: Sequence[str]) -> bool:
    """From the ``result.json`` beside the delivery's files; False when there is none to read."""
    if not files:
        return False
    try:
        result = json.loads((Path(files[0]).parent / "result.json").read_text(encoding="utf-8"))
        return bool(result["model"].get("demonstration", False))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def check_delivery(dest: Destination, settings: Settings, files: Sequence[str]) -> None:
    """Raise DemoModelDeliveryRefused when ``files`` are a demo-model result bound for a PACS/EHR
    destination and ``[node] allow_demo_model_delivery`` is off."""
    if dest.kind not in REFUSED_KINDS or settings.node.allow_demo_model_delivery:
        return
    if _result_is_demonstration(files):
        raise DemoModelDeliveryRefused(
            f"refused: this result comes from the DEMONSTRATION PHANTOM MODEL (trained only on synthetic "
            f"phantoms; NOT FOR CLINICAL USE) and is not sent to {dest.kind} destinations. Point [model] path "
            f"at the RadVLM weights, or set {ALLOW_SETTING} = true to send demonstration results, then run "
            "`radvlm outbox retry`")

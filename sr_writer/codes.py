"""The coded concepts the writers use: SNOMED CT / LOINC / DICOM (DCM) codes for the 14 labels,
anatomy, devices and the report itself (design §8; the table is documented in docs/codes.md).

Codes marked *verified* appear in the DICOM PS3.16 tables shipped with pydicom 3.0.2 (CID in the
comment); the others are SNOMED CT concepts that no DICOM context group lists (checked by name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.sr.coding import Code

from inference.labels import LABELS, NO_FINDING

FHIR_SYSTEMS: dict[str, str] = {
    "SCT": "http://snomed.info/sct",
    "LN": "http://loinc.org",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UMLS": "http://www.nlm.nih.gov/research/umls",
}
"""FHIR ``Coding.system`` for each DICOM coding scheme designator we use."""

# --- report level -----------------------------------------------------------------------------
CHEST_XR_SINGLE_VIEW = Code("36554-4", "LN", "XR Chest Single view")
"""Procedure reported (TID 1500, CID 100 is extensible) and DiagnosticReport.code."""
FINDINGS = Code("59776-5", "LN", "Findings")                      # verified, CID 7001
IMPRESSIONS = Code("19005-8", "LN", "Impressions")                # verified, CID 7001
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 12
FINDING = Code("121071", "DCM", "Finding")                        # verified
COMMENT = Code("121106", "DCM", "Comment")                        # verified; the grounded phrase
IMAGING_MEASUREMENTS = Code("126010", "DCM", "Imaging Measurements")  # TID 1500 row 6
IMAGING_MEASUREMENT_REPORT = Code("126000", "DCM", "Imaging Measurement Report")  # CID 7021
ALGORITHM_OBSERVER_ROLE = Code("121007", "DCM", "Device")          # verified, CID 270
PRESENT = Code("52101004", "SCT", "Present")                       # verified, CID 240
ABSENT = Code("272519000", "SCT", "Absent")                        # verified, CID 240
BOUNDED_BY = Code("75958009", "SCT", "Bounded by")                 # verified, CID 219
RADIOLOGY_CATEGORY_LOINC = Code("LP29684-5", "LN", "Radiology")   # FHIR category (US Core)
FHIR_RAD_CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0074"

# --- anatomy (all verified in pydicom's tables) ----------------------------------------------
LUNG = Code("39607008", "SCT", "Lung")
HEART = Code("80891009", "SCT", "Heart")
MEDIASTINUM = Code("72410000", "SCT", "Mediastinum")
PLEURA = Code("3120008", "SCT", "Pleura")
RIB = Code("113197003", "SCT", "Rib")
CLAVICLE = Code("51299004", "SCT", "Clavicle")
AORTIC_ARCH = Code("57034009", "SCT", "Aortic arch")
HILUM = Code("46750007", "SCT", "Hilum of lung")
TRACHEA = Code("44567001", "SCT", "Trachea")
CARINA = Code("28700002", "SCT", "Carina")
DIAPHRAGM = Code("5798000", "SCT", "Diaphragm")
THORACIC_SPINE = Code("122495006", "SCT", "Thoracic spine")
UPPER_ABDOMEN = Code("80581009", "SCT", "Upper abdomen")
SVC = Code("48345005", "SCT", "Superior vena cava")
RIGHT_ATRIUM = Code("73829009", "SCT", "Right atrium")
APEX_OF_LUNG = Code("86598002", "SCT", "Apex of lung")
UPPER_ZONE = Code("281392002", "SCT", "Upper zone of lung")
MIDDLE_ZONE = Code("281393007", "SCT", "Middle zone of lung")
LOWER_ZONE = Code("281394001", "SCT", "Lower zone of lung")
RIGHT = Code("24028007", "SCT", "Right")                           # CID 244
LEFT = Code("7771000", "SCT", "Left")                              # CID 244
BILATERAL = Code("51440002", "SCT", "Right and left")              # CID 244
BASAL = Code("57195005", "SCT", "Basal")                           # CID 2

# --- devices (CID 6138, verified) -------------------------------------------------------------
NON_LESION = Code("111102", "DCM", "Non-lesion")
DEVICE_KEYWORDS: tuple[tuple[tuple[str, ...], Code], ...] = (
    (("endotracheal", "et tube", "ett"), Code("26412008", "SCT", "Endotracheal tube")),
    (("central line", "central venous", "picc", "cvc"), Code("112174", "DCM", "Central line")),
    (("chest tube", "chest drain", "pleural drain"), Code("112173", "DCM", "Chest tube")),
    (("feeding tube", "nasogastric", "ng tube", "enteric tube"), Code("25062003", "SCT", "Feeding tube")),
    (("pacemaker", "pacer", "icd"), Code("14106009", "SCT", "Cardiac pacemaker")),
    (("catheter",), Code("19923001", "SCT", "Catheter")),
)


@dataclass(frozen=True)
class LabelCoding:
    """How one CheXpert-style label is coded: the finding and, where useful, its site."""

    label: str
    finding: Code
    site: Code | None
    verified: bool
    note: str = ""

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(f"unknown label {self.label!r}")
        if len(self.finding.meaning) > 64:
            raise ValueError(f"code meaning too long for DICOM: {self.finding.meaning!r}")


LABEL_CODES: dict[str, LabelCoding] = {c.label: c for c in (
    LabelCoding("atelectasis", Code("46621007", "SCT", "Atelectasis"), LUNG, False,
                "DICOM CIDs only list 40779009 plate-like atelectasis"),
    LabelCoding("cardiomegaly", Code("8186001", "SCT", "Cardiomegaly"), HEART, False,
                "not 287272002 (CID 12248), which SNOMED names otherwise"),
    LabelCoding("consolidation", Code("95436008", "SCT", "Lung consolidation"), LUNG, False),
    LabelCoding("edema", Code("19242006", "SCT", "Pulmonary edema"), LUNG, True, "CID 3700"),
    LabelCoding("enlarged cardiomediastinum", Code("260376009", "SCT", "Enlarged"), MEDIASTINUM,
                True, "no exact concept: Enlarged (CID 6107) at site Mediastinum"),
    LabelCoding("fracture", Code("125605004", "SCT", "Fracture of bone"), None, False,
                "site (rib, clavicle) only when the text names it"),
    LabelCoding("lung lesion", Code("52988006", "SCT", "Lesion"), LUNG, True,
                "no exact concept: Lesion (CID 6335) at site Lung"),
    LabelCoding("lung opacity", Code("112033", "DCM", "Abnormal opacity"), LUNG, True, "CID 6101"),
    LabelCoding("pleural effusion", Code("60046008", "SCT", "Pleural effusion"), PLEURA, True,
                "CID 645"),
    LabelCoding("pleural other", Code("263654008", "SCT", "Abnormal"), PLEURA, True,
                "no exact concept: Abnormal (CID 222) at site Pleura"),
    LabelCoding("pneumonia", Code("233604007", "SCT", "Pneumonia"), LUNG, False),
    LabelCoding("pneumothorax", Code("36118008", "SCT", "Pneumothorax"), PLEURA, True, "CID 6102"),
    LabelCoding("support devices", NON_LESION, None, True,
                "refined to the device type (CID 6138) when the text names one"),
    LabelCoding(NO_FINDING, Code("17621005", "SCT", "Normal"), None, True, "CID 222"),
)}

if set(LABEL_CODES) != set(LABELS):  # pragma: no cover - guards edits of either table
    raise RuntimeError("LABEL_CODES must cover exactly inference.labels.LABELS")


@dataclass(frozen=True)
class AnatomicSite:
    """An anatomic location with optional laterality and topographical modifier."""

    location: Code
    laterality: Code | None = None
    modifier: Code | None = None


_ANATOMY_KEYWORDS: tuple[tuple[str, Code, Code | None], ...] = (
    # (regex, location, topographical modifier) — the first match wins, most specific first
    (r"costophrenic", LOWER_ZONE, BASAL),
    (r"\bapex|\bapical", APEX_OF_LUNG, None),
    (r"upper (?:lung )?(?:zone|lobe)|upper lung", UPPER_ZONE, None),
    (r"mid(?:dle)? (?:lung )?(?:zone|lobe)|mid lung", MIDDLE_ZONE, None),
    (r"lower (?:lung )?(?:zone|lobe)|lower lung|\bbas(?:e|al|ilar)\b", LOWER_ZONE, None),
    (r"aortic arch|aortic knob", AORTIC_ARCH, None),
    (r"\bhil(?:um|ar|a)\b", HILUM, None),
    (r"\bcarina", CARINA, None),
    (r"\btrachea", TRACHEA, None),
    (r"cardiac|heart", HEART, None),
    (r"mediastin", MEDIASTINUM, None),
    (r"hemidiaphragm|diaphragm", DIAPHRAGM, None),
    (r"clavicle", CLAVICLE, None),
    (r"\bribs?\b", RIB, None),
    (r"spine|vertebra", THORACIC_SPINE, None),
    (r"abdomen", UPPER_ABDOMEN, None),
    (r"superior vena cava|\bsvc\b", SVC, None),
    (r"right atri", RIGHT_ATRIUM, None),
    (r"pleura", PLEURA, None),
    (r"\blungs?\b", LUNG, None),
)


def anatomic_site_for_text(text: str) -> AnatomicSite | None:
    """Map an anatomical region or sentence ("left lower zone", "right costophrenic angle",
    "cardiac silhouette") to a coded site, or None when nothing is recognised."""
    lowered = text.lower()
    for pattern, location, modifier in _ANATOMY_KEYWORDS:
        if re.search(pattern, lowered):
            laterality: Code | None = None
            has_right = re.search(r"\bright\b", lowered) is not None and location != RIGHT_ATRIUM
            has_left = re.search(r"\bleft\b", lowered) is not None
            if re.search(r"\bbilateral|\bboth\b", lowered) or (has_right and has_left):
                laterality = BILATERAL
            elif has_right:
                laterality = RIGHT
            elif has_left:
                laterality = LEFT
            return AnatomicSite(location, laterality, modifier)
    return None


def device_for_text(text: str) -> Code | None:
    """The CID 6138 device type a text names (e.g. "endotracheal tube"), else None."""
    lowered = text.lower()
    for keywords, code in DEVICE_KEYWORDS:
        if any(re.search(rf"\b{re.escape(k)}\b", lowered) for k in keywords):
            return code
    return None


def finding_for_label(label: str, text: str = "") -> Code:
    """The finding code of ``label``; support devices are refined by the device ``text`` names."""
    try:
        coding = LABEL_CODES[label]
    except KeyError:
        raise ValueError(f"unknown label {label!r}; expected one of {list(LABELS)}") from None
    if label == "support devices":
        return device_for_text(text) or coding.finding
    return coding.finding


def site_for(label: str | None, text: str) -> AnatomicSite | None:
    """The finding site: what the text names (with laterality), else the label's default site."""
    named = anatomic_site_for_text(text)
    if named is not None:
        return named
    if label is not None and LABEL_CODES[label].site is not None:
        return AnatomicSite(LABEL_CODES[label].site)  # type: ignore[arg-type]
    return None


def fhir_coding(code: Code) -> dict[str, str]:
    """A FHIR Coding (as a dict) for a DICOM-style code."""
    try:
        system = FHIR_SYSTEMS[code.scheme_designator]
    except KeyError:
        raise ValueError(f"no FHIR system for coding scheme {code.scheme_designator!r}") from None
    return {"system": system, "code": code.value, "display": code.meaning}

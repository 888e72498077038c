"""The RadVLM task phrasings, in one place (design §3 "Prompts", §5).

Training imports this module to build instruction data; inference asks the canonical question of
each task, so the model is always asked the way it was taught.

Source of every phrasing below: upstream ``radvlm/data/create_instructions.py`` (RadVLM,
uzh-dqbm-cmi; the module that ``radvlm/data/datasets.py`` and ``create_llava_dataset.py`` import
with ``from radvlm.data.create_instructions import ...``). The public index did not hold that file
in the uzh-dqbm-cmi repository itself; it was read from the fork ``rfahrn/RadVLM`` (commit
e0ec5f04059b44ee25956c734499f89243d6b3d7), whose lists are the complete ones (a second, Qwen-2.5VL
fork carries shortened copies of the same lists). Upstream picks one variant at random per
training sample and, in its evaluation script, per test sample; we ask the canonical variant
(the one quoted in design §5) so that runs are deterministic.

Functions mirror upstream:
- ``generate_instruction_report_generation``   → REPORT_PROMPT_VARIANTS
- ``generate_instruction_abnormalities``       → CLASSIFICATION_* (CheXpert / MIMIC labels)
- ``generate_instruction_location``            → GROUNDING_* (Chest ImaGenome regions *and*
                                                 VinDr-CXR single-label abnormality grounding)
- ``generate_instruction_abnormalities_grouped`` → DETECTION_* (VinDr-CXR, all findings + boxes)
- ``generate_instruction_phrase_location``     → PHRASE_GROUNDING_* (MS-CXR, PadChest-GR)
- ``format_boxes``                              → format_box / format_boxes
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from inference.labels import LABELS, NO_FINDING
from inference.result import Box

SYSTEM_PROMPT = "You are a helpful assistant."
"""Upstream fine-tuned with the LLaVA-OneVision Qwen2 template, which opens every conversation
with this system turn; upstream's evaluation (``inference_llavaov`` with the HF chat template)
sent no system message. Whether inference adds it is a model-runner choice (design §3); the text
lives here so both sides use the same string."""

BoxLike = Box | Sequence[float]

# --- report generation (upstream: generate_instruction_report_generation) ----------------------
REPORT_PROMPT_VARIANTS: tuple[str, ...] = (
    "Provide a radiology report for this Chest X-Ray.",
    "Analyze the Chest X-Ray and report your findings.",
    "Please give a detailed radiology report from this Chest X-Ray image.",
    "Please offer a detailed analysis based on this image.",
    "Analyze this image and provide a report.",
    "Write a radiology report for this Chest X-ray.",
    "Draft a concise report for this image.",
    "Please provide a brief radiology report.",
    "Compose a radiology report focusing on key findings.",
    "Create a structured radiology report for this X-ray.",
    "Produce a summary radiology report for this chest image.",
    "Provide a radiology report for this exam.",
    "Write a report summarizing this Chest X-ray.",
    "Draft a simple radiology report for these findings.",
    "Outline a radiology report for this X-ray.",
)
REPORT_PROMPT = REPORT_PROMPT_VARIANTS[0]

# --- abnormality classification (upstream: generate_instruction_abnormalities) -----------------
CLASSIFICATION_PROMPT_VARIANTS: tuple[str, ...] = (
    "Can you tell me if there are any abnormalities on this image?",
    "Are there any abnormalities on this Chest X-ray?",
    "Please identify abnormalities on this X-ray.",
    "Can you point out if there are any abnormalities on this Chest X-ray?",
    "Are there abnormalities on this Chest X-ray?",
    "Tell me about abnormalities on this image",
    "Do any abnormalities appear on this Chest X-ray?",
    "Identify abnormalities on this image",
    "Could you indicate if there are any lesions on this Chest X-ray?",
    "Are there any abnormalities present on this image?",
    "Please identify the abnormalities from this image.",
)
CLASSIFICATION_PROMPT = CLASSIFICATION_PROMPT_VARIANTS[1]

CLASSIFICATION_NONE_ANSWER_VARIANTS: tuple[str, ...] = (
    "No abnormalities or lesions are detected on this Chest X-ray.",
    "The Chest X-ray appears to be clear of any abnormalities.",
    "There are no detectable abnormalities on this X-ray.",
    "This Chest X-ray shows no signs of abnormalities.",
    "Based on this X-ray, there are no abnormalities to report.",
    "There are no findings on this Chest X-ray.",
    "The Chest X-ray appears to be clear of any findings.",
)
# Upstream lists "Yes, there is one abnormality identified:" twice (kept: it weights the sampling).
CLASSIFICATION_ONE_PREFIX_VARIANTS: tuple[str, ...] = (
    "Yes, there is one abnormality identified:",
    "The following abnormality is present:",
    "The analysis reveals the following abnormality:",
    "The Chest X-ray includes the following finding:",
    "Yes, there is one abnormality identified:",
)
CLASSIFICATION_MANY_PREFIX_VARIANTS: tuple[str, ...] = (
    "The following abnormalities are identified:",
    "The following abnormalities are present:",
    "The analysis reveals these abnormalities:",
    "From the examination, it is evident that these abnormalities are present:",
    "The Chest X-ray includes the following abnormalities:",
)

# --- anatomical and abnormality grounding (upstream: generate_instruction_location) ------------
GROUNDING_PROMPT_VARIANTS: tuple[str, ...] = (
    "Where is the {} located in this Chest X-ray?",
    "Can you point out the {}'s position on the image?",
    "What's the location of the {} in the X-ray?",
    "Identify where the {} is on this Chest X-ray, please.",
    "Where exactly is the {} found on this image?",
    "Could you specify where to find the {} on this X-ray?",
    "Highlight the {}'s area on the image.",
    "Show me the {}'s location on this CXR.",
    "Where should I look to find the {} in this image?",
    "Can you locate the {} on this X-ray for me?",
    "Please point to the {} on this Chest X-ray.",
    "Indicate the position of the {} on this image.",
    "Describe the location of the {} on the X-ray.",
    "Where on this image is the {} located?",
    "Point out the exact location of the {} in the Chest X-ray.",
    "How can I identify the {} on this image?",
    "Where is the {} situated in this CXR?",
    "Can you highlight the {} on this image?",
    "Indicate where the {} is found on this X-ray.",
    "Describe where to find the {} on this Chest X-ray.",
)
# Each answer takes (name, boxes). The double space in "The {}'s  location" is upstream's.
GROUNDING_ANSWER_VARIANTS: tuple[str, ...] = (
    "The {} is located at the coordinates {} on the image.",
    "You'll find the {} at {} in the X-ray.",
    "The {} can be seen at {} on the Chest X-ray.",
    "The location of the {} is at {} on the image.",
    "For the {}, the coordinates are {} on the X-ray.",
    "The {} is situated at {} in the image.",
    "On the Chest X-ray, the {} is located at {}.",
    "The {} appears at the coordinates {} on the image.",
    "In the X-ray, the {} is identifiable at {}.",
    "The location for the {} is marked at {} on the Chest X-ray.",
    "The {} is positioned at {} on the image.",
    "The area occupied by the {} is at {} in the X-ray.",
    "On the image, you can find the {} at {}.",
    "The {}'s  location is at {} on the Chest X-ray.",
    "In terms of coordinates, the {} is found at {} on the image.",
    "Regarding the {}, it is located at {} on the X-ray.",
    "The {} specifically is at {} on the Chest X-ray.",
    "Concerning the {}, you will find it at {} in the image.",
    "The {} is at {} on the X-ray.",
    "For identifying the {}, look at {} on the Chest X-ray.",
)

# --- abnormality detection (upstream: generate_instruction_abnormalities_grouped) --------------
DETECTION_PROMPT_VARIANTS: tuple[str, ...] = (
    "Could you indicate if there are any abnormalities on this Chest X-ray and their locations?",
    "Are abnormalities present on this Chest X-ray? Where exactly can they be found?",
    "Please identify any lesions or abnormalities on this X-ray and specify their locations.",
    "On this Chest X-ray, can you point out any abnormalities and their precise positions?",
    "I need information on any abnormalities or lesions on this X-ray, including their "
    "locations. Can you help?",
    "Can you detect and describe the location of any abnormalities found on this Chest X-ray?",
    "Are there identifiable abnormalities on this Chest X-ray? If so, where are they located?",
    "Tell me about any lesions on this X-ray and detail their specific locations.",
    "Do any abnormalities appear on this Chest X-ray? Please point them out along with their "
    "locations.",
    "Identify any abnormalities or lesions present on this X-ray and provide their exact "
    "locations.",
)
DETECTION_PROMPT = DETECTION_PROMPT_VARIANTS[0]

DETECTION_PREFIX_VARIANTS: tuple[str, ...] = (
    "Sure! I can find",
    "Indeed, there are",
    "Yes, the following abnormalities are identified:",
    "Upon examination, I detect",
    "The analysis reveals",
    "After a detailed review, we have discovered",
    "The findings include",
    "Notably, I can identify",
    "Based on the image, there are",
    "From the examination, it's evident there are",
)
DETECTION_NONE_ANSWER_VARIANTS: tuple[str, ...] = (
    "I can't find any lesion on the image.",
    "No abnormalities or lesions are detected on this Chest X-ray.",
    "The Chest X-ray appears to be clear of any lesions or abnormalities.",
    "Upon review, no lesions are visible on the image.",
    "The examination reveals a clean bill of health with no visible abnormalities.",
    "This Chest X-ray shows no signs of abnormalities or lesions.",
    "No lesions or abnormalities are present on this X-ray, as far as I can tell.",
    "After a thorough examination, I conclude that there are no detectable lesions on this X-ray.",
    "The image does not display any abnormalities or lesions.",
    "Based on this X-ray, it appears there are no lesions or abnormalities to report.",
)
_DETECTION_CANONICAL_PREFIX = 2      # "Yes, the following abnormalities are identified:"
_DETECTION_CANONICAL_NONE = 1        # "No abnormalities or lesions are detected on this ..."

# --- phrase grounding (upstream: generate_instruction_phrase_location) -------------------------
PHRASE_GROUNDING_PROMPT_VARIANTS: tuple[str, ...] = (
    "Please locate the following sentence: {}",
    "Identify the position of the following phrase in the CXR: {}",
    "Please show me the location of: {}",
    "Highlight the area of the following observation on the image: {}",
    "Where on the image can you see the following observation: {}",
    "Find the region corresponding to: {}",
    "Please indicate where this finding is located: {}",
    "Mark the area where you observe: {}",
)
PHRASE_GROUNDING_ANSWER_VARIANTS: tuple[str, ...] = (
    "This sentence is located at the coordinates {} on the image.",
    "You'll find it at {} in the CXR.",
    "This phrase can be observed at {} on the image.",
    "The bounding box for this observation is {}.",
    "Its location is given by {}.",
    "It is displayed at {} in the radiograph.",
    "The area specified is at coordinates {}.",
    "This finding is located at {} in the image.",
)

# --- names the model was taught -----------------------------------------------------------------
ANATOMICAL_REGIONS: tuple[str, ...] = (
    "right lung", "right upper lung zone", "right mid lung zone", "right lower lung zone",
    "right hilar structures", "right apical zone", "right costophrenic angle",
    "right cardiophrenic angle", "right hemidiaphragm",
    "left lung", "left upper lung zone", "left mid lung zone", "left lower lung zone",
    "left hilar structures", "left apical zone", "left costophrenic angle",
    "left hemidiaphragm",
    "trachea", "spine", "right clavicle", "left clavicle", "aortic arch", "mediastinum",
    "upper mediastinum", "svc", "cardiac silhouette", "left cardiac silhouette",
    "right cardiac silhouette", "cavoatrial junction", "right atrium", "descending aorta",
    "carina", "left upper abdomen", "right upper abdomen", "abdomen", "left cardiophrenic angle",
)
"""The 36 Chest ImaGenome scene-graph ``bbox_name`` values. Upstream ``Chest_ImaGenome_Dataset``
(radvlm/data/datasets.py) picks one object of the scene graph and asks about
``object["bbox_name"]`` verbatim, so these (lowercase, "svc" included) are the region names the
model learned."""

VINDR_ABNORMALITIES: tuple[str, ...] = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
    "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration",
    "Lung Opacity", "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass",
    "Other lesion", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "Rib fracture",
)
"""VinDr-CXR local (boxed) class names, the labels upstream's abnormality grounding and detection
were trained on (``VinDr_CXR_*Dataset`` use the annotation ``class_name`` as is). Pass them through
``upstream_case`` to get the form that appears in questions and answers."""


def upstream_case(name: str) -> str:
    """Upstream's casing rule for names put into questions and answers: a name whose first
    character is upper case and that is not all upper case is lower-cased ("Pleural effusion"
    → "pleural effusion", "Nodule/Mass" → "nodule/mass"); acronyms such as "ILD" stay."""
    name = name.strip()
    if name and name[0].isupper() and not name.isupper():
        return name.lower()
    return name


def _pick(variants: tuple[str, ...], variant: int) -> str:
    if not 0 <= variant < len(variants):
        raise IndexError(f"variant {variant} out of range 0..{len(variants) - 1}")
    return variants[variant]


def _require_text(value: str, what: str) -> str:
    cleaned = upstream_case(value)
    if not cleaned:
        raise ValueError(f"{what} must be a non-empty string")
    return cleaned


def abnormality_grounding_prompt(label: str, variant: int = 0) -> str:
    """'Where is the {label} located in this Chest X-ray?' (upstream asks VinDr abnormalities with
    the same templates as anatomical regions)."""
    return _pick(GROUNDING_PROMPT_VARIANTS, variant).format(_require_text(label, "label"))


def anatomical_grounding_prompt(region: str, variant: int = 0) -> str:
    """'Where is the {region} located in this Chest X-ray?'; use a name of ANATOMICAL_REGIONS for
    the phrasing the model was taught (other names are accepted, as free-form questions)."""
    return _pick(GROUNDING_PROMPT_VARIANTS, variant).format(_require_text(region, "region"))


def phrase_grounding_prompt(sentence: str, variant: int = 0) -> str:
    """'Please locate the following sentence: {sentence}', with upstream's casing rule applied
    to the sentence (a capitalised sentence is lower-cased entirely, as upstream did)."""
    return _pick(PHRASE_GROUNDING_PROMPT_VARIANTS, variant).format(
        _require_text(sentence, "sentence"))


def _box_values(box: BoxLike) -> tuple[float, float, float, float]:
    values = box.as_list() if isinstance(box, Box) else list(box)
    if len(values) != 4:
        raise ValueError(f"a box has 4 coordinates, got {len(values)}: {values!r}")
    x1, y1, x2, y2 = (float(v) for v in values)
    return x1, y1, x2, y2


def format_box(box: BoxLike) -> str:
    """One box as upstream writes it: ``[x1, y1, x2, y2]`` with each value ``round(v, 2)`` and
    printed by Python's float repr, so trailing zeros are dropped: [0.1, 0.23, 0.5, 1.0]
    (upstream ``format_boxes(..., num_float=2)``; it is not an ``:.2f`` format)."""
    return "[" + ", ".join(repr(round(v, 2)) for v in _box_values(box)) + "]"


def format_boxes(boxes: Iterable[BoxLike]) -> str:
    """Several boxes as upstream joins them: "[a]", "[a] and [b]", "[a], [b] and [c]"."""
    parts = [format_box(box) for box in boxes]
    if not parts:
        raise ValueError("at least one box is needed")
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def grounding_answer(name: str, boxes: Iterable[BoxLike], variant: int = 0) -> str:
    """'The {name} is located at the coordinates {boxes} on the image.' (region or abnormality)."""
    return _pick(GROUNDING_ANSWER_VARIANTS, variant).format(
        _require_text(name, "name"), format_boxes(boxes))


def phrase_grounding_answer(boxes: Iterable[BoxLike], variant: int = 0) -> str:
    """'This sentence is located at the coordinates {boxes} on the image.'"""
    return _pick(PHRASE_GROUNDING_ANSWER_VARIANTS, variant).format(format_boxes(boxes))


def _ordered_findings(labels: Iterable[str]) -> list[str]:
    """Lower-cased, de-duplicated, "no finding" removed; the 13 CheXpert labels first in LABELS
    order (= upstream's ``sorted(pathologies)``), any other name after them in the given order."""
    names: list[str] = []
    for label in labels:
        name = upstream_case(label).lower()
        if name and name != NO_FINDING and name not in names:
            names.append(name)
    known = [label for label in LABELS if label in names]
    return known + [name for name in names if name not in LABELS]


def classification_answer(labels: Iterable[str], variant: int = 0) -> str:
    """Upstream's classification answer: none → 'No abnormalities or lesions are detected on this
    Chest X-ray.'; one → 'Yes, there is one abnormality identified: cardiomegaly.'; several →
    'The following abnormalities are identified: a, b and c.'"""
    names = _ordered_findings(labels)
    if not names:
        return _pick(CLASSIFICATION_NONE_ANSWER_VARIANTS, variant)
    if len(names) == 1:
        return f"{_pick(CLASSIFICATION_ONE_PREFIX_VARIANTS, variant)} {names[0]}."
    joined = ", ".join(names[:-1]) + " and " + names[-1]
    return f"{_pick(CLASSIFICATION_MANY_PREFIX_VARIANTS, variant)} {joined}."


def _article(word: str) -> str:
    """Upstream ``select_article``: 'an' before a vowel letter, else 'a'."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def detection_answer(findings: Iterable[tuple[str, Iterable[BoxLike]]],
                     variant: int = _DETECTION_CANONICAL_PREFIX,
                     none_variant: int = _DETECTION_CANONICAL_NONE) -> str:
    """Upstream's detection answer: boxes grouped per name in first-seen order, each as
    '{a|an} {name} located at the coordinates {boxes}', joined by '; ', after a prefix:
    'Yes, the following abnormalities are identified: a nodule/mass located at the coordinates
    [0.1, 0.2, 0.3, 0.4]; an atelectasis located at ...'. No boxes at all → 'No abnormalities or
    lesions are detected on this Chest X-ray.' (``none_variant`` picks among those)."""
    grouped: dict[str, list[BoxLike]] = {}
    for name, boxes in findings:
        grouped.setdefault(_require_text(name, "name"), []).extend(boxes)
    grouped = {name: boxes for name, boxes in grouped.items() if boxes}
    if not grouped:
        return _pick(DETECTION_NONE_ANSWER_VARIANTS, none_variant)
    parts = [f"{_article(name)} {name.lower()} located at the coordinates {format_boxes(boxes)}"
             for name, boxes in grouped.items()]
    return f"{_pick(DETECTION_PREFIX_VARIANTS, variant)} {'; '.join(parts)}."

"""The RadVLM phrasings: canonical questions, upstream answer templates and box formatting."""

from __future__ import annotations

import pytest

from inference import prompts
from inference.labels import LABELS
from inference.parsing import parse_boxes, parse_labels
from inference.prompts import (
    ANATOMICAL_REGIONS,
    CLASSIFICATION_PROMPT,
    DETECTION_PROMPT,
    REPORT_PROMPT,
    SYSTEM_PROMPT,
    abnormality_grounding_prompt,
    anatomical_grounding_prompt,
    classification_answer,
    detection_answer,
    format_box,
    format_boxes,
    grounding_answer,
    phrase_grounding_answer,
    phrase_grounding_prompt,
    upstream_case,
)
from inference.result import Box


def test_canonical_questions_are_the_upstream_ones() -> None:
    assert REPORT_PROMPT == "Provide a radiology report for this Chest X-Ray."
    assert CLASSIFICATION_PROMPT == "Are there any abnormalities on this Chest X-ray?"
    assert DETECTION_PROMPT == ("Could you indicate if there are any abnormalities on this Chest "
                                "X-ray and their locations?")
    assert SYSTEM_PROMPT == "You are a helpful assistant."


def test_canonical_prompts_are_members_of_their_variants() -> None:
    assert REPORT_PROMPT in prompts.REPORT_PROMPT_VARIANTS
    assert CLASSIFICATION_PROMPT in prompts.CLASSIFICATION_PROMPT_VARIANTS
    assert DETECTION_PROMPT in prompts.DETECTION_PROMPT_VARIANTS


def test_variant_counts_match_upstream_lists() -> None:
    assert len(prompts.REPORT_PROMPT_VARIANTS) == 15
    assert len(prompts.CLASSIFICATION_PROMPT_VARIANTS) == 11
    assert len(prompts.GROUNDING_PROMPT_VARIANTS) == 20
    assert len(prompts.GROUNDING_ANSWER_VARIANTS) == 20
    assert len(prompts.DETECTION_PROMPT_VARIANTS) == 10
    assert len(prompts.DETECTION_PREFIX_VARIANTS) == 10
    assert len(prompts.DETECTION_NONE_ANSWER_VARIANTS) == 10
    assert len(prompts.PHRASE_GROUNDING_PROMPT_VARIANTS) == 8
    assert len(prompts.PHRASE_GROUNDING_ANSWER_VARIANTS) == 8
    assert len(prompts.CLASSIFICATION_NONE_ANSWER_VARIANTS) == 7


def test_templates_take_the_right_number_of_fields() -> None:
    for template in (prompts.GROUNDING_PROMPT_VARIANTS + prompts.PHRASE_GROUNDING_PROMPT_VARIANTS
                     + prompts.PHRASE_GROUNDING_ANSWER_VARIANTS):
        assert template.count("{}") == 1, template
    for template in prompts.GROUNDING_ANSWER_VARIANTS:
        assert template.count("{}") == 2, template


def test_grounding_prompts() -> None:
    assert (anatomical_grounding_prompt("right lung")
            == "Where is the right lung located in this Chest X-ray?")
    assert (abnormality_grounding_prompt("Pleural effusion")
            == "Where is the pleural effusion located in this Chest X-ray?")
    assert (abnormality_grounding_prompt("cardiomegaly", variant=7)
            == "Show me the cardiomegaly's location on this CXR.")
    assert abnormality_grounding_prompt("ILD") == "Where is the ILD located in this Chest X-ray?"


def test_phrase_grounding_prompt_applies_upstream_casing() -> None:
    assert (phrase_grounding_prompt("Small left pleural effusion.")
            == "Please locate the following sentence: small left pleural effusion.")
    assert (phrase_grounding_prompt("  right basal opacity ")
            == "Please locate the following sentence: right basal opacity")


def test_prompt_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        anatomical_grounding_prompt("   ")
    with pytest.raises(IndexError):
        abnormality_grounding_prompt("edema", variant=20)


def test_upstream_case() -> None:
    assert upstream_case("Nodule/Mass") == "nodule/mass"
    assert upstream_case("ILD") == "ILD"
    assert upstream_case("svc") == "svc"
    assert upstream_case("Enlarged PA") == "enlarged pa"


def test_anatomical_regions_are_the_36_chest_imagenome_names() -> None:
    assert len(ANATOMICAL_REGIONS) == 36
    assert len(set(ANATOMICAL_REGIONS)) == 36
    for name in ("right lung", "left lung", "cardiac silhouette", "svc", "carina",
                 "right costophrenic angle", "left hilar structures", "upper mediastinum"):
        assert name in ANATOMICAL_REGIONS
    assert all(name == name.lower() for name in ANATOMICAL_REGIONS)


def test_format_box_rounds_like_upstream() -> None:
    assert format_box([0.123, 0.3456, 0.5, 1]) == "[0.12, 0.35, 0.5, 1.0]"
    assert format_box((0, 0.1, 0.25, 0.999)) == "[0.0, 0.1, 0.25, 1.0]"
    assert format_box(Box(x1=0.1, y1=0.2, x2=0.3, y2=0.4)) == "[0.1, 0.2, 0.3, 0.4]"
    with pytest.raises(ValueError):
        format_box([0.1, 0.2, 0.3])


def test_format_boxes_joins_like_upstream() -> None:
    a, b, c = [0.1, 0.1, 0.2, 0.2], [0.3, 0.3, 0.4, 0.4], [0.5, 0.5, 0.6, 0.6]
    assert format_boxes([a]) == "[0.1, 0.1, 0.2, 0.2]"
    assert format_boxes([a, b]) == "[0.1, 0.1, 0.2, 0.2] and [0.3, 0.3, 0.4, 0.4]"
    assert (format_boxes([a, b, c])
            == "[0.1, 0.1, 0.2, 0.2], [0.3, 0.3, 0.4, 0.4] and [0.5, 0.5, 0.6, 0.6]")
    with pytest.raises(ValueError):
        format_boxes([])


def test_grounding_answer() -> None:
    assert (grounding_answer("cardiac silhouette", [[0.34, 0.4, 0.72, 0.71]])
            == "The cardiac silhouette is located at the coordinates [0.34, 0.4, 0.72, 0.71] "
               "on the image.")
    assert (grounding_answer("Nodule/Mass", [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
            == "The nodule/mass is located at the coordinates [0.1, 0.2, 0.3, 0.4] and "
               "[0.5, 0.6, 0.7, 0.8] on the image.")


def test_phrase_grounding_answer() -> None:
    assert (phrase_grounding_answer([[0.05, 0.5, 0.45, 0.9]])
            == "This sentence is located at the coordinates [0.05, 0.5, 0.45, 0.9] on the image.")


def test_classification_answers() -> None:
    assert classification_answer([]) == (
        "No abnormalities or lesions are detected on this Chest X-ray.")
    assert classification_answer(["No Finding"]) == (
        "No abnormalities or lesions are detected on this Chest X-ray.")
    assert classification_answer(["Cardiomegaly"]) == (
        "Yes, there is one abnormality identified: cardiomegaly.")
    assert classification_answer(["Pleural Effusion", "atelectasis", "Cardiomegaly",
                                  "cardiomegaly"]) == (
        "The following abnormalities are identified: atelectasis, cardiomegaly and "
        "pleural effusion.")
    assert classification_answer(["edema", "fracture"], variant=2) == (
        "The analysis reveals these abnormalities: edema and fracture.")


def test_detection_answers() -> None:
    answer = detection_answer([("Nodule/Mass", [[0.1, 0.2, 0.3, 0.4]]),
                               ("Aortic enlargement", [[0.4, 0.2, 0.6, 0.4]]),
                               ("Nodule/Mass", [[0.5, 0.5, 0.6, 0.6]])])
    assert answer == (
        "Yes, the following abnormalities are identified: a nodule/mass located at the "
        "coordinates [0.1, 0.2, 0.3, 0.4] and [0.5, 0.5, 0.6, 0.6]; an aortic enlargement "
        "located at the coordinates [0.4, 0.2, 0.6, 0.4].")
    assert detection_answer([]) == "No abnormalities or lesions are detected on this Chest X-ray."
    assert detection_answer([("ILD", [])], none_variant=0) == (
        "I can't find any lesion on the image.")


def test_answers_round_trip_through_the_parsers() -> None:
    """What training teaches, the parsers read back."""
    parsed = parse_boxes(grounding_answer("left lung", [[0.55, 0.1, 0.95, 0.8]]))
    assert parsed.boxes == (Box(x1=0.55, y1=0.1, x2=0.95, y2=0.8),)
    assert parsed.dropped == ()
    for labels in ([], ["cardiomegaly"], list(LABELS[:-1])):
        present = parse_labels(classification_answer(labels))
        expected = {label: label in labels for label in LABELS}
        expected["no finding"] = not labels
        assert present == expected, labels
    for variant, answer in enumerate(prompts.CLASSIFICATION_NONE_ANSWER_VARIANTS):
        assert parse_labels(answer)["no finding"] is True, variant
    for variant, answer in enumerate(prompts.DETECTION_NONE_ANSWER_VARIANTS):
        assert [k for k, v in parse_labels(answer).items() if v] == ["no finding"], answer

"""Answer parsers: boxes, labels (negation, synonyms), assistant turn, sentences."""

from __future__ import annotations

import dataclasses

import pytest

from inference.labels import LABELS
from inference.parsing import (
    CLAMP_TOLERANCE,
    BoxParse,
    extract_assistant_answer,
    finding_sentences,
    label_findings,
    parse_boxes,
    parse_labels,
    report_sentences,
    upstream_substring_labels,
)
from inference.result import Box


def B(x1: float, y1: float, x2: float, y2: float) -> Box:
    return Box(x1=x1, y1=y1, x2=x2, y2=y2)


def present(text: str) -> list[str]:
    return [label for label, value in parse_labels(text).items() if value]


# ------------------------------------------------------------------------------------ boxes ---

def test_box_parse_is_frozen() -> None:
    parsed = parse_boxes("[0.1, 0.2, 0.3, 0.4]")
    assert isinstance(parsed, BoxParse)
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.boxes = ()  # type: ignore[misc]


def test_upstream_answer() -> None:
    parsed = parse_boxes("The right lung is located at the coordinates [0.12, 0.34, 0.56, 0.78] "
                         "on the image.")
    assert parsed == BoxParse(boxes=(B(0.12, 0.34, 0.56, 0.78),), dropped=())


@pytest.mark.parametrize("text, expected", [
    ("[0.12,0.34,0.56,0.78]", B(0.12, 0.34, 0.56, 0.78)),
    ("[ 0.12 ,  0.34,0.56 , 0.78 ]", B(0.12, 0.34, 0.56, 0.78)),
    ("[0.1, 0.2, 0.3, 0.4]", B(0.1, 0.2, 0.3, 0.4)),
    ("[0.125, 0.3333, 0.5, 0.75]", B(0.125, 0.3333, 0.5, 0.75)),
    ("[0, 0.2, 1, 0.9]", B(0.0, 0.2, 1.0, 0.9)),
    ("[.5, .25, 1., .75]", B(0.5, 0.25, 1.0, 0.75)),
    ("[0.1 0.2 0.3 0.4]", B(0.1, 0.2, 0.3, 0.4)),
    ("[0.1;0.2;0.3;0.4]", B(0.1, 0.2, 0.3, 0.4)),
])
def test_spacing_and_decimals(text: str, expected: Box) -> None:
    assert parse_boxes(text) == BoxParse(boxes=(expected,), dropped=())


def test_several_boxes_in_order() -> None:
    text = ("This sentence is located at the coordinates [0.1, 0.1, 0.2, 0.2], "
            "[0.3, 0.3, 0.4, 0.4] and [0.5, 0.5, 0.6, 0.6] on the image.")
    assert parse_boxes(text).boxes == (B(0.1, 0.1, 0.2, 0.2), B(0.3, 0.3, 0.4, 0.4),
                                       B(0.5, 0.5, 0.6, 0.6))


def test_nested_lists() -> None:
    parsed = parse_boxes("[[0.1,0.2,0.3,0.4],[0.5, 0.6, 0.7, 0.8]]")
    assert parsed == BoxParse(boxes=(B(0.1, 0.2, 0.3, 0.4), B(0.5, 0.6, 0.7, 0.8)), dropped=())


def test_duplicates_are_kept() -> None:
    assert parse_boxes("[0.1,0.2,0.3,0.4] [0.1,0.2,0.3,0.4]").boxes == (B(0.1, 0.2, 0.3, 0.4),) * 2


def test_slightly_outside_is_clamped() -> None:
    assert CLAMP_TOLERANCE == 0.05
    parsed = parse_boxes("[-0.02, 0.5, 1.03, 1.05]")
    assert parsed == BoxParse(boxes=(B(0.0, 0.5, 1.0, 1.0),), dropped=())


def test_far_outside_is_dropped_with_reason() -> None:
    parsed = parse_boxes("[0.1, 0.2, 1.3, 0.4] and [120, 340, 560, 780] and [0.2, 0.2, 0.4, 0.4]")
    assert parsed.boxes == (B(0.2, 0.2, 0.4, 0.4),)
    assert parsed.dropped == (
        "box '[0.1, 0.2, 1.3, 0.4]': coordinate 1.3 outside [0, 1] by more than 0.05",
        "box '[120, 340, 560, 780]': coordinate 120 outside [0, 1] by more than 0.05",
    )


def test_negative_far_outside_is_dropped() -> None:
    assert parse_boxes("[-0.2, 0.1, 0.3, 0.4]").dropped == (
        "box '[-0.2, 0.1, 0.3, 0.4]': coordinate -0.2 outside [0, 1] by more than 0.05",)


def test_swapped_coordinates_are_reordered() -> None:
    parsed = parse_boxes("[0.6, 0.8, 0.2, 0.3]")
    assert parsed == BoxParse(boxes=(B(0.2, 0.3, 0.6, 0.8),), dropped=())


def test_degenerate_boxes_are_dropped_quoting_the_raw_box() -> None:
    parsed = parse_boxes("[0.5, 0.2, 0.5, 0.4], [0.1, 0.3, 0.2, 0.3] and [1.02, 0.1, 1.04, 0.2]")
    assert parsed.boxes == ()
    assert parsed.dropped == (
        "degenerate box '[0.5, 0.2, 0.5, 0.4]': zero width after clamping",
        "degenerate box '[0.1, 0.3, 0.2, 0.3]': zero height after clamping",
        "degenerate box '[1.02, 0.1, 1.04, 0.2]': zero width after clamping",
    )


def test_truncated_box_is_dropped() -> None:
    parsed = parse_boxes("The nodule is located at the coordinates [0.1, 0.2, 0.3, 0.4] and "
                         "[0.1, 0.2, 0.3")
    assert parsed.boxes == (B(0.1, 0.2, 0.3, 0.4),)
    assert parsed.dropped == ("incomplete box '[0.1, 0.2, 0.3': no closing bracket",)


def test_truncated_inside_nested_list() -> None:
    parsed = parse_boxes("[[0.1,0.2,0.3,0.4],[0.5")
    assert parsed.boxes == (B(0.1, 0.2, 0.3, 0.4),)
    assert parsed.dropped == ("incomplete box '[0.5': no closing bracket",)


def test_wrong_number_of_values() -> None:
    parsed = parse_boxes("[0.1, 0.2, 0.3] [0.1, 0.2, 0.3, 0.4, 0.5]")
    assert parsed.boxes == ()
    assert parsed.dropped == ("box '[0.1, 0.2, 0.3]': 3 numbers, expected 4",
                              "box '[0.1, 0.2, 0.3, 0.4, 0.5]': 5 numbers, expected 4")


@pytest.mark.parametrize("text", [
    "", "No abnormalities or lesions are detected on this Chest X-ray.",
    "[image] [] [[ ]] see reference [1]", "coordinates (0.1, 0.2, 0.3, 0.4)",
    "[a, b, c, d]", "[" + "1   " * 60 + "x]", "]]]][[[[",
])
def test_garbage_gives_nothing(text: str) -> None:
    assert parse_boxes(text) == BoxParse(boxes=(), dropped=())


# ----------------------------------------------------------------------------------- labels ---

def test_result_has_every_label_in_order() -> None:
    assert list(parse_labels("Cardiomegaly.")) == list(LABELS)
    assert list(upstream_substring_labels("Cardiomegaly.")) == list(LABELS)


def test_upstream_vs_ours_on_negation() -> None:
    text = "No pleural effusion."
    assert upstream_substring_labels(text)["pleural effusion"] is True
    assert parse_labels(text)["pleural effusion"] is False
    assert present(text) == ["no finding"]


def test_upstream_substring_rule_exactly() -> None:
    got = upstream_substring_labels("Enlarged cardiomediastinum; no finding. Effusion.")
    assert [label for label, value in got.items() if value] == [
        "enlarged cardiomediastinum", "no finding"]
    # the CheXpert name "edema" is a substring of "pulmonary edema" — and of "oedema" too
    assert upstream_substring_labels("Oedema")["edema"] is True


@pytest.mark.parametrize("text, expected", [
    # upstream classification answers
    ("No abnormalities or lesions are detected on this Chest X-ray.", ["no finding"]),
    ("Yes, there is one abnormality identified: cardiomegaly.", ["cardiomegaly"]),
    ("The following abnormalities are identified: atelectasis, lung opacity and pleural "
     "effusion.", ["atelectasis", "lung opacity", "pleural effusion"]),
    ("The following abnormalities are identified: enlarged cardiomediastinum, pleural other "
     "and support devices.", ["enlarged cardiomediastinum", "pleural other", "support devices"]),
    # synonyms and plurals
    ("Small bilateral effusions.", ["pleural effusion"]),
    ("Small left pleural effusion.", ["pleural effusion"]),
    ("A 3.5 cm nodule in the right upper lobe.", ["lung lesion"]),
    ("Right hilar mass.", ["lung lesion"]),
    ("The heart is enlarged.", ["cardiomegaly"]),
    ("The heart is mildly enlarged.", ["cardiomegaly"]),
    ("Enlarged heart.", ["cardiomegaly"]),
    ("Mild enlargement of the cardiac silhouette.", ["cardiomegaly"]),
    ("Pulmonary edema.", ["edema"]),
    ("Mild interstitial oedema.", ["edema"]),
    ("Bibasilar opacities.", ["lung opacity"]),
    ("Opacification of the left hemithorax.", ["lung opacity"]),
    ("Patchy infiltrates.", ["lung opacity"]),
    ("Right lower lobe consolidation.", ["consolidation"]),
    ("Lung opacity in the right base.", ["lung opacity"]),
    ("Consolidative opacity in the right lower lobe.", ["consolidation", "lung opacity"]),
    ("Endotracheal tube terminates 4 cm above the carina.", ["support devices"]),
    ("Right IJ central venous line tip in the SVC.", ["support devices"]),
    ("Left chest wall pacemaker with leads in the right atrium and ventricle.",
     ["support devices"]),
    ("Nasogastric tube and Swan-Ganz catheter in place.", ["support devices"]),
    ("Left apical pleural thickening.", ["pleural other"]),
    ("Left basilar atelectasis.", ["atelectasis"]),
    ("Subsegmental atelectases.", ["atelectasis"]),
    ("Healed right rib fractures.", ["fracture"]),
    ("Right lower lobe pneumonia.", ["pneumonia"]),
    ("Small right apical pneumothorax.", ["pneumothorax"]),
    ("Left hydropneumothorax.", ["pleural effusion", "pneumothorax"]),
    ("Enlarged cardiomediastinum.", ["enlarged cardiomediastinum"]),
    ("The cardiomediastinal silhouette is enlarged.", ["enlarged cardiomediastinum"]),
    ("Widened mediastinum.", ["enlarged cardiomediastinum"]),
    ("Nodule/Mass", ["lung lesion"]),
    # word boundaries and blockers
    ("Small pericardial effusion.", ["no finding"]),
    ("The heart size is normal.", ["no finding"]),
    ("The heart is not enlarged.", ["no finding"]),
    ("Massive hiatal hernia.", ["no finding"]),
    ("The lungs are clear.", ["no finding"]),
    ("", ["no finding"]),
])
def test_labels_and_synonyms(text: str, expected: list[str]) -> None:
    assert present(text) == expected


def test_enlarged_cardiomediastinum_is_not_cardiomegaly() -> None:
    labels = parse_labels("Enlarged cardiomediastinum. Enlarged cardiomediastinal silhouette.")
    assert labels["enlarged cardiomediastinum"] is True
    assert labels["cardiomegaly"] is False


@pytest.mark.parametrize("text, expected", [
    ("No pleural effusion or pneumothorax.", ["no finding"]),
    ("No effusion, but there is cardiomegaly.", ["cardiomegaly"]),
    ("No effusion, the heart is enlarged.", ["cardiomegaly"]),
    ("No effusion; cardiomegaly.", ["cardiomegaly"]),
    ("No pleural effusion, pneumothorax, or focal consolidation is seen.", ["no finding"]),
    ("Neither effusion nor pneumothorax.", ["no finding"]),
    ("There is no evidence of pneumothorax.", ["no finding"]),
    ("Negative for pneumonia.", ["no finding"]),
    ("The lungs are free of consolidation.", ["no finding"]),
    ("Absence of pleural effusion.", ["no finding"]),
    ("Cardiomegaly without pulmonary edema.", ["cardiomegaly"]),
    ("Pneumothorax is not seen.", ["no finding"]),
    ("Pleural effusion and pneumothorax are not identified.", ["no finding"]),
    ("The previously seen left effusion has resolved.", ["no finding"]),
    ("Pneumothorax has been ruled out.", ["no finding"]),
    ("Pneumothorax is absent.", ["no finding"]),
    ("The endotracheal tube has been removed.", ["no finding"]),
    ("Interval resolution of the right lower lobe pneumonia.", ["no finding"]),
    ("Pneumonia has resolved, but a small effusion persists.", ["pleural effusion"]),
    ("Lines/tubes: none.", ["no finding"]),
    ("I can't find any lesion on the image.", ["no finding"]),
    ("The Chest X-ray appears to be clear of any lesions or abnormalities.", ["no finding"]),
    ("The image does not display any abnormalities or lesions.", ["no finding"]),
    # negation stays in its sentence
    ("No pneumothorax. Small left effusion.", ["pleural effusion"]),
    ("Left lower lobe collapse; no pneumothorax.", ["atelectasis"]),
    # one positive mention wins over a negated one elsewhere
    ("No effusion on the right. Small left effusion.", ["pleural effusion"]),
    # pseudo-negations: change statements and uncertainty are not negations
    ("No change in moderate cardiomegaly.", ["cardiomegaly"]),
    ("No significant interval change in the small right pleural effusion.", ["pleural effusion"]),
    ("Pneumonia cannot be excluded.", ["pneumonia"]),
    ("Early pneumonia cannot be ruled out.", ["pneumonia"]),
])
def test_negation(text: str, expected: list[str]) -> None:
    assert present(text) == expected


def test_label_findings_report_each_mention() -> None:
    assert label_findings("No effusion, but there is cardiomegaly. Small effusion.") == [
        ("pleural effusion", True), ("cardiomegaly", False), ("pleural effusion", False)]


def test_no_finding_iff_no_abnormality() -> None:
    assert parse_labels("Support devices in place.")["no finding"] is False
    assert parse_labels("No acute cardiopulmonary process.")["no finding"] is True


# ------------------------------------------------------------------------ assistant answer ---

QWEN = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nProvide a radiology report for this Chest X-Ray.<|im_end|>\n"
        "<|im_start|>assistant\n{answer}<|im_end|>\n<|endoftext|>")


def test_extract_assistant_answer_from_chat_markers() -> None:
    decoded = QWEN.format(answer="Mild cardiomegaly. No pleural effusion.")
    assert extract_assistant_answer(decoded) == "Mild cardiomegaly. No pleural effusion."


def test_plain_words_user_and_assistant_survive() -> None:
    answer = ("The user of this report should note the assistant's comparison: the user "
              "assistant line tip is in the SVC.")
    assert extract_assistant_answer(QWEN.format(answer=answer)) == answer
    assert extract_assistant_answer(answer) == answer
    assert extract_assistant_answer("user\nassistant\n" + answer) == "user\nassistant\n" + answer


def test_last_assistant_turn_wins() -> None:
    decoded = (QWEN.format(answer="First answer.")
               + "<|im_start|>user\nAnd the heart?<|im_end|>\n"
                 "<|im_start|>assistant\nThe heart is enlarged.<|im_end|>")
    assert extract_assistant_answer(decoded) == "The heart is enlarged."


def test_unterminated_turn_and_stray_special_tokens() -> None:
    decoded = "<|im_start|>assistant\n  Small left effusion.<|image_pad|> <|endoftext|>"
    assert extract_assistant_answer(decoded) == "Small left effusion."
    truncated = "<|im_start|>assistant\nThe right lung is located at the coordinates [0.1, 0.2"
    assert extract_assistant_answer(truncated) == (
        "The right lung is located at the coordinates [0.1, 0.2")
    assert extract_assistant_answer("  No pneumothorax.<|im_end|>") == "No pneumothorax."


# ------------------------------------------------------------------------------- sentences ---

def test_report_sentences() -> None:
    text = ("There is a 3.5 cm opacity in the right upper lobe, e.g. a mass. It measures approx. "
            "2.1 x 1.9 cm! Is this new? No pleural effusion.")
    assert report_sentences(text) == [
        "There is a 3.5 cm opacity in the right upper lobe, e.g. a mass.",
        "It measures approx. 2.1 x 1.9 cm!",
        "Is this new?",
        "No pleural effusion.",
    ]


def test_report_sentences_blank_lines_lists_and_whitespace() -> None:
    text = "FINDINGS\n\n1. Cardiomegaly.  2. Small\nleft effusion\n\nIMPRESSION: stable vs. prior"
    assert report_sentences(text) == [
        "FINDINGS", "1. Cardiomegaly.", "2. Small left effusion", "IMPRESSION: stable vs. prior"]
    assert report_sentences("  \n ") == []


def test_finding_sentences() -> None:
    report = ("PA and lateral views of the chest. The heart is mildly enlarged. "
              "No pleural effusion or pneumothorax. There is a 1.5 cm nodule in the left upper "
              "lobe, i.e. a lung lesion. The lungs are otherwise clear.")
    assert finding_sentences(report) == [
        "The heart is mildly enlarged.",
        "There is a 1.5 cm nodule in the left upper lobe, i.e. a lung lesion.",
    ]
    assert finding_sentences("No acute cardiopulmonary process.") == []

"""The per-study plan on the tiny model: result shape, grounding questions, prefix-reuse parity."""

from __future__ import annotations

import json

from config.settings import InferenceSettings
from inference import prompts
from inference.result import StudyResult
from inference.tasks import grounding_questions, run_study
from tests.model_images import gradient_image


def test_grounding_questions_follow_labels_then_report_sentences():
    report = "The heart is enlarged. No pneumothorax. Small left pleural effusion."
    questions = grounding_questions({"cardiomegaly": True, "pleural effusion": True, "pneumothorax": False},
                                    report, InferenceSettings())
    assert [q.task for q in questions][:2] == ["abnormality_grounding", "abnormality_grounding"]
    assert [q.label for q in questions][:2] == ["cardiomegaly", "pleural effusion"]
    assert questions[0].question == prompts.abnormality_grounding_prompt("cardiomegaly")
    phrases = [q.query for q in questions if q.task == "phrase_grounding"]
    assert "No pneumothorax." not in phrases
    assert "Small left pleural effusion." in phrases
    assert all(q.question == prompts.phrase_grounding_prompt(q.query) for q in questions if q.task == "phrase_grounding")


def test_grounding_questions_are_capped_and_optional():
    labels = {"cardiomegaly": True, "edema": True, "pneumothorax": True}
    capped = grounding_questions(labels, "Cardiomegaly.", InferenceSettings(max_grounding_questions=2))
    assert len(capped) == 2
    no_phrases = grounding_questions(labels, "Cardiomegaly.", InferenceSettings(phrase_grounding=False))
    assert {q.task for q in no_phrases} == {"abnormality_grounding"}


def test_run_study_returns_a_complete_typed_result(tiny_model):
    image = gradient_image()
    result = run_study(tiny_model, image, InferenceSettings())
    assert result.model == tiny_model.info
    assert result.source == image.source
    assert [a.task for a in result.answers][:2] == ["report", "classification"]
    assert result.answers[0].question == prompts.REPORT_PROMPT
    assert result.findings_text == result.answers[0].answer
    assert set(result.labels) <= set(__import__("inference.labels", fromlist=["LABELS"]).LABELS)
    assert {"encode_image", "report", "classification", "total"} <= set(result.timings)
    for region in result.regions:
        for box in region.boxes:
            assert 0 <= box.x1 < box.x2 <= 1 and 0 <= box.y1 < box.y2 <= 1
    again = StudyResult.model_validate(json.loads(result.model_dump_json()))
    assert again == result
    assert "UNVERIFIED" in result.notice


def test_plan_answers_are_identical_with_and_without_prefix_reuse(tiny_model):
    image = gradient_image(seed=11)
    with_reuse = run_study(tiny_model, image, InferenceSettings(prefix_reuse=True))
    without = run_study(tiny_model, image, InferenceSettings(prefix_reuse=False))
    assert [a.answer for a in with_reuse.answers] == [a.answer for a in without.answers]
    assert sum(a.prompt_tokens for a in with_reuse.answers) < sum(a.prompt_tokens for a in without.answers)


def test_tasks_can_be_selected(tiny_model):
    result = run_study(tiny_model, gradient_image(), InferenceSettings(tasks=["classification"]))
    assert [a.task for a in result.answers] == ["classification"]
    assert result.findings_text is None

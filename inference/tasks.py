"""The per-study task plan: report → classification → grounding (a grounded report).

1. report: the findings text;
2. classification: the 14 labels (negation-aware parser, docs/label-parsing.md);
3. grounding: "where is the {label}" for each positive abnormality label, and phrase grounding of
   each finding sentence of the report, capped at ``max_grounding_questions``.

The plan asks its questions through an ``inference.backend.InferenceBackend``: the in-process
model (the image prefix prefilled once per study and its KV cache reused for every question,
``InferenceSettings.prefix_reuse``; answers identical to fresh runs) or a remote OpenAI-compatible
endpoint (``inference.remote``) with the same answers on the same weights. The grounding questions
are independent of each other and are asked together (``ask_all``), so a backend may batch them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from config.settings import InferenceSettings
from inference import prompts
from inference.image import ModelImage
from inference.labels import ABNORMALITY_LABELS
from inference.backend import Answer, InferenceBackend, LocalBackend
from inference.model import RadVLMModel
from inference.parsing import finding_sentences, parse_boxes, parse_labels
from inference.result import Region, StudyResult, TaskAnswer, TaskName


@dataclass(frozen=True)
class GroundingQuestion:
    task: TaskName
    query: str
    label: str | None
    question: str


def grounding_questions(labels: dict[str, bool], report: str | None,
                        settings: InferenceSettings) -> list[GroundingQuestion]:
    """The grounding questions a study's report and labels call for, in a stable order."""
    questions = [GroundingQuestion("abnormality_grounding", label, label, prompts.abnormality_grounding_prompt(label))
                 for label in ABNORMALITY_LABELS if labels.get(label)]
    if settings.phrase_grounding and report:
        questions += [GroundingQuestion("phrase_grounding", sentence, None, prompts.phrase_grounding_prompt(sentence))
                      for sentence in finding_sentences(report)]
    return questions[: settings.max_grounding_questions]


def _task_answer(task: TaskName, question: str, answer: Answer) -> TaskAnswer:
    return TaskAnswer(task=task, question=question, answer=answer.text, prompt_tokens=answer.prompt_tokens,
                      new_tokens=answer.new_tokens, seconds=round(answer.seconds, 4))


def run_study(model: RadVLMModel | InferenceBackend, image: ModelImage, settings: InferenceSettings) -> StudyResult:
    """Run the configured plan on one image and return the typed result (``model``: the in-process
    model, or any backend, e.g. ``inference.remote.RemoteBackend``)."""
    backend = LocalBackend(model) if isinstance(model, RadVLMModel) else model
    started = time.perf_counter()
    with backend.open_study(image, settings) as study:
        timings: dict[str, float] = {"encode_image": round(study.encode_seconds, 4)}
        answers: list[TaskAnswer] = []

        def record(task: TaskName, question: str, answer: Answer) -> str:
            answers.append(_task_answer(task, question, answer))
            timings[task] = round(timings.get(task, 0.0) + answer.seconds, 4)
            return answer.text

        def ask(task: TaskName, question: str) -> str:
            return record(task, question, study.ask(question))

        findings_text = ask("report", prompts.REPORT_PROMPT) if "report" in settings.tasks else None
        labels = parse_labels(ask("classification", prompts.CLASSIFICATION_PROMPT)) \
            if "classification" in settings.tasks else {}
        regions: list[Region] = []
        if "grounding" in settings.tasks:
            items = grounding_questions(labels, findings_text, settings)
            for item, answer in zip(items, study.ask_all([item.question for item in items]), strict=True):
                parsed = parse_boxes(record(item.task, item.question, answer))
                regions.append(Region(task=item.task, query=item.query, label=item.label,
                                      boxes=parsed.boxes, dropped=parsed.dropped))
        info = study.info
    timings["total"] = round(time.perf_counter() - started, 4)
    return StudyResult(model=info, source=image.source, findings_text=findings_text, labels=labels,
                       regions=tuple(regions), answers=tuple(answers), timings=timings)

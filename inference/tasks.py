"""The per-study task plan: report → classification → grounding (a grounded report).

1. report: the findings text;
2. classification: the 14 labels (negation-aware parser, docs/label-parsing.md);
3. grounding: "where is the {label}" for each positive abnormality label, and phrase grounding of
   each finding sentence of the report, capped at ``max_grounding_questions``.

The image prefix is prefilled once per study and its KV cache reused for every question
(``InferenceSettings.prefix_reuse``); answers are identical to fresh runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from config.settings import InferenceSettings
from inference import prompts
from inference.image import ModelImage
from inference.labels import ABNORMALITY_LABELS
from inference.model import Generation, RadVLMModel, Turn
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


def _task_answer(task: TaskName, question: str, generation: Generation) -> TaskAnswer:
    return TaskAnswer(task=task, question=question, answer=generation.text, prompt_tokens=generation.prompt_tokens,
                      new_tokens=generation.new_tokens, seconds=round(generation.seconds, 4))


def run_study(model: RadVLMModel, image: ModelImage, settings: InferenceSettings) -> StudyResult:
    """Run the configured plan on one image and return the typed result."""
    started = time.perf_counter()
    prefix = model.encode_image(image, reuse_prefix=settings.prefix_reuse)
    timings: dict[str, float] = {"encode_image": round(prefix.seconds, 4)}
    answers: list[TaskAnswer] = []

    def ask(task: TaskName, question: str) -> str:
        generation = model.answer(prefix, [Turn("user", question)])
        answers.append(_task_answer(task, question, generation))
        timings[task] = round(timings.get(task, 0.0) + generation.seconds, 4)
        return generation.text

    findings_text = ask("report", prompts.REPORT_PROMPT) if "report" in settings.tasks else None
    labels = parse_labels(ask("classification", prompts.CLASSIFICATION_PROMPT)) \
        if "classification" in settings.tasks else {}
    regions: list[Region] = []
    if "grounding" in settings.tasks:
        for item in grounding_questions(labels, findings_text, settings):
            parsed = parse_boxes(ask(item.task, item.question))
            regions.append(Region(task=item.task, query=item.query, label=item.label,
                                  boxes=parsed.boxes, dropped=parsed.dropped))
    timings["total"] = round(time.perf_counter() - started, 4)
    return StudyResult(model=model.info, source=image.source, findings_text=findings_text, labels=labels,
                       regions=tuple(regions), answers=tuple(answers), timings=timings)

"""One `SourceSample` + a seeded RNG → the LLaVA ``conversations`` of one record.

Every question and answer comes from ``inference.prompts`` (its ``*_VARIANTS`` tuples and answer
builders), the module inference asks from, so the model is taught the questions it is asked.
Upstream draws a phrasing with ``random.choice`` per sample; we draw the variant index from the
RNG the builder seeds per (component, split, repeat), so each repeat re-draws the phrasing and a
run with the same seed gives the same file. The first human turn starts with ``"<image>\\n"``.
"""

from __future__ import annotations

import random

from inference import prompts
from inference.labels import NO_FINDING
from training.sources.samples import SourceSample

Conversation = list[dict[str, str]]


def _variant(rng: random.Random, variants: tuple[str, ...]) -> int:
    return rng.randrange(len(variants))


def _classification_answer(labels: tuple[str, ...], rng: random.Random) -> str:
    names = [label for label in labels if label != NO_FINDING]
    if not names:
        variants = prompts.CLASSIFICATION_NONE_ANSWER_VARIANTS
    elif len(names) == 1:
        variants = prompts.CLASSIFICATION_ONE_PREFIX_VARIANTS
    else:
        variants = prompts.CLASSIFICATION_MANY_PREFIX_VARIANTS
    return prompts.classification_answer(names, variant=_variant(rng, variants))


def question_answers(sample: SourceSample, rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) pairs of a single-instruction sample."""
    task = sample.task
    if task == "report":
        question = prompts.REPORT_PROMPT_VARIANTS[_variant(rng, prompts.REPORT_PROMPT_VARIANTS)]
        return [(question, sample.text or "")]
    if task == "classification":
        question = prompts.CLASSIFICATION_PROMPT_VARIANTS[
            _variant(rng, prompts.CLASSIFICATION_PROMPT_VARIANTS)]
        return [(question, _classification_answer(sample.labels, rng))]
    if task == "anatomical_grounding":
        region, box = sample.regions[rng.randrange(len(sample.regions))]
        return [(prompts.anatomical_grounding_prompt(
                    region, _variant(rng, prompts.GROUNDING_PROMPT_VARIANTS)),
                 prompts.grounding_answer(region, [box],
                                          _variant(rng, prompts.GROUNDING_ANSWER_VARIANTS)))]
    if task == "abnormality_grounding":
        name = sample.name or ""
        return [(prompts.abnormality_grounding_prompt(
                    name, _variant(rng, prompts.GROUNDING_PROMPT_VARIANTS)),
                 prompts.grounding_answer(name, sample.boxes,
                                          _variant(rng, prompts.GROUNDING_ANSWER_VARIANTS)))]
    if task == "detection":
        question = prompts.DETECTION_PROMPT_VARIANTS[
            _variant(rng, prompts.DETECTION_PROMPT_VARIANTS)]
        answer = prompts.detection_answer(
            sample.findings, variant=_variant(rng, prompts.DETECTION_PREFIX_VARIANTS),
            none_variant=_variant(rng, prompts.DETECTION_NONE_ANSWER_VARIANTS))
        return [(question, answer)]
    if task == "phrase_grounding":
        return [(prompts.phrase_grounding_prompt(
                    sample.name or "", _variant(rng, prompts.PHRASE_GROUNDING_PROMPT_VARIANTS)),
                 prompts.phrase_grounding_answer(
                    sample.boxes, _variant(rng, prompts.PHRASE_GROUNDING_ANSWER_VARIANTS)))]
    raise ValueError(f"task {task!r} has no single-instruction rendering")


def conversations(sample: SourceSample, rng: random.Random) -> Conversation:
    """The ``conversations`` list: human/gpt turns, "<image>\\n" before the first question."""
    if sample.task in ("conversation", "grounded_conversation"):
        turns = [(turn.speaker, turn.value) for turn in sample.turns]
    else:
        turns = []
        for question, answer in question_answers(sample, rng):
            turns += [("human", question), ("gpt", answer)]
    if not turns or turns[0][0] != "human":
        raise ValueError(f"{sample.source} {sample.task}: a conversation must open with a question")
    out = [{"from": speaker, "value": value} for speaker, value in turns]
    out[0]["value"] = "<image>\n" + out[0]["value"]
    return out

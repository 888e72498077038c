"""What the per-study task plan needs from a model: open a study on one image, ask questions about it.

``inference.tasks.run_study`` talks only to an :class:`InferenceBackend`:

* :class:`LocalBackend` runs the in-process ``RadVLMModel``: the image prefix is prefilled once per
  study and its KV cache reused for every question (``InferenceSettings.prefix_reuse``);
* ``inference.remote.RemoteBackend`` sends every question of the study to one OpenAI-compatible
  endpoint (`radvlm worker` or vLLM/SGLang), whose prefix cache keys on the image.

Both give the same answers on the same weights (greedy decoding, the same chat template and pixels).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Protocol

from config.settings import InferenceSettings
from inference.errors import RadVLMError
from inference.image import ModelImage
from inference.model import ImagePrefix, RadVLMModel, Turn
from inference.result import ModelInfo


class BackendUnavailableError(RadVLMError):
    """No inference endpoint could answer (all refused, failed or timed out): not the study's fault,
    the study goes back to the queue with this reason."""


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int  # tokens prefilled for this answer (after a reused image prefix, if any)
    new_tokens: int
    seconds: float


class StudySession(Protocol):
    """Questions about the one image of a study (single-turn each, the image first)."""

    info: ModelInfo           # the model that answers
    encode_seconds: float     # time spent preparing the image (prefill / PNG encoding)

    def ask(self, question: str) -> Answer: ...

    def ask_all(self, questions: Sequence[str]) -> list[Answer]:
        """Independent questions, answers in the same order (a backend may run them concurrently)."""
        ...


class InferenceBackend(Protocol):
    def open_study(self, image: ModelImage, settings: InferenceSettings) -> AbstractContextManager[StudySession]: ...


class _LocalStudy:
    def __init__(self, model: RadVLMModel, prefix: ImagePrefix, max_batch: int = 1) -> None:
        self.model, self.prefix, self.max_batch = model, prefix, max_batch
        self.info = model.info
        self.encode_seconds = prefix.seconds

    def ask(self, question: str) -> Answer:
        generation = self.model.answer(self.prefix, [Turn("user", question)])
        return Answer(generation.text, generation.prompt_tokens, generation.new_tokens, generation.seconds)

    def ask_all(self, questions: Sequence[str]) -> list[Answer]:
        """Batches of up to ``max_batch`` questions, each one generate call over the image prefix
        expanded to the batch (answers equal the answers alone; RadVLMModel.answer_batch)."""
        prepared = [self.model.prepare(self.prefix, [Turn("user", question)]) for question in questions]
        answers: list[Answer] = []
        for start in range(0, len(prepared), self.max_batch):
            for generation in self.model.answer_batch(prepared[start: start + self.max_batch]):
                answers.append(Answer(generation.text, generation.prompt_tokens, generation.new_tokens,
                                      generation.seconds))
        return answers


class LocalBackend:
    """The in-process model (not thread-safe: callers serialise, as the node's model lock does)."""

    def __init__(self, model: RadVLMModel) -> None:
        self.model = model

    @contextmanager
    def open_study(self, image: ModelImage, settings: InferenceSettings) -> Iterator[_LocalStudy]:
        yield _LocalStudy(self.model, self.model.encode_image(image, reuse_prefix=settings.prefix_reuse),
                          settings.max_batch)

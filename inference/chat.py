"""Multi-turn conversation about one image (image on the first turn only, prefix reused)."""

from __future__ import annotations

from typing import TextIO

from inference.api_client import chat_loop
from inference.image import ModelImage
from inference.model import Generation, RadVLMModel, Turn
from inference.parsing import parse_boxes


class ChatSession:
    """Keeps the encoded image and the turns so far; each answer re-uses the image prefix."""

    def __init__(self, model: RadVLMModel, image: ModelImage):
        self.model = model
        self.image = image
        self.prefix = model.encode_image(image, reuse_prefix=True)
        self.turns: list[Turn] = []

    def ask(self, question: str) -> Generation:
        question = question.strip()
        if not question:
            raise ValueError("empty question")
        generation = self.model.answer(self.prefix, [*self.turns, Turn("user", question)])
        self.turns += [Turn("user", question), Turn("assistant", generation.text)]
        return generation


def run_terminal_chat(model: RadVLMModel, image: ModelImage, *, input_stream: TextIO, output_stream: TextIO) -> int:
    """Read questions line by line until EOF or /quit; print answers and any boxes; return turns asked."""
    session = ChatSession(model, image)

    def ask(question: str) -> tuple[str, list[tuple[list[float], tuple[float, ...]]]]:
        text = session.ask(question).text
        return text, [(box.as_list(), box.to_pixels(image.columns, image.rows)) for box in parse_boxes(text).boxes]

    return chat_loop(ask, f"Chatting with {model.info.model_id} about {image.source.file_name or 'the image'}.",
                     input_stream=input_stream, output_stream=output_stream)

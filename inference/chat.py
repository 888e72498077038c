"""Multi-turn conversation about one image (image on the first turn only, prefix reused)."""

from __future__ import annotations

from typing import TextIO

from inference.image import ModelImage
from inference.model import Generation, RadVLMModel, Turn
from inference.parsing import parse_boxes
from inference.result import UNVERIFIED_NOTICE


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
    print(f"*** {UNVERIFIED_NOTICE} ***", file=output_stream)
    print(f"Chatting with {model.info.model_id} about {image.source.file_name or 'the image'}. "
          "Type /quit to end.", file=output_stream)
    asked = 0
    while True:
        print("you> ", end="", file=output_stream, flush=True)
        line = input_stream.readline()
        if not line or line.strip() in {"/quit", "/exit"}:
            print("", file=output_stream)
            return asked
        if not line.strip():
            continue
        generation = session.ask(line)
        asked += 1
        print(f"radvlm> {generation.text}", file=output_stream)
        boxes = parse_boxes(generation.text).boxes
        columns, rows = image.source.columns, image.source.rows
        for box in boxes:
            print("        box [{:.3f}, {:.3f}, {:.3f}, {:.3f}] = pixels ({:.0f}, {:.0f}, {:.0f}, {:.0f})".format(
                *box.as_list(), *box.to_pixels(columns, rows)), file=output_stream)

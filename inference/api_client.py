"""A small client of the OpenAI-compatible chat API (ours, or vLLM/SGLang serving the same weights)
for `radvlm chat --url`: standard library for HTTP, the image (pixels only, as PNG) on the first
turn only."""

from __future__ import annotations

import base64
import io
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from inference.result import UNVERIFIED_NOTICE


class ApiClientError(RuntimeError):
    """The server refused the request or could not be reached; the message says why."""


def image_url_for_file(path: Path, *, allow_colour: bool = False) -> str:
    """A data: URL with the PIXELS ONLY of a local DICOM/PNG/JPEG file: the image is decoded and
    windowed here (``inference.image.load_image``: Modality LUT, VOI/window, MONOCHROME1 inverted)
    and sent as an 8-bit PNG of the original width and height, so boxes map back unchanged. The
    DICOM file itself is never sent: its header carries the patient's name, ID, birth date,
    accession number and institution, and the endpoint may be plain HTTP."""
    from PIL import Image

    from inference.image import load_image

    image = load_image(path, allow_colour=allow_colour)
    buffer = io.BytesIO()
    Image.fromarray(image.pixels).save(buffer, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


class ChatApiClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 600.0) -> None:
        base = base_url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.token, self.timeout = token, timeout

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            raise ApiClientError(f"{self.base}{path}: HTTP {exc.code}: {message}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ApiClientError(f"{self.base}{path}: cannot reach the server ({exc})") from exc

    def model_id(self) -> str:
        models = self._request("GET", "/models").get("data") or []
        if not models:
            raise ApiClientError(f"{self.base}/models lists no model")
        return str(models[0]["id"])

    def complete(self, model: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
        return self._request("POST", "/chat/completions", {"model": model, "messages": messages})


#: one question → (answer text, [(normalised box, pixel box), ...]); ValueError = not asked
Asker = Callable[[str], tuple[str, Sequence[tuple[Sequence[float], Sequence[float]]]]]


CHAT_HELP = """Commands (handled here, never sent to the model):
  /help          this text
  /quit, /exit   end the conversation (also Ctrl-D; Ctrl-C ends it too)
Anything else is a question about the image; follow-up questions see the conversation so far.
Questions the model was trained on, for example:
  Write a radiology report for this chest X-ray.
  Does the patient have cardiomegaly?   (or: List the abnormalities in this image.)
  Where is the heart located in this chest X-ray?   (answers carry boxes [x1, y1, x2, y2])
Line editing and history (arrow keys) work when this is an interactive terminal."""


def _reader(input_stream: TextIO, output_stream: TextIO) -> Callable[[str], str | None]:
    """A prompt-and-read function: ``input()`` with readline line editing and history when both
    streams are the interactive terminal, else plain line reads (pipes, tests). None = end of input."""
    interactive = (input_stream is sys.stdin and output_stream is sys.stdout
                   and input_stream.isatty() and output_stream.isatty())
    if interactive:
        try:
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        except ImportError:  # Windows without pyreadline: plain input()
            pass

        def read_tty(prompt: str) -> str | None:
            try:
                return input(prompt)
            except EOFError:
                return None

        return read_tty

    def read_stream(prompt: str) -> str | None:
        print(prompt, end="", file=output_stream, flush=True)
        line = input_stream.readline()
        return line if line else None

    return read_stream


def chat_loop(ask: Asker, title: str, *, input_stream: TextIO, output_stream: TextIO) -> int:
    """The terminal conversation of `radvlm chat` (local model or API): questions line by line
    until EOF, /quit or Ctrl-C, answers and their boxes printed; ``/help`` and other ``/`` commands
    are answered here (never sent to the model); returns the number of questions asked."""
    print(f"*** {UNVERIFIED_NOTICE} ***", file=output_stream)
    print(f"{title} Type /help for help, /quit to end.", file=output_stream)
    read = _reader(input_stream, output_stream)
    asked = 0
    while True:
        try:
            line = read("you> ")
            if line is None or line.strip() in {"/quit", "/exit"}:
                print("", file=output_stream)
                return asked
            question = line.strip()
            if not question:
                continue
            if question.startswith("/"):
                if question in {"/help", "/?"}:
                    print(CHAT_HELP, file=output_stream)
                else:
                    print(f"(unknown command {question.split()[0]!r}: /help lists the commands; not sent "
                          "to the model)", file=output_stream)
                continue
            try:
                answer, boxes = ask(question)
            except ValueError as exc:
                print(f"(not asked: {exc})", file=output_stream)
                continue
        except KeyboardInterrupt:  # Ctrl-C at the prompt or while the model answers: end cleanly
            print("\n(interrupted)", file=output_stream)
            return asked
        asked += 1
        print(f"radvlm> {answer}", file=output_stream)
        for box, pixels in boxes:
            print("        box [{:.3f}, {:.3f}, {:.3f}, {:.3f}] = pixels ({:.0f}, {:.0f}, {:.0f}, {:.0f})".format(
                *box, *pixels), file=output_stream)


def run_remote_chat(client: ChatApiClient, image_url: str, *, input_stream: TextIO, output_stream: TextIO) -> int:
    """Terminal conversation through the API; returns the number of questions asked."""
    model = client.model_id()
    messages: list[dict[str, Any]] = []

    def ask(question: str) -> tuple[str, list[tuple[list[float], list[float]]]]:
        content: Any = question if messages else [{"type": "image_url", "image_url": {"url": image_url}},
                                                  {"type": "text", "text": question}]
        body = client.complete(model, [*messages, {"role": "user", "content": content}])
        answer = body["choices"][0]["message"]["content"] or ""
        messages.extend([{"role": "user", "content": content}, {"role": "assistant", "content": answer}])
        extra = body.get("radvlm") or {}
        return answer, list(zip(extra.get("boxes", []), extra.get("boxes_pixels", [])))

    return chat_loop(ask, f"Chatting with {model} at {client.base}.", input_stream=input_stream,
                     output_stream=output_stream)

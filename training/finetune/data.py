"""LLaVA-style instruction records → model inputs with an assistant-only loss mask.

Input records are what `radvlm build-dataset` writes (JSON list or JSONL)::

    {"id": "...", "image": "relative/path.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}

The training text is built from the chat template shipped with the weights, message by message,
so that every assistant answer follows exactly the generation prompt inference uses
(``apply_chat_template(..., add_generation_prompt=True)``); the llava-hf template renders a
finished assistant turn's header slightly differently (``"assistant "`` + newline) from its
generation prompt (``"assistant\\n"``), and training on the former would teach the model a
context it never sees when asked. Labels are -100 everywhere except the answers' tokens and the
end-of-turn token after each answer, in every turn. The image goes through the model's own
processor (AnyRes tiling), and its expanded image tokens are never labels.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from inference.image import load_image

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"
ROLES = {"human": "user", "gpt": "assistant"}


class DatasetFormatError(ValueError):
    """A training file or record does not have the LLaVA conversation layout."""


class ChatTemplateError(ValueError):
    """The chat template cannot be split into prompt and answer parts."""


class SampleTooLongError(ValueError):
    """A sample's image tokens do not fit in ``max_length``."""


@dataclass(frozen=True)
class Record:
    id: str
    image: str
    conversations: tuple[tuple[str, str], ...]  # (role "user"/"assistant", text without the image marker)
    source: str  # "file:line" for error messages


def _check_record(raw: Any, where: str) -> Record:
    if not isinstance(raw, dict):
        raise DatasetFormatError(f"{where}: a record must be a JSON object")
    for key in ("id", "image", "conversations"):
        if key not in raw:
            raise DatasetFormatError(f"{where}: record has no {key!r}")
    turns = raw["conversations"]
    if not isinstance(turns, list) or len(turns) < 2 or len(turns) % 2:
        raise DatasetFormatError(f"{where}: 'conversations' must hold human/gpt pairs")
    parsed: list[tuple[str, str]] = []
    for index, turn in enumerate(turns):
        expected = "human" if index % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected or not isinstance(turn.get("value"), str):
            raise DatasetFormatError(f"{where}: turn {index} must be {{'from': '{expected}', 'value': str}}")
        text = turn["value"]
        if IMAGE_MARKER in text and index != 0:
            raise DatasetFormatError(f"{where}: {IMAGE_MARKER} outside the first human turn (turn {index})")
        text = text.replace(IMAGE_MARKER, "", 1).strip() if index == 0 else text.strip()
        if not text:
            raise DatasetFormatError(f"{where}: turn {index} is empty")
        parsed.append((ROLES[expected], text))
    return Record(id=str(raw["id"]), image=str(raw["image"]), conversations=tuple(parsed), source=where)


def load_records(files: Sequence[Path]) -> list[Record]:
    """Read JSON-list or JSONL files; DatasetFormatError names the file and line/index of a bad record."""
    records: list[Record] = []
    for path in files:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise DatasetFormatError(f"cannot read training file {path}: {exc}") from exc
        stripped = text.lstrip()
        try:
            if stripped.startswith("["):
                items = [(f"{path}[{i}]", item) for i, item in enumerate(json.loads(text))]
            else:
                items = [(f"{path}:{n}", json.loads(line)) for n, line in enumerate(text.splitlines(), 1)
                         if line.strip()]
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(f"{path}: not valid JSON/JSONL: {exc}") from exc
        records.extend(_check_record(raw, where) for where, raw in items)
    if not records:
        raise DatasetFormatError(f"no training records in {', '.join(str(f) for f in files)}")
    return records


def to_messages(record: Record, system_prompt: str | None = None) -> list[dict]:
    """Chat-template messages: the image on the first user turn only, as RadVLM was trained."""
    messages: list[dict] = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    for index, (role, text) in enumerate(record.conversations):
        content: list[dict] = [{"type": "text", "text": text}]
        if index == 0:
            content.insert(0, {"type": "image"})
        messages.append({"role": role, "content": content})
    return messages


def _render(processor, messages: list[dict], *, generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def build_training_text(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The full training text and the character spans that carry the loss.

    Each assistant answer is placed after the template's generation prompt for its history and
    followed by the template's end-of-turn marker; both the answer and that marker are targets.
    """
    text = ""
    spans: list[tuple[int, int]] = []
    previous = ""
    for index, message in enumerate(messages):
        current = _render(processor, messages[: index + 1])
        if not current.startswith(previous):
            raise ChatTemplateError(f"the chat template does not render message {index} as an append")
        delta = current[len(previous):]
        if message["role"] != "assistant":
            text += delta
        else:
            answer = "".join(part["text"] for part in message["content"] if part["type"] == "text")
            position = delta.find(answer)
            if position < 0:
                raise ChatTemplateError(f"the chat template does not render assistant message {index} verbatim")
            generation_prompt = _render(processor, messages[:index], generation_prompt=True)[len(previous):]
            tail = delta[position + len(answer):]
            end_of_turn = tail.rstrip()
            if not end_of_turn:
                raise ChatTemplateError("the chat template closes assistant turns with no end-of-turn marker")
            text += generation_prompt
            start = len(text)
            text += answer + end_of_turn
            spans.append((start, len(text)))
            text += tail[len(end_of_turn):]
        previous = current
    if not spans:
        raise ChatTemplateError("the conversation has no assistant turn to learn from")
    return text, spans


def target_mask(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` (image marker NOT expanded) and whether each token is a target."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(a <= start < b for a, b in spans) for start, _ in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask


def expand_mask(short_ids: list[int], mask: list[bool], full_ids: list[int], image_token_id: int) -> list[bool]:
    """Carry the mask over the processor's ids, where each image marker became a run of image tokens."""
    expanded: list[bool] = []
    cursor = 0
    for token, is_target in zip(short_ids, mask):
        if token == image_token_id:
            run = 0
            while cursor + run < len(full_ids) and full_ids[cursor + run] == image_token_id:
                run += 1
            if run == 0:
                raise ChatTemplateError("the processor output lost an image token")
            expanded.extend([False] * run)
            cursor += run
            continue
        if cursor >= len(full_ids) or full_ids[cursor] != token:
            raise ChatTemplateError(f"processor and tokenizer disagree at token {cursor}")
        expanded.append(is_target)
        cursor += 1
    if cursor != len(full_ids):
        raise ChatTemplateError("the processor produced extra tokens the tokenizer did not")
    return expanded


def encode_sample(processor, messages: list[dict], image, *, max_length: int) -> dict[str, torch.Tensor]:
    """input_ids, labels (assistant tokens only), pixel_values and image_sizes for one sample."""
    text, spans = build_training_text(processor, messages)
    short_ids, mask = target_mask(processor.tokenizer, text, spans)
    encoded = processor(images=[image], text=[text], return_tensors="pt")
    input_ids = encoded["input_ids"][0]
    full_mask = torch.tensor(expand_mask(short_ids, mask, input_ids.tolist(), processor.image_token_id))
    labels = torch.where(full_mask, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    if len(input_ids) > max_length:
        image_positions = (input_ids == processor.image_token_id).nonzero().flatten()
        if len(image_positions) and int(image_positions[-1]) >= max_length:
            raise SampleTooLongError(f"{len(image_positions)} image tokens do not fit in max_length={max_length}")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    sample = {"input_ids": input_ids, "labels": labels, "pixel_values": encoded["pixel_values"][0],
              "image_sizes": encoded["image_sizes"][0]}
    if getattr(processor, "single_tile", False):
        sample["batch_num_images"] = encoded["batch_num_images"]
    return sample


class ConversationDataset(Dataset):
    """Records, read lazily: the image is loaded and tiled when a sample is drawn."""

    def __init__(self, records: Sequence[Record], processor, image_root: Path, *,
                 system_prompt: str | None = None, max_length: int = 8192):
        self.records = list(records)
        self.processor = processor
        self.image_root = Path(image_root)
        self.system_prompt = system_prompt
        self.max_length = max_length
        missing = [r.image for r in self.records if not (self.image_root / r.image).is_file()]
        if missing:
            raise DatasetFormatError(f"{len(missing)} image(s) missing under {self.image_root}, e.g. {missing[0]}")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def lengths(self) -> list[int]:
        """Cheap length proxies for grouping by length (words in the conversation, as LLaVA does)."""
        return [sum(len(text.split()) for _, text in record.conversations) for record in self.records]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        image = load_image(self.image_root / record.image).to_pil_rgb()
        return encode_sample(self.processor, to_messages(record, self.system_prompt), image,
                             max_length=self.max_length)


@dataclass
class Collator:
    """Right-pads text to the longest sample and AnyRes tiles to the most tiles in the batch
    (the model keeps only each image's real tiles, counted from ``image_sizes``)."""

    pad_token_id: int

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(s["input_ids"]) for s in samples)
        most_tiles = max(s["pixel_values"].shape[0] for s in samples)
        input_ids = torch.full((len(samples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(samples), longest), dtype=torch.long)
        pixels = torch.zeros((len(samples), most_tiles, *samples[0]["pixel_values"].shape[1:]),
                             dtype=samples[0]["pixel_values"].dtype)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            input_ids[row, :n] = sample["input_ids"]
            labels[row, :n] = sample["labels"]
            attention[row, :n] = 1
            pixels[row, : sample["pixel_values"].shape[0]] = sample["pixel_values"]
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "pixel_values": pixels,
                 "image_sizes": torch.stack([s["image_sizes"] for s in samples])}
        if all("batch_num_images" in s for s in samples):  # single-tile processors (inference/processor.py)
            batch["batch_num_images"] = torch.cat([s["batch_num_images"].reshape(-1) for s in samples])
        return batch

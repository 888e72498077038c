"""The transformers LlavaOnevision runner: load a local RadVLM folder, ask questions about an image.

Greedy decoding, SDPA attention, bf16 on GPU / fp32 on CPU, the chat template shipped with the
weights, the image on the first user turn only (as RadVLM was trained).

Image-prefix reuse (design §3): ``encode_image`` runs the model once over the prompt up to and
including the image tokens and keeps that KV cache; every later question about the same image
(the task plan, a conversation's turns) is generated from a deep copy of it, so the ~7k image
tokens are prefilled once per study instead of once per question. Tokens are identical to a
fresh run; tests/test_model.py checks it.

Batching (``answer_batch``): several questions, about one image or several, are answered by one
``generate`` call. Each row is laid out as ``[pad][image prefix][pad][question]``: the prefix KV
caches are right-aligned into one batched cache (one prefix expanded to the batch when the
questions share an image), the question suffixes are left-padded, the attention mask zeroes both
pads and ``generate`` derives each row's positions from the mask, so every row sees exactly the
positions and keys it would see alone. Stops are per row (``eos_token_id``); each row is cut at
its own ``max_new_tokens``. Greedy answers equal the answers alone (fp32; tests/test_batching.py).
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from transformers import DynamicCache, LlavaOnevisionForConditionalGeneration

from config.settings import ModelSettings
from inference.errors import ModelError, ReservedTokenError
from inference.image import ModelImage
from inference.model_folder import check_model_folder, weights_sha256
from inference.processor import load_processor
from inference.result import ModelInfo

log = logging.getLogger(__name__)

# transformers renamed ``past_key_values`` to ``cache`` during 5.x (the old name is deprecated until 5.40):
# use the name this version's forward declares, so the runner works on older 5.x (5.17 on a GPU machine).
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlavaOnevisionForConditionalGeneration.forward).parameters \
    else "past_key_values"


@dataclass(frozen=True)
class Turn:
    role: Literal["user", "assistant"]
    text: str


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int  # tokens prefilled for this answer (after the reused image prefix, if any)
    total_tokens_in_prompt: int
    new_tokens: int
    seconds: float
    step_logits: tuple[torch.Tensor, ...] | None = None  # per generated token, when asked for
    batch_size: int = 1  # questions answered by the same generate call


@dataclass
class ImagePrefix:
    """One image, encoded once: processor outputs and (with reuse) the KV cache of the prompt prefix."""

    image_inputs: dict[str, torch.Tensor]
    image_token_count: int
    prefix_ids: torch.Tensor  # 1-D, the prompt up to and including the last image token
    cache: DynamicCache | None
    seconds: float


@dataclass(frozen=True)
class PreparedQuestion:
    """A question about an encoded image, tokenised and checked (control tokens refused) before batching."""

    prefix: ImagePrefix
    ids: torch.Tensor  # 1-D, the whole prompt
    max_new_tokens: int
    reuses_prefix: bool


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("[model] device = 'cuda' but no CUDA GPU is visible to this process")
    return torch.device(requested)


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, requested)


class RadVLMModel:
    """A loaded model + processor; not thread-safe (one generation at a time per instance)."""

    def __init__(self, model: LlavaOnevisionForConditionalGeneration, processor, info: ModelInfo,
                 settings: ModelSettings, device: torch.device):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.info = info
        self.settings = settings
        self.device = device
        stop_ids = {self.tokenizer.convert_tokens_to_ids("<|im_end|>"), self.tokenizer.eos_token_id}
        self._stop_ids = sorted(i for i in stop_ids if i is not None and i != self.tokenizer.unk_token_id)
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._stop_ids[0]
        # strings the tokenizer turns into control tokens wherever they appear in the prompt text
        reserved = {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        reserved |= {getattr(processor, name, None) for name in ("image_token", "video_token")}
        self._reserved_tokens = sorted(t for t in reserved if t)

    # -- prompts ---------------------------------------------------------------------------
    def conversation_prompt(self, turns: Sequence[Turn], *, with_image: bool = True) -> str:
        """The chat-template text for ``turns``, the image on the first user turn, ending with the
        assistant generation prompt."""
        if not turns or turns[0].role != "user" or turns[-1].role != "user":
            raise ValueError("a conversation starts and ends with a user turn")
        messages = []
        if self.settings.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.settings.system_prompt}]})
        for index, turn in enumerate(turns):
            self._check_text(turn.text)
            content = [{"type": "text", "text": turn.text}]
            if index == 0 and with_image:
                content.insert(0, {"type": "image"})
            messages.append({"role": turn.role, "content": content})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _check_text(self, text: str) -> None:
        """Refuse turn text holding a control token: "<image>" would add an image slot (fresh run:
        feature/token mismatch; reused prefix: a silently different prompt), "<|im_start|>" a turn."""
        found = [token for token in self._reserved_tokens if token in text]
        if found:
            raise ReservedTokenError(f"the text contains the reserved token {found[0]!r}; "
                                     "remove it (control tokens are not accepted in questions or answers)")

    # -- image encoding --------------------------------------------------------------------
    def encode_image(self, image: ModelImage, *, reuse_prefix: bool = True) -> ImagePrefix:
        """Preprocess ``image`` once; with ``reuse_prefix``, also prefill the prompt prefix."""
        started = time.perf_counter()
        probe = self.conversation_prompt([Turn("user", "")])
        encoded = self.processor(images=[image.to_pil_rgb()], text=[probe], return_tensors="pt")
        ids = encoded["input_ids"][0]
        image_positions = (ids == self.processor.image_token_id).nonzero().flatten()
        if len(image_positions) == 0:
            raise ModelError("the processor produced no image tokens: processor/model mismatch")
        prefix_ids = ids[: int(image_positions[-1]) + 1]
        image_inputs = {key: value.to(self.device) for key, value in encoded.items()
                        if key not in ("input_ids", "attention_mask")}
        if "pixel_values" in image_inputs:
            image_inputs["pixel_values"] = image_inputs["pixel_values"].to(self.model.dtype)
        cache = None
        if reuse_prefix:
            cache = DynamicCache(config=self.model.config.get_text_config())
            with torch.inference_mode():
                self.model(input_ids=prefix_ids[None].to(self.device),
                           attention_mask=torch.ones(1, len(prefix_ids), dtype=torch.long, device=self.device),
                           **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1, **image_inputs)
        return ImagePrefix(image_inputs=image_inputs, image_token_count=len(image_positions),
                           prefix_ids=prefix_ids, cache=cache, seconds=time.perf_counter() - started)

    def _token_ids(self, prompt: str, prefix: ImagePrefix) -> torch.Tensor:
        """Tokenise ``prompt`` exactly as the processor would, image token expanded to the image's count."""
        image_token = self.processor.image_token
        expanded = prompt.replace(image_token, image_token * prefix.image_token_count, 1)
        return self.tokenizer(expanded, return_tensors="pt")["input_ids"][0]

    # -- generation ------------------------------------------------------------------------
    def prepare(self, prefix: ImagePrefix, turns: Sequence[Turn], *,
                max_new_tokens: int | None = None) -> PreparedQuestion:
        """Tokenise the last user turn of ``turns`` for ``answer_batch`` (ReservedTokenError here, per question)."""
        ids = self._token_ids(self.conversation_prompt(turns), prefix)
        prefix_len = len(prefix.prefix_ids)
        reuse = prefix.cache is not None and len(ids) > prefix_len and torch.equal(ids[:prefix_len], prefix.prefix_ids)
        return PreparedQuestion(prefix=prefix, ids=ids, max_new_tokens=max_new_tokens or self.settings.max_new_tokens,
                                reuses_prefix=reuse)

    def answer_batch(self, questions: Sequence[PreparedQuestion], *, return_logits: bool = False) -> list[Generation]:
        """Greedy answers to ``questions`` from one ``generate`` call (module docstring: the layout).

        Questions without a reusable prefix cache are answered one by one (no batching without a KV prefix)."""
        if not questions:
            return []
        if len(questions) == 1 or not all(q.reuses_prefix for q in questions):
            return [self._answer_prepared(q, return_logits) for q in questions]
        started = time.perf_counter()
        prefix_lens = [len(q.prefix.prefix_ids) for q in questions]
        suffixes = [q.ids[n:] for q, n in zip(questions, prefix_lens)]
        cached, asked = max(prefix_lens), max(len(s) for s in suffixes)
        rows, masks = [], []
        for question, prefix_len, suffix in zip(questions, prefix_lens, suffixes):
            left, middle = cached - prefix_len, asked - len(suffix)
            rows.append(torch.cat([torch.full((left,), self._pad_id, dtype=torch.long), question.prefix.prefix_ids,
                                   torch.full((middle,), self._pad_id, dtype=torch.long), suffix]))
            masks.append(torch.cat([torch.zeros(left, dtype=torch.long), torch.ones(prefix_len, dtype=torch.long),
                                    torch.zeros(middle, dtype=torch.long), torch.ones(len(suffix), dtype=torch.long)]))
        input_ids = torch.stack(rows).to(self.device)
        attention_mask = torch.stack(masks).to(self.device)
        cache = self._batched_cache([q.prefix for q in questions], cached)
        limit = max(q.max_new_tokens for q in questions)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **{CACHE_KWARG: cache}, max_new_tokens=limit,
                do_sample=False, num_beams=1, eos_token_id=self._stop_ids, pad_token_id=self._pad_id,
                return_dict_in_generate=True, output_logits=return_logits)
        seconds = time.perf_counter() - started
        answers = []
        for index, (row, question, suffix) in enumerate(zip(output.sequences, questions, suffixes)):
            new_ids = row[input_ids.shape[1]:][: question.max_new_tokens]
            generation = self._generation(new_ids, prompt_tokens=len(suffix), total=len(question.ids),
                                          seconds=seconds / len(questions))  # its share of the batch
            generation = replace(generation, batch_size=len(questions))
            if return_logits:  # this row's steps up to and including its stop token
                steps = min(generation.new_tokens + 1, len(new_ids))
                generation = replace(generation, step_logits=tuple(step[index: index + 1] for step in output.logits[:steps]))
            answers.append(generation)
        return answers

    def _batched_cache(self, prefixes: Sequence[ImagePrefix], length: int) -> DynamicCache:
        """One cache for the batch: each prefix's keys/values right-aligned to ``length`` (zeros before,
        masked). Prefixes are read, never modified."""
        first = prefixes[0].cache
        assert first is not None
        batched = DynamicCache(config=self.model.config.get_text_config())
        same = all(p is prefixes[0] for p in prefixes)
        for index, layer in enumerate(first.layers):
            keys, values = [], []
            if same:  # one image for the whole batch: expand its prefix
                keys, values = [layer.keys.expand(len(prefixes), -1, -1, -1)], [layer.values.expand(len(prefixes), -1, -1, -1)]
            else:
                for prefix in prefixes:
                    own = prefix.cache.layers[index]  # type: ignore[union-attr]
                    pad = length - own.keys.shape[2]
                    keys.append(torch.nn.functional.pad(own.keys, (0, 0, pad, 0)))
                    values.append(torch.nn.functional.pad(own.values, (0, 0, pad, 0)))
            batched.update(torch.cat(keys).contiguous(), torch.cat(values).contiguous(), index)
        return batched

    def _generation(self, new_ids: torch.Tensor, *, prompt_tokens: int, total: int, seconds: float,
                    step_logits: tuple[torch.Tensor, ...] | None = None) -> Generation:
        """Text and counts of one row's new tokens, cut at its first stop token."""
        stops = torch.isin(new_ids, torch.tensor(self._stop_ids, device=new_ids.device)).nonzero()
        kept = new_ids[: int(stops[0])] if len(stops) else new_ids
        text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
        return Generation(text=text, prompt_tokens=prompt_tokens, total_tokens_in_prompt=total,
                          new_tokens=len(kept), seconds=seconds, step_logits=step_logits)

    def answer_streaming(self, question: PreparedQuestion, streamer) -> Generation:
        """As ``answer_batch([question])[0]``, each new token also handed to ``streamer`` (a transformers
        streamer, e.g. ``TextIteratorStreamer``) as it is produced (the chat API's ``stream: true``)."""
        return self._answer_prepared(question, streamer=streamer)

    def _answer_prepared(self, question: PreparedQuestion, return_logits: bool = False,
                         streamer=None) -> Generation:
        started = time.perf_counter()
        prefix, ids, reuse = question.prefix, question.ids, question.reuses_prefix
        kwargs: dict = {} if streamer is None else {"streamer": streamer}
        if reuse:
            kwargs[CACHE_KWARG] = copy.deepcopy(prefix.cache)
        else:
            kwargs.update(prefix.image_inputs)
        input_ids = ids[None].to(self.device)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                max_new_tokens=question.max_new_tokens, do_sample=False, num_beams=1,
                eos_token_id=self._stop_ids, pad_token_id=self._pad_id,
                return_dict_in_generate=True, output_logits=return_logits, **kwargs)
        new_ids = output.sequences[0, len(ids):]
        return self._generation(new_ids, prompt_tokens=len(ids) - (len(prefix.prefix_ids) if reuse else 0),
                                total=len(ids), seconds=time.perf_counter() - started,
                                step_logits=tuple(output.logits) if return_logits else None)

    def answer(self, prefix: ImagePrefix, turns: Sequence[Turn], *, max_new_tokens: int | None = None,
               return_logits: bool = False) -> Generation:
        """Greedy answer to the last user turn of ``turns`` about the encoded image
        (``return_logits``: keep each step's logits, e.g. for confidence or parity checks)."""
        return self._answer_prepared(self.prepare(prefix, turns, max_new_tokens=max_new_tokens), return_logits)

    def ask(self, image: ModelImage, question: str) -> Generation:
        """One question, no reuse: preprocess, prefill everything, generate."""
        started = time.perf_counter()
        prefix = self.encode_image(image, reuse_prefix=False)
        generation = self.answer(prefix, [Turn("user", question)])
        return Generation(text=generation.text, prompt_tokens=generation.prompt_tokens,
                          total_tokens_in_prompt=generation.total_tokens_in_prompt,
                          new_tokens=generation.new_tokens, seconds=time.perf_counter() - started)


def _model_version(folder: Path, settings: ModelSettings, weights_hash: str) -> str:
    if settings.version:
        return settings.version
    try:
        declared = json.loads((folder / "config.json").read_text()).get("radvlm_version")
    except (OSError, ValueError):
        declared = None
    return str(declared) if declared else f"sha256-{weights_hash[:12]}"


def load_model(settings: ModelSettings) -> RadVLMModel:
    """Load the folder at ``settings.path``; ModelFolderError/ModelError with a clear reason on failure."""
    folder = Path(settings.path)
    weight_files = check_model_folder(folder)
    processor = load_processor(folder)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    try:
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, attn_implementation=settings.attn_implementation)
    except Exception as exc:  # safetensors, torch and config errors have no common base class
        raise ModelError(f"cannot load the model weights from {folder}: {exc}") from exc
    model.to(device).eval()
    weights_hash = weights_sha256(weight_files)
    if settings.vision_backend == "onnxruntime":
        from inference.onnx_vision import use_onnx_vision

        provider = use_onnx_vision(model, Path(settings.onnx_dir or folder / "onnx"), weights_hash)
        log.info("image encoder: onnxruntime (%s)", provider)
    from inference.demo_model import demonstration_reason

    demonstration = demonstration_reason(folder, weights_hash)
    info = ModelInfo(model_id=settings.model_id or folder.resolve().name,
                     version=_model_version(folder, settings, weights_hash), weights_sha256=weights_hash,
                     demonstration=demonstration is not None)
    log.info("loaded model %s version %s on %s (%s)", info.model_id, info.version, device, dtype)
    if demonstration:
        log.warning("DEMONSTRATION PHANTOM MODEL: %s; its results are labelled as such", demonstration)
    return RadVLMModel(model, processor, info, settings, device)

"""The transformers LlavaOnevision runner: load a local RadVLM folder, ask questions about an image.

Greedy decoding, SDPA attention, bf16 on GPU / fp32 on CPU, the chat template shipped with the
weights, the image on the first user turn only (as RadVLM was trained).

Image-prefix reuse (design §3): ``encode_image`` runs the model once over the prompt up to and
including the image tokens and keeps that KV cache; every later question about the same image
(the task plan, a conversation's turns) is generated from a deep copy of it, so the ~7k image
tokens are prefilled once per study instead of once per question. Tokens are identical to a
fresh run; tests/test_model.py checks it.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass
class ImagePrefix:
    """One image, encoded once: processor outputs and (with reuse) the KV cache of the prompt prefix."""

    image_inputs: dict[str, torch.Tensor]
    image_token_count: int
    prefix_ids: torch.Tensor  # 1-D, the prompt up to and including the last image token
    cache: DynamicCache | None
    seconds: float


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
                           cache=cache, use_cache=True, logits_to_keep=1, **image_inputs)
        return ImagePrefix(image_inputs=image_inputs, image_token_count=len(image_positions),
                           prefix_ids=prefix_ids, cache=cache, seconds=time.perf_counter() - started)

    def _token_ids(self, prompt: str, prefix: ImagePrefix) -> torch.Tensor:
        """Tokenise ``prompt`` exactly as the processor would, image token expanded to the image's count."""
        image_token = self.processor.image_token
        expanded = prompt.replace(image_token, image_token * prefix.image_token_count, 1)
        return self.tokenizer(expanded, return_tensors="pt")["input_ids"][0]

    # -- generation ------------------------------------------------------------------------
    def answer(self, prefix: ImagePrefix, turns: Sequence[Turn], *, max_new_tokens: int | None = None,
               return_logits: bool = False) -> Generation:
        """Greedy answer to the last user turn of ``turns`` about the encoded image
        (``return_logits``: keep each step's logits, e.g. for confidence or parity checks)."""
        started = time.perf_counter()
        ids = self._token_ids(self.conversation_prompt(turns), prefix)
        prefix_len = len(prefix.prefix_ids)
        reuse = prefix.cache is not None and torch.equal(ids[:prefix_len], prefix.prefix_ids)
        kwargs: dict = {}
        if reuse:
            kwargs["cache"] = copy.deepcopy(prefix.cache)
        else:
            kwargs.update(prefix.image_inputs)
        input_ids = ids[None].to(self.device)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens or self.settings.max_new_tokens, do_sample=False, num_beams=1,
                eos_token_id=self._stop_ids, pad_token_id=self._pad_id,
                return_dict_in_generate=True, output_logits=return_logits, **kwargs)
        new_ids = output.sequences[0, len(ids):]
        new_count = int((~torch.isin(new_ids, torch.tensor(self._stop_ids, device=new_ids.device))).sum())
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        return Generation(text=text, prompt_tokens=len(ids) - (prefix_len if reuse else 0),
                          total_tokens_in_prompt=len(ids), new_tokens=new_count,
                          seconds=time.perf_counter() - started,
                          step_logits=tuple(output.logits) if return_logits else None)

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
    from inference.demo_model import demonstration_reason

    demonstration = demonstration_reason(folder, weights_hash)
    info = ModelInfo(model_id=settings.model_id or folder.resolve().name,
                     version=_model_version(folder, settings, weights_hash), weights_sha256=weights_hash,
                     demonstration=demonstration is not None)
    log.info("loaded model %s version %s on %s (%s)", info.model_id, info.version, device, dtype)
    if demonstration:
        log.warning("DEMONSTRATION PHANTOM MODEL: %s; its results are labelled as such", demonstration)
    return RadVLMModel(model, processor, info, settings, device)

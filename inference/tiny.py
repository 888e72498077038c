"""A tiny random-weight LlavaOnevision in the RadVLM release format, built offline.

For tests, benchmarks and smoke runs only: it answers nonsense. Its geometry mirrors the real
model (SigLIP tiles with AnyRes grid pinpoints 1×1 … 6×6 tiles, ``anyres_max_9``,
``vision_feature_select_strategy="full"``, Qwen2 text model, the llava-hf chat template) at a
small scale, and its tokenizer is a byte-level BPE trained here with the `tokenizers` library
on the RadVLM prompt phrasings, so no hub download is ever needed.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                          Qwen2Tokenizer, SiglipVisionConfig)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from inference import prompts
from inference.labels import LABELS
from inference.processor import LlavaOnevisionImageOnlyProcessor

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

# The chat template of the llava-hf llava-onevision-qwen2 releases (which RadVLM's HF export uses).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TINY_VERSION = "tiny-random"


def _corpus() -> list[str]:
    texts = [prompts.REPORT_PROMPT, prompts.CLASSIFICATION_PROMPT, prompts.DETECTION_PROMPT,
             "The heart size is normal. The lungs are clear. No pleural effusion or pneumothorax.",
             "There is a right lower lobe opacity. Small left pleural effusion. Cardiomegaly.",
             "[0.12, 0.34, 0.56, 0.78] and [0.05, 0.10, 0.95, 0.90]", "0123456789"]
    texts += [prompts.abnormality_grounding_prompt(label) for label in LABELS]
    texts += [prompts.anatomical_grounding_prompt(region) for region in prompts.ANATOMICAL_REGIONS]
    texts += [prompts.phrase_grounding_prompt("Small left pleural effusion.")]
    return texts * 4


def build_tokenizer(vocab_size: int = 400, corpus: Sequence[str] | None = None) -> Qwen2Tokenizer:
    """A byte-level BPE (Qwen2 style) trained offline; every digit stays its own token.

    ``corpus``: the texts to learn merges from (default: the RadVLM prompt phrasings).
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(list(corpus) if corpus is not None else _corpus(), trainer)
    with tempfile.TemporaryDirectory() as tmp:
        bpe.model.save(tmp)
        tokenizer = Qwen2Tokenizer(vocab=f"{tmp}/vocab.json", merges=f"{tmp}/merges.txt",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return tokenizer


@dataclass(frozen=True)
class TinyGeometry:
    """Sizes of a tiny LlavaOnevision. Defaults: the random test model (SigLIP 2×32, Qwen2 2×64)."""

    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_intermediate: int | None = None   # default 2 × text_hidden
    text_heads: int = 2
    text_kv_heads: int = 1
    tie_embeddings: bool = False
    single_tile: bool = False              # one square tile per image, no AnyRes grid (processor option)
    vocab_size: int = 400


def build_tiny_model(out_dir: Path | str, *, seed: int = 0, tile_size: int = 32, patch_size: int = 8,
                     max_tiles_per_side: int = 6, text_hidden: int = 64, text_layers: int = 2,
                     geometry: TinyGeometry | None = None, corpus: Sequence[str] | None = None,
                     version: str | None = None, card: str | None = None) -> Path:
    """Write a tiny random LlavaOnevision folder (config, safetensors, tokenizer, processor, template).

    ``geometry`` sizes the towers (default: the test model); ``corpus`` trains the tokenizer on
    other texts (e.g. phantom reports and answers); ``version`` and ``card`` replace the
    ``radvlm_version`` and the README of the random model.
    """
    geometry = geometry or TinyGeometry()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(geometry.vocab_size, corpus)
    if geometry.single_tile:
        pinpoints = [[tile_size, tile_size]]
    else:
        pinpoints = [[tile_size * rows, tile_size * cols]
                     for rows in range(1, max_tiles_per_side + 1) for cols in range(1, max_tiles_per_side + 1)]
    vision = SiglipVisionConfig(hidden_size=geometry.vision_hidden, intermediate_size=geometry.vision_intermediate,
                                num_hidden_layers=geometry.vision_layers, num_attention_heads=geometry.vision_heads,
                                image_size=tile_size, patch_size=patch_size)
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=text_hidden,
                       intermediate_size=geometry.text_intermediate or 2 * text_hidden,
                       num_hidden_layers=text_layers, num_attention_heads=geometry.text_heads,
                       num_key_value_heads=geometry.text_kv_heads,
                       max_position_embeddings=8192, tie_word_embeddings=geometry.tie_embeddings,
                       eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"), tie_word_embeddings=geometry.tie_embeddings)
    config.radvlm_version = version or f"{TINY_VERSION}-seed{seed}"
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False
    model.save_pretrained(out_dir)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": tile_size, "width": tile_size}, image_grid_pinpoints=pinpoints,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_pad=True, do_convert_rgb=True)
    processor = LlavaOnevisionImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=(tile_size // patch_size) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", chat_template=CHAT_TEMPLATE,
        single_tile=geometry.single_tile)
    processor.save_pretrained(out_dir)
    processor_config_path = out_dir / "processor_config.json"
    processor_config = json.loads(processor_config_path.read_text())
    processor_config["processor_class"] = "LlavaOnevisionProcessor"  # as the real release declares
    processor_config_path.write_text(json.dumps(processor_config, indent=2))
    (out_dir / "README.md").write_text(card or (
        "# Tiny random LlavaOnevision (radvlm tiny-model)\n\n"
        "Random weights in the RadVLM release format, for tests and smoke runs. Its answers are "
        "meaningless. Not a medical device; never use for patient care.\n"))
    return out_dir

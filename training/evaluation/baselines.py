"""Baselines the paper re-evaluated (Appendix Table 2), as prompt adapters and answerers.

An adapter says how a model is asked each task and how its answer is brought into RadVLM's
answer shape (so the same metrics apply); an answerer runs a model on one image and a list of
turns. The prompts and conversions follow upstream's ``radvlm/evaluation/evaluate_instructions.py``
and ``models_loading_inference.py``.

| adapter | checkpoint the paper used | runs here |
|---|---|---|
| ``radvlm`` | RadVLM (llava_onevision) | yes: ``inference.model`` |
| ``llava-onevision`` | llava-hf/llava-onevision-qwen2-7b-si-hf (the paper's supplementary table), RadVLM's prompts | yes: same architecture |
| ``chexagent`` | StanfordAIMI/CheXagent-2-3b | yes with local weights: remote code (``trust_remote_code``) |
| ``maira-2`` | microsoft/maira-2 | yes with local weights: remote code; report + grounding only |
| ``llava-med`` | microsoft/llava-med-v1.5-mistral-7b | no: needs the LLaVA-Med repository's model classes |
| ``radialog`` | ChantalPellegrini/RaDialog-interactive-radiology-report-generation | no: needs the RaDialog repository (LLAVA_Biovil) and llava-v1.5-7b base weights |

Remote-code answerers were written from upstream's calls and are not exercised by the tests
(no weights on these machines); the LLaVA-OneVision path is, on the tiny model. LLaVA-Med and
RaDialog have no in-process runner: their model classes live in their own repositories, so
``check_runnable`` stops with what they need instead of producing any output; run them with their
own code and score their predictions with ``radvlm evaluate --score``.

CheXagent grounding: upstream draws each question with ``random.choice`` among CheXagent's own
templates (ten for abnormality grounding, two for anatomical and phrase grounding). We draw the
same templates with ``random.Random(f"{seed}:{record id}")``, so a resumed or repeated run asks
each record the same question (upstream's draw depends on the order of the run).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from inference.image import ModelImage
from inference.labels import ABNORMALITY_LABELS
from inference.model import ImagePrefix, RadVLMModel, Turn


class BaselineUnavailableError(RuntimeError):
    """The baseline cannot run in this process; the message says what it needs."""


class Answerer(Protocol):
    model_id: str

    def answer(self, image_key: str, image: ModelImage, turns: Sequence[Turn], task: str,
               subject: str | None) -> str:
        """The answer to the last user turn of ``turns`` about ``image`` (``image_key`` names the
        image, so an answerer may keep per-image state; ``task``/``subject`` are for models that
        build their own prompts)."""


@dataclass(frozen=True)
class PromptAdapter:
    """How one model is asked each task and how its answers are converted."""

    name: str
    checkpoint: str
    needs: str
    task_prompts: dict[str, str] = field(default_factory=dict)  # task → template ("{}" = subject)
    task_variants: dict[str, tuple[str, ...]] = field(default_factory=dict)  # task → templates drawn among
    seed: int = 0

    def template(self, task: str, key: str = "") -> str | None:
        """The template for ``task``: one of ``task_variants[task]`` drawn with
        ``random.Random(f"{seed}:{key}")`` (``key`` = the record id), else ``task_prompts[task]``."""
        variants = self.task_variants.get(task)
        if variants:
            return random.Random(f"{self.seed}:{key}").choice(variants)
        return self.task_prompts.get(task)

    def question(self, task: str, radvlm_question: str, subject: str | None, key: str = "") -> str:
        """The question for ``task``: the model's own template when it has one (``{}`` filled with
        the region / label / sentence asked about), else RadVLM's question unchanged."""
        template = self.template(task, key)
        if template is None:
            return radvlm_question
        return template.format(subject or "") if "{}" in template else template

    def convert_answer(self, task: str, answer: str) -> str:
        """The answer in RadVLM's shape (identity for models that already answer that way)."""
        return answer


_CHEXAGENT_BOX = re.compile(r"<\|box\|>\s*\((\d+),\s*(\d+)\),\s*\((\d+),\s*(\d+)\)\s*<\|/box\|>")


@dataclass(frozen=True)
class CheXagentAdapter(PromptAdapter):
    def convert_answer(self, task: str, answer: str) -> str:
        """Grounding answers: CheXagent writes ``<|box|> (x1,y1),(x2,y2) <|/box|>`` on a 0–100
        grid; upstream turns each into ``[x1/100, y1/100, x2/100, y2/100]`` (2 decimals), joined by
        ", " — and an answer without a box into ""."""
        if task not in ("anatomical_grounding", "abnormality_grounding", "phrase_grounding", "detection"):
            return answer
        return ", ".join("[" + ", ".join(f"{int(v) / 100:.2f}" for v in match) + "]"
                         for match in _CHEXAGENT_BOX.findall(answer))


CHEXAGENT_ABNORMALITY_GROUNDING = (  # upstream evaluate_instructions.py, CheXagent's own templates
    "Detect {} in the given image.",
    "Locate areas in the chest X-ray where {} is present, using bounding box coordinates",
    "Localize {} in the bounding box format for the given image.",
    "Find the locations of {} in the bounding box format for the given image.",
    "Locate {} for the given image.",
    "Examine the chest X-ray and mark the regions affected by {} with bounding boxes",
    "Detect the following in the image: {}.",
    "Examine the image for regions affected by {}, and indicate their positions with bounding boxes.",
    "Perform detection for {}.",
    "Abnormality Grounding (VinDr-CXR): {}.",
)
CHEXAGENT_REGION_GROUNDING = (
    "Please locate the following anotomical region: {}",  # upstream's spelling
    "Identify the position of the following region in the CXR: {}",
)

CHEXAGENT_CLASSIFICATION = ("Identify any diseases visible in the given CXR. Options:\n "
                            + ", ".join(ABNORMALITY_LABELS))

ADAPTERS: dict[str, PromptAdapter] = {
    "radvlm": PromptAdapter("radvlm", "RadVLM (llava_onevision folder)", "a local llava_onevision folder"),
    "llava-onevision": PromptAdapter(
        "llava-onevision", "llava-hf/llava-onevision-qwen2-7b-si-hf",
        "a local llava_onevision folder; asked with RadVLM's prompts, as the paper did"),
    "chexagent": CheXagentAdapter(
        "chexagent", "StanfordAIMI/CheXagent-2-3b",
        "local weights with their remote code (trust_remote_code), transformers version of that code",
        task_prompts={
            "report": "Write an example findings section for the CXR",
            "classification": CHEXAGENT_CLASSIFICATION,
        },
        task_variants={
            "abnormality_grounding": CHEXAGENT_ABNORMALITY_GROUNDING,
            "anatomical_grounding": CHEXAGENT_REGION_GROUNDING,
            "phrase_grounding": CHEXAGENT_REGION_GROUNDING,
        }),
    "maira-2": PromptAdapter(
        "maira-2", "microsoft/maira-2",
        "local weights with their remote code (trust_remote_code); the processor builds its own prompts "
        "(findings generation, phrase grounding); no classification or conversation"),
    "llava-med": PromptAdapter(
        "llava-med", "microsoft/llava-med-v1.5-mistral-7b",
        "the LLaVA-Med repository's model classes (registered into transformers) and its mistral "
        "template: user turn '<image>\\n{question}'; asked with RadVLM's prompts"),
    "radialog": PromptAdapter(
        "radialog", "ChantalPellegrini/RaDialog-interactive-radiology-report-generation",
        "the RaDialog repository (LLAVA_Biovil), liuhaotian/llava-v1.5-7b base weights, vicuna_v1 "
        "template with '<image>. ' before the first question, BioViL transform (resize 512, crop 448)",
        task_prompts={"report": "Write a radiology report for this X-Ray."}),
}


class LlavaOnevisionAnswerer:
    """RadVLM or LLaVA-OneVision through ``inference.model``: the image is encoded once (prefix
    KV cache) and reused for every question about the same image."""

    def __init__(self, model: RadVLMModel, max_new_tokens: int | None = None):
        self.model = model
        self.model_id = f"{model.info.model_id} {model.info.version}"
        self.max_new_tokens = max_new_tokens
        self._cached: tuple[str, ImagePrefix] | None = None

    def answer(self, image_key: str, image: ModelImage, turns: Sequence[Turn], task: str = "",
               subject: str | None = None) -> str:
        if self._cached is None or self._cached[0] != image_key:
            self._cached = (image_key, self.model.encode_image(image))
        return self.model.answer(self._cached[1], turns, max_new_tokens=self.max_new_tokens).text


class CheXagentAnswerer:
    """CheXagent-2 via its remote code, as upstream ``inference_chexagent``: system turn "You are a
    helpful assistant.", the image then the question through ``tokenizer.from_list_format``,
    greedy, ``max_new_tokens`` (evaluation default 1,500) new tokens; single-turn (later turns are asked without history)."""

    def __init__(self, folder: Path, device: str = "cpu", max_new_tokens: int = 1500):
        import torch
        import transformers

        self.model_id = f"chexagent {folder.name}"
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True, local_files_only=True)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, trust_remote_code=True, local_files_only=True).to(device, torch.bfloat16 if device != "cpu"
                                                                      else torch.float32).eval()
        self.max_new_tokens = max_new_tokens

    def answer(self, image_key: str, image: ModelImage, turns: Sequence[Turn], task: str = "",
               subject: str | None = None) -> str:
        import tempfile

        import torch

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "image.png"
            image.to_pil_rgb().save(path)
            query = self.tokenizer.from_list_format([{"image": str(path)}, {"text": turns[-1].text}])
            conversation = [{"from": "system", "value": "You are a helpful assistant."}, {"from": "human", "value": query}]
            input_ids = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt")
            with torch.inference_mode():
                output = self.model.generate(input_ids.to(self.model.device), do_sample=False, num_beams=1,
                                             use_cache=True, max_new_tokens=self.max_new_tokens)[0]
        return self.tokenizer.decode(output[input_ids.size(1):-1])


class Maira2Answerer:
    """MAIRA-2 via its remote code, as upstream: findings generation from the frontal image alone
    (``format_and_preprocess_reporting_input``), phrase grounding of the asked subject
    (``format_and_preprocess_phrase_grounding_input``) with boxes mapped back to the original
    image and written ``[x1, y1, x2, y2]`` (2 decimals). The task is passed per call."""

    def __init__(self, folder: Path, device: str = "cpu", max_new_tokens: int = 1500):
        import transformers

        self.model_id = f"maira-2 {folder.name}"
        self.processor = transformers.AutoProcessor.from_pretrained(folder, trust_remote_code=True, local_files_only=True)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, trust_remote_code=True, local_files_only=True).to(device).eval()
        self.max_new_tokens = max_new_tokens

    def answer(self, image_key: str, image: ModelImage, turns: Sequence[Turn], task: str,
               subject: str | None) -> str:
        import torch

        pil = image.to_pil_rgb()
        if task == "report":
            inputs = self.processor.format_and_preprocess_reporting_input(
                current_frontal=pil, current_lateral=None, prior_frontal=None, indication=None, technique=None,
                comparison=None, prior_report=None, return_tensors="pt", get_grounding=False)
        elif task in ("anatomical_grounding", "abnormality_grounding", "phrase_grounding"):
            inputs = self.processor.format_and_preprocess_phrase_grounding_input(
                frontal_image=pil, phrase=subject or "", return_tensors="pt")
        else:
            raise BaselineUnavailableError(f"MAIRA-2 has no {task} mode")
        inputs = inputs.to(self.model.device)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, use_cache=True)
        decoded = self.processor.decode(output[0][inputs["input_ids"].shape[-1]:], skip_special_tokens=True).lstrip()
        converted = self.processor.convert_output_to_plaintext_or_grounded_sequence(decoded)
        if task == "report":
            return converted
        boxes = [self.processor.adjust_box_for_original_image_size(box, width=pil.width, height=pil.height)
                 for box in converted[0][1] if box is not None] if converted and converted[0][1] else []
        return ", ".join("[" + ", ".join(f"{v:.2f}" for v in box) + "]" for box in boxes)


def adapter(name: str) -> PromptAdapter:
    """The adapter called ``name`` (BaselineUnavailableError listing the known ones otherwise)."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise BaselineUnavailableError(f"unknown baseline {name!r}; known: {', '.join(ADAPTERS)}") from None


def check_runnable(name: str) -> None:
    """Raise BaselineUnavailableError, saying what is needed, for baselines this process cannot run."""
    if name in ("llava-med", "radialog"):
        raise BaselineUnavailableError(f"{name} cannot run in-process here: needs {ADAPTERS[name].needs}. "
                                       "Run it with its own code and score its predictions with --score "
                                       "(no output is produced in its place).")

"""Build the LlavaOnevision processor from a weights folder, with or without torchvision.

transformers 5's ``LlavaOnevisionProcessor`` insists on a video processor, which needs
torchvision; without it ``AutoProcessor`` silently returns only the tokenizer. We detect that
and build an image-only processor from the same files (the PIL image-processor backend), so
the model is always fed exactly what the weights' preprocessing config says — never text only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, BatchFeature, LlavaOnevisionProcessor
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from inference.errors import ProcessorLoadError

PROCESSOR_KWARGS = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio",
                    "image_token", "video_token", "single_tile")


class LlavaOnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor without the video processor (images only).

    ``ProcessorMixin`` derives its sub-processors from the ``__init__`` signature, so leaving
    ``video_processor`` out of it is what makes the base class accept its absence.

    ``single_tile`` (saved in ``processor_config.json``): each image becomes ONE square tile —
    padded to a square with the mean colour and resized to the tile size, ``num_image_tokens`` + 1
    (newline) image tokens — instead of the AnyRes base image plus grid tiles. With a one-tile grid
    (``image_grid_pinpoints=[[S, S]]``) the stock path would feed the same picture twice (base +
    one tile, 2× the image tokens). This is LLaVA-OneVision's own non-AnyRes path (the one it
    takes for images of multi-image samples); the stock model enters it for samples whose
    ``batch_num_images`` is not 1, so the processor returns ``batch_num_images = 2`` per image
    (read by the model only as "do not tile"). The small phantom demo model uses it.
    """

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                 video_token="<video>", vision_aspect_ratio="anyres_max_9", single_tile=False, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy,
                         chat_template=chat_template, image_token=image_token, video_token=video_token,
                         vision_aspect_ratio=vision_aspect_ratio, **kwargs)
        self.single_tile = bool(single_tile)

    def __call__(self, images=None, text=None, **kwargs):
        if not self.single_tile or images is None:
            return super().__call__(images=images, text=text, **kwargs)
        return self._single_tile_call(images, text, **kwargs)

    def _single_tile_call(self, images, text, return_tensors=None, **kwargs) -> BatchFeature:
        """One tile per image: pad to square, resize; one run of image tokens per ``<image>``."""
        flat = [image for group in images for image in group] if isinstance(images, (list, tuple)) and images \
            and isinstance(images[0], (list, tuple)) else (list(images) if isinstance(images, (list, tuple))
                                                           else [images])
        fill = tuple(int(round(255 * m)) for m in self.image_processor.image_mean)
        squares, sizes = [], []
        for image in flat:
            rgb = image.convert("RGB")
            sizes.append([rgb.height, rgb.width])
            side = max(rgb.size)
            square = Image.new("RGB", (side, side), fill)
            square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
            squares.append(square)
        tile = self.image_processor.size
        pinpoint = [[tile["height"], tile["width"]]]
        pixels = self.image_processor(images=squares, image_grid_pinpoints=pinpoint,
                                      return_tensors="pt")["pixel_values"][:, :1]  # base = the whole square
        data = {"pixel_values": pixels, "image_sizes": torch.tensor(sizes, dtype=torch.long),
                "batch_num_images": torch.full((len(flat),), 2, dtype=torch.long)}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            run = self.image_token * (self.num_image_tokens + 1)
            if sum(t.count(self.image_token) for t in texts) != len(flat):
                raise ValueError("single_tile: the text must hold one image token per image")
            texts = [t.replace(self.image_token, run) for t in texts]
            kwargs.pop("padding", None)
            data.update(self.tokenizer(texts, return_tensors="pt", padding=len(texts) > 1, **kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors if return_tensors != "pt" else None)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as exc:
        raise ProcessorLoadError(f"{path} is not valid JSON: {exc}") from exc


def _chat_template(folder: Path, processor_config: dict) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return _read_json(folder / "chat_template.json").get("chat_template")
    return processor_config.get("chat_template") or _read_json(folder / "tokenizer_config.json").get(
        "chat_template")


def build_image_only_processor(folder: Path) -> LlavaOnevisionImageOnlyProcessor:
    """Assemble the processor from the folder's files without torchvision."""
    processor_config = _read_json(folder / "processor_config.json")
    try:
        image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as exc:
        raise ProcessorLoadError(f"cannot build the image processor/tokenizer from {folder}: {exc}") from exc
    kwargs = {key: processor_config[key] for key in PROCESSOR_KWARGS if key in processor_config}
    if "num_image_tokens" not in kwargs:
        vision = _read_json(folder / "config.json").get("vision_config", {})
        image_size, patch_size = vision.get("image_size"), vision.get("patch_size")
        if not (image_size and patch_size):
            raise ProcessorLoadError(
                f"{folder}: processor_config.json lacks num_image_tokens and config.json lacks "
                "vision_config image_size/patch_size to derive it")
        kwargs["num_image_tokens"] = (image_size // patch_size) ** 2
    kwargs.setdefault("vision_feature_select_strategy",
                      _read_json(folder / "config.json").get("vision_feature_select_strategy", "full"))
    return LlavaOnevisionImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                            chat_template=_chat_template(folder, processor_config), **kwargs)


def load_processor(folder: Path) -> LlavaOnevisionProcessor:
    """The full processor shipped with the weights; raises ProcessorLoadError, never degrades silently."""
    folder = Path(folder)
    try:
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, TypeError, ImportError, AttributeError):
        processor = None
    if not (isinstance(processor, LlavaOnevisionProcessor) and getattr(processor, "image_processor", None)):
        # AutoProcessor returned only a tokenizer (no torchvision → no video processor) or failed.
        processor = build_image_only_processor(folder)
    if not processor.chat_template:
        raise ProcessorLoadError(f"{folder}: no chat template found; the model cannot be prompted as trained")
    if processor.image_token_id is None or processor.image_token_id == processor.tokenizer.unk_token_id:
        raise ProcessorLoadError(f"{folder}: the tokenizer has no {processor.image_token!r} token")
    return processor

"""The settings model. Every field has a safe embedded default; unknown keys are errors.

Sections are added by the package that owns them (the node's network settings, destinations,
the SR writer's options) but all live here so that one file configures one installation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_DATA_DIR = Path("./radvlm-data")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Section):
    path: Path = Field(default=DEFAULT_DATA_DIR / "models" / "default",
                       description="local Hugging Face llava_onevision folder (RadVLM release format)")
    model_id: str | None = Field(default=None, description="name reported in results; default: folder name")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="auto = bfloat16 on GPU, float32 on CPU")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    system_prompt: str | None = Field(
        default=None, description="upstream evaluated without a system prompt (docs/model.md)")
    max_new_tokens: int = Field(default=300, ge=1, le=4096)


class InferenceSettings(_Section):
    tasks: list[Literal["report", "classification", "grounding"]] = ["report", "classification", "grounding"]
    prefix_reuse: bool = Field(default=True, description="prefill the image once per study, reuse its KV cache")
    phrase_grounding: bool = Field(default=True, description="ground each finding sentence of the report")
    max_grounding_questions: int = Field(default=16, ge=0, le=64)
    allow_colour: bool = Field(default=False, description="accept RGB DICOM (e.g. secondary capture)")


class Settings(_Section):
    model: ModelSettings = ModelSettings()
    inference: InferenceSettings = InferenceSettings()

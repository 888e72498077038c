"""The typed `radvlm train` job file (TOML, loaded with ``config.load_typed_config``).

Defaults follow the upstream RadVLM recipe (design §5): lr 1e-5 for projector + LLM, 2e-6 for
the vision tower, nothing frozen, cosine schedule with 3 % warmup, bf16 on GPU, gradient
checkpointing, loss on assistant tokens only, one epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PhantomDataSettings(_Strict):
    """Fresh synthetic phantoms every sample (training/finetune/phantom_data.py), instead of files."""

    seed: int = 0                       # PhantomSampler seed; held-out sets use another seed
    start: int = 0                      # first phantom index
    samples: int = Field(ge=1)          # dataset length: optimiser steps × batch for one epoch
    size: int = Field(default=128, ge=64)  # longest side of a phantom in pixels
    canonical_fraction: float = Field(default=0.5, ge=0, le=1)  # else random phrasing variants
    task_weights: dict[str, float] = Field(default_factory=lambda: {
        "report": 0.2, "classification": 0.15, "abnormality_grounding": 0.1, "label_grounding": 0.1,
        "anatomical_grounding": 0.15, "phrase_grounding": 0.15, "conversation": 0.1, "detection": 0.05})
    regions: list[str] | None = None   # anatomical regions to teach (default: all the phantom has)
    # Finding mix of the drawn phantoms (training/phantoms/sampler.py PhantomConfig): None keeps the
    # generator's defaults, which the held-out sets always use; a job may draw rare families more often.
    rates: dict[str, float] | None = None
    normal_fraction: float | None = Field(default=None, ge=0, le=1)

    def phantom_config(self) -> "PhantomConfig":
        """The generator configuration this source draws with."""
        from training.phantoms.sampler import DEFAULT_RATES, PhantomConfig

        extra: dict = {}
        if self.rates is not None:
            extra["rates"] = {**DEFAULT_RATES, **self.rates}
        if self.normal_fraction is not None:
            extra["normal_fraction"] = self.normal_fraction
        return PhantomConfig(size=self.size, **extra)


class DataSettings(_Strict):
    """LLaVA-style JSON/JSONL files written by `radvlm build-dataset` (records: id, image, conversations),
    or a phantom source (``[data.phantoms]``) that draws a fresh synthetic image per sample."""

    train_files: list[Path] = Field(default_factory=list)
    image_root: Path | None = None
    phantoms: PhantomDataSettings | None = None
    manifest: Path | None = None  # the dataset builder's manifest.json; copied into the model card
    max_length: int = Field(default=8192, ge=16)  # longer samples are dropped, with a count in the log
    system_prompt: str | None = None  # None = no system turn, like inference's default

    @model_validator(mode="after")
    def _one_source(self) -> "DataSettings":
        if self.phantoms is None and not self.train_files:
            raise ValueError("give train_files (with image_root) or a [data.phantoms] source")
        if self.phantoms is not None and self.train_files:
            raise ValueError("give either train_files or [data.phantoms], not both")
        if self.train_files and self.image_root is None:
            raise ValueError("image_root is required with train_files")
        return self


class LoraSettings(_Strict):
    """Parameter-efficient fine-tuning (peft) for single-GPU teams; merged into the weights on save."""

    enabled: bool = False
    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    train_projector: bool = True  # the multi-modal projector stays fully trainable


class OptimSettings(_Strict):
    learning_rate: float = Field(default=1e-5, gt=0)  # projector + language model
    vision_learning_rate: float = Field(default=2e-6, ge=0)  # vision tower; 0 freezes it
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "cosine_with_min_lr", "linear", "constant_with_warmup"] = "cosine"
    min_lr_ratio: float = Field(default=0.0, ge=0, lt=1)  # cosine_with_min_lr: floor as a fraction of the peak
    max_grad_norm: float = Field(default=1.0, gt=0)


class TrainConfig(_Strict):
    """One fine-tuning job."""

    model_path: Path  # the base llava_onevision folder (e.g. the RadVLM release, or a tiny model)
    output_dir: Path  # the fine-tuned llava_onevision folder that `radvlm infer` loads
    checkpoint_dir: Path | None = None  # default: <output_dir>-checkpoints
    data: DataSettings
    optim: OptimSettings = Field(default_factory=OptimSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    deepspeed: Path | None = None  # a DeepSpeed JSON, e.g. config/deepspeed_zero3.json; None = plain run
    num_train_epochs: float = Field(default=1.0, gt=0)
    max_steps: int = -1  # > 0 overrides epochs
    per_device_batch_size: int = Field(default=1, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on a bf16-capable GPU, fp32 on CPU
    gradient_checkpointing: bool = True
    group_by_length: bool = True
    seed: int = 42
    logging_steps: int = Field(default=10, ge=1)
    save_steps: int = Field(default=500, ge=1)
    save_total_limit: int | None = Field(default=2, ge=1)
    resume_from_checkpoint: Literal["auto", "never"] | Path = "auto"  # auto: the last one in checkpoint_dir
    dataloader_num_workers: int = Field(default=0, ge=0)
    model_version: str | None = None  # written as config.radvlm_version; None: inference uses the weights hash
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    use_cpu: bool = False  # force CPU even when a GPU is visible

    @property
    def resolved_checkpoint_dir(self) -> Path:
        return self.checkpoint_dir or self.output_dir.with_name(self.output_dir.name + "-checkpoints")

"""The typed `radvlm train` job file (TOML, loaded with ``config.load_typed_config``).

Defaults follow the upstream RadVLM recipe (design §5): lr 1e-5 for projector + LLM, 2e-6 for
the vision tower, nothing frozen, cosine schedule with 3 % warmup, bf16 on GPU, gradient
checkpointing, loss on assistant tokens only, one epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSettings(_Strict):
    """LLaVA-style JSON/JSONL files written by `radvlm build-dataset` (records: id, image, conversations)."""

    train_files: list[Path] = Field(min_length=1)
    image_root: Path
    manifest: Path | None = None  # the dataset builder's manifest.json; copied into the model card
    max_length: int = Field(default=8192, ge=16)  # longer samples are dropped, with a count in the log
    system_prompt: str | None = None  # None = no system turn, like inference's default


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
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
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

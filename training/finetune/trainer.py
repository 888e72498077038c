"""Fine-tune a llava_onevision folder on LLaVA-style records with transformers' Trainer.

One function, :func:`run_training`, serves `radvlm train` (one process: CPU or one GPU, with or
without DeepSpeed) and launcher runs (``torchrun``/``deepspeed`` over ``python -m
training.finetune``), where every rank calls it and rank 0 writes the final folder.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import (LlavaOnevisionForConditionalGeneration, Trainer, TrainerCallback, TrainingArguments,
                          set_seed)
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import get_last_checkpoint

from inference.model_folder import check_model_folder
from inference.processor import load_processor
from training.finetune.config import TrainConfig
from training.finetune.data import Collator, ConversationDataset, load_records
from training.finetune.export import export_model_folder
from training.finetune.phantom_data import PhantomInstructionDataset

log = logging.getLogger(__name__)


class TrainingSetupError(ValueError):
    """The job cannot start: inconsistent settings or a missing piece."""


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, logged training loss)
    resumed_from: Path | None = None


def is_vision_parameter(name: str) -> bool:
    """Whether a (possibly peft-prefixed) parameter name belongs to the SigLIP vision tower."""
    return ".vision_tower." in f".{name}"


class _LossHistory(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))


class RadVLMTrainer(Trainer):
    """Trainer with separate learning rates for the vision tower and the rest, and grouping by
    precomputed length proxies (no pass over the images to measure them)."""

    def __init__(self, *args, vision_learning_rate: float, lengths: list[int] | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.vision_learning_rate = vision_learning_rate
        self.sample_lengths = lengths

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, parameter in opt_model.named_parameters():
            if parameter.requires_grad:
                groups.setdefault((is_vision_parameter(name), name in decay), []).append(parameter)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        param_groups = [
            {"params": params,
             "lr": self.vision_learning_rate if vision else self.args.learning_rate,
             "weight_decay": self.args.weight_decay if decays else 0.0}
            for (vision, decays), params in sorted(groups.items())]
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        if self.sample_lengths is None:
            return super()._get_train_sampler(train_dataset)
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=self.sample_lengths)


def _use_bf16(cfg: TrainConfig) -> bool:
    if cfg.precision == "bf16":
        return True
    if cfg.precision == "fp32" or cfg.use_cpu:
        return False
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _deepspeed_stage(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        ds_config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise TrainingSetupError(f"cannot read DeepSpeed config {path}: {exc}") from exc
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def training_arguments(cfg: TrainConfig) -> TrainingArguments:
    """TrainingArguments for the job. Built before the model: with ZeRO-3 this is what makes
    ``from_pretrained`` partition the weights as they load."""
    on_cpu = cfg.use_cpu or not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(cfg.resolved_checkpoint_dir),
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.optim.learning_rate,
        weight_decay=cfg.optim.weight_decay,
        warmup_steps=cfg.optim.warmup_ratio,  # a float < 1 is a ratio of the total steps
        lr_scheduler_type=cfg.optim.lr_scheduler,
        lr_scheduler_kwargs=({"min_lr_rate": cfg.optim.min_lr_ratio}
                             if cfg.optim.lr_scheduler == "cosine_with_min_lr" else None),
        max_grad_norm=cfg.optim.max_grad_norm,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        bf16=_use_bf16(cfg),
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=cfg.dataloader_num_workers,
        dataloader_pin_memory=not on_cpu,
        remove_unused_columns=False,
        report_to="none",
        deepspeed=str(cfg.deepspeed) if cfg.deepspeed else None,
        use_cpu=cfg.use_cpu,
        # launched ranks on CPU talk over gloo; a lone process needs no backend
        ddp_backend="gloo" if on_cpu and "WORLD_SIZE" in os.environ else None,
        # a progress bar with ETA on a terminal; logs and pipes keep the plain loss lines
        disable_tqdm=not sys.stderr.isatty(),
    )


def _apply_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    names = "|".join(cfg.lora.target_modules)
    lora_config = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=rf".*language_model.*\.({names})",  # never the SigLIP attention of the same names
        modules_to_save=["multi_modal_projector"] if cfg.lora.train_projector else None)
    return get_peft_model(model, lora_config)


def _resume_point(cfg: TrainConfig) -> Path | None:
    if cfg.resume_from_checkpoint == "never":
        return None
    if cfg.resume_from_checkpoint == "auto":
        folder = cfg.resolved_checkpoint_dir
        last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
        return Path(last) if last else None
    if not Path(cfg.resume_from_checkpoint).is_dir():
        raise TrainingSetupError(f"resume_from_checkpoint {cfg.resume_from_checkpoint} is not a folder")
    return Path(cfg.resume_from_checkpoint)


def build_trainer(cfg: TrainConfig) -> tuple[RadVLMTrainer, int]:
    """The configured Trainer (model loaded, LoRA applied, data checked) and the record count."""
    stage = _deepspeed_stage(cfg.deepspeed)
    if cfg.lora.enabled and stage == 3:
        raise TrainingSetupError("lora with ZeRO-3 is not supported: use ZeRO-2 or a plain run for LoRA")
    check_model_folder(cfg.model_path)
    set_seed(cfg.seed)
    args = training_arguments(cfg)
    processor = load_processor(cfg.model_path)
    dataset = _dataset(cfg, processor)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        cfg.model_path, dtype=torch.bfloat16 if args.bf16 else torch.float32,
        attn_implementation=cfg.attn_implementation)
    if cfg.optim.vision_learning_rate == 0:
        for name, parameter in model.named_parameters():
            if is_vision_parameter(name):
                parameter.requires_grad_(False)
    if cfg.lora.enabled:
        model = _apply_lora(model, cfg)
    pad_id = processor.tokenizer.pad_token_id
    trainer = RadVLMTrainer(
        model=model, args=args, train_dataset=dataset,
        data_collator=Collator(pad_token_id=pad_id if pad_id is not None else processor.tokenizer.eos_token_id),
        callbacks=[_LossHistory()], vision_learning_rate=cfg.optim.vision_learning_rate,
        lengths=dataset.lengths if cfg.group_by_length else None)
    return trainer, len(dataset)


def _dataset(cfg: TrainConfig, processor) -> ConversationDataset | PhantomInstructionDataset:
    """Records from the training files, or a fresh-phantom source."""
    data = cfg.data
    if data.phantoms is not None:
        source = data.phantoms
        return PhantomInstructionDataset(
            processor, seed=source.seed, start=source.start, length=source.samples,
            config=source.phantom_config(), task_weights=source.task_weights,
            canonical_fraction=source.canonical_fraction,
            regions=tuple(source.regions) if source.regions else None,
            system_prompt=data.system_prompt, max_length=data.max_length)
    return ConversationDataset(load_records(data.train_files), processor, data.image_root,
                               system_prompt=data.system_prompt, max_length=data.max_length)


def run_training(cfg: TrainConfig, *, config_text: str | None = None) -> TrainResult:
    """Train and export; returns the loss history and the output folder (written by rank 0)."""
    trainer, records = build_trainer(cfg)
    history = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, _LossHistory))
    resume = _resume_point(cfg)
    if resume:
        log.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    export_model_folder(trainer, cfg, records=records, losses=history.losses,
                        resumed_from=resume, config_text=config_text)
    return TrainResult(output_dir=cfg.output_dir, global_step=trainer.state.global_step,
                       losses=history.losses, resumed_from=resume)

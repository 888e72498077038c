"""Fine-tuning RadVLM (llava_onevision) on LLaVA-style instruction records: `radvlm train`."""

from training.finetune.config import TrainConfig
from training.finetune.trainer import TrainResult, TrainingSetupError, build_trainer, run_training

__all__ = ["TrainConfig", "TrainResult", "TrainingSetupError", "build_trainer", "run_training"]

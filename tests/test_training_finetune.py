"""Plain (non-DeepSpeed) fine-tuning on the tiny model: loss, export, inference, resume, LoRA."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from dicom_node.cli import main as radvlm
from tests.training_data import write_dataset, write_job
from training.finetune import build_trainer, run_training
from training.finetune.trainer import is_vision_parameter
from training.train_cli import load_train_config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


def weights_changed(base, out) -> set[str]:
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    return {name for name in before if not (before[name] == after[name]).all()}


def test_optimizer_has_separate_vision_learning_rate(tmp_path, tiny_model_dir, dataset):
    job = write_job(tmp_path / "job.toml", model=tiny_model_dir, out=tmp_path / "out", data=dataset)
    trainer, records = build_trainer(load_train_config(job))
    optimizer = trainer.create_optimizer()
    by_lr: dict[float, set[bool]] = {}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for group in optimizer.param_groups:
        by_lr.setdefault(group["lr"], set()).update(is_vision_parameter(names[id(p)]) for p in group["params"])
    assert by_lr == {4e-4: {True}, 2e-3: {False}}
    assert records == 8
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(trainer.model.parameters()))


def test_plain_run_lowers_loss_exports_and_resumes(tmp_path, tiny_model_dir, dataset, rg1_uncr):
    out = tmp_path / "finetuned"
    job = write_job(tmp_path / "job.toml", model=tiny_model_dir, out=out, data=dataset)
    result = run_training(load_train_config(job))
    losses = [loss for _, loss in result.losses]
    assert [step for step, _ in result.losses] == [1, 2, 3, 4, 5, 6]
    assert losses[-1] < losses[0] - 0.3, losses
    # A complete llava_onevision folder that inference loads unchanged.
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
                 "chat_template.jinja", "README.md"):
        assert (out / name).is_file(), name
    assert "radvlm_version" not in json.loads((out / "config.json").read_text())
    changed = weights_changed(tiny_model_dir, out)
    assert any(is_vision_parameter(n) for n in changed) and any("language_model" in n for n in changed)
    card = (out / "README.md").read_text()
    assert '"report_generation": 8' in card and "seed | 7" in card and "code revision (git)" in card
    assert f"| 6 | {losses[-1]:.4f} |" in card
    # The loss plot next to the card, linked from it.
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](loss.png)" in card
    assert radvlm(["infer", str(rg1_uncr), "--model", str(out), "--tasks", "report,classification"]) == 0
    # Resume: more steps continue from the last checkpoint.
    job = write_job(tmp_path / "job.toml", model=tiny_model_dir, out=out, data=dataset, max_steps=8)
    resumed = run_training(load_train_config(job))
    assert resumed.resumed_from is not None and resumed.resumed_from.name == "checkpoint-6"
    assert resumed.global_step == 8 and [step for step, _ in resumed.losses] == [7, 8]


def test_lora_run_through_the_cli_merges_into_a_plain_folder(tmp_path, tiny_model_dir, dataset, rg1_uncr, capsys):
    out = tmp_path / "lora"
    job = write_job(tmp_path / "job.toml", model=tiny_model_dir, out=out, data=dataset, max_steps=3,
                    extra="[lora]\nenabled = true\nr = 4\nalpha = 8\n")
    assert radvlm(["train", "--config", str(job)]) == 0
    assert "model written to" in capsys.readouterr().out
    changed = weights_changed(tiny_model_dir, out)
    assert changed and not any(is_vision_parameter(n) for n in changed)  # the vision tower stays frozen
    assert any("multi_modal_projector" in n for n in changed)
    assert not (out / "adapter_config.json").exists()
    assert radvlm(["infer", str(rg1_uncr), "--model", str(out), "--tasks", "report"]) == 0


def test_bad_job_file_is_refused(tmp_path, tiny_model_dir, dataset, capsys):
    job = write_job(tmp_path / "job.toml", model=tiny_model_dir, out=tmp_path / "o", data=dataset,
                    extra="learning_rate = 1e-5")  # belongs under [optim]
    assert radvlm(["train", "--config", str(job)]) == 2
    assert "learning_rate: unknown key" in capsys.readouterr().out

"""A training data source that draws a fresh synthetic phantom for every sample (design §10).

Sample ``i`` is phantom ``i`` of ``PhantomSampler(seed)`` with ONE instruction record built from
it by ``training.phantoms.records`` (the same phrasings and answer builders as inference), so a
run of N optimiser steps × batch B sees N·B different images and never repeats one. The task of
each sample, its phrasing (canonical or a random variant) and which of the phantom's records is
used are drawn from a stream seeded by (seed, i): the data are a pure function of the job file.

One task is added beside the phantom records: ``label_grounding`` asks "Where is the {label}
located …" with the CheXpert-style LABEL (e.g. "lung lesion", "support devices"), which is what
the node's task plan asks for each positive label; the answer holds every box of that label.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from inference import prompts
from training.finetune.data import _check_record, encode_sample, to_messages
from training.phantoms.records import TASKS as RECORD_TASKS
from training.phantoms.records import checked_regions, instruction_records, with_regions
from training.phantoms.sampler import Phantom, PhantomConfig, PhantomSampler

LABEL_GROUNDING = "label_grounding"
PHANTOM_TASKS = (*RECORD_TASKS, LABEL_GROUNDING)


def label_grounding_record(phantom: Phantom, image: str, rng: np.random.Generator,
                           canonical: bool) -> dict | None:
    """'Where is the {label} …' for one positive, boxed label of the phantom (None when none)."""
    by_label: dict[str, list] = {}
    for truth in phantom.truths:
        if truth.boxes:
            by_label.setdefault(truth.label, []).extend(truth.boxes)
    if not by_label:
        return None
    label = sorted(by_label)[int(rng.integers(len(by_label)))]
    q_variant = 0 if canonical else int(rng.integers(len(prompts.GROUNDING_PROMPT_VARIANTS)))
    a_variant = 0 if canonical else int(rng.integers(len(prompts.GROUNDING_ANSWER_VARIANTS)))
    return {"id": f"phantom-s{phantom.seed}-{phantom.index:06d}-label", "image": image,
            "conversations": [
                {"from": "human", "value": "<image>\n" + prompts.abnormality_grounding_prompt(label, q_variant)},
                {"from": "gpt", "value": prompts.grounding_answer(label, by_label[label], a_variant)}]}


class PhantomInstructionDataset(Dataset):
    """``length`` fresh phantoms, one instruction record each, encoded like ConversationDataset."""

    def __init__(self, processor, *, seed: int, length: int, config: PhantomConfig,
                 task_weights: Mapping[str, float], canonical_fraction: float = 0.5,
                 regions: tuple[str, ...] | None = None, system_prompt: str | None = None,
                 max_length: int = 8192, start: int = 0):
        unknown = set(task_weights) - set(PHANTOM_TASKS)
        if unknown:
            raise ValueError(f"unknown phantom tasks {sorted(unknown)}; expected some of {list(PHANTOM_TASKS)}")
        weights = np.array([max(0.0, float(task_weights.get(t, 0.0))) for t in PHANTOM_TASKS])
        if weights.sum() <= 0:
            raise ValueError("phantom task weights must have a positive sum")
        self.processor = processor
        self.sampler = PhantomSampler(seed, config)
        self.seed, self.length, self.start = seed, length, start
        self.probabilities = weights / weights.sum()
        self.canonical_fraction = canonical_fraction
        self.regions = checked_regions(regions) or None
        self.system_prompt = system_prompt
        self.max_length = max_length

    def __len__(self) -> int:
        return self.length

    @property
    def lengths(self) -> None:
        """No length grouping: every sample is drawn fresh."""
        return None

    def record(self, index: int) -> tuple[dict, Phantom]:
        """The instruction record (LLaVA layout) of sample ``index`` and its phantom."""
        phantom = self.sampler.sample(self.start + index)
        phantom = with_regions(phantom, self.regions)
        rng = np.random.default_rng([self.seed, self.start + index, 17])
        canonical = bool(rng.random() < self.canonical_fraction)
        image = f"phantom-s{self.seed}-{self.start + index:06d}.png"
        active = np.flatnonzero(self.probabilities > 0)
        order = active[rng.choice(len(active), size=len(active), replace=False, p=self.probabilities[active])]
        for task_index in order:  # first task in weighted order that has a record for this phantom
            task = PHANTOM_TASKS[task_index]
            if task == LABEL_GROUNDING:
                record = label_grounding_record(phantom, image, rng, canonical)
                if record is not None:
                    return record, phantom
                continue
            records = instruction_records(phantom, image, "canonical" if canonical else "random", tasks=(task,))
            if records:
                return records[int(rng.integers(len(records)))], phantom
        raise ValueError(f"phantom {self.start + index} yields no record for the configured tasks")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        raw, phantom = self.record(index)
        record = _check_record(raw, f"phantom[{self.start + index}]")
        image = Image.fromarray(phantom.pixels).convert("RGB")
        return encode_sample(self.processor, to_messages(record, self.system_prompt), image,
                             max_length=self.max_length)

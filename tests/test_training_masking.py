"""Assistant-only labels, checked token by token on a multi-turn sample, and record parsing."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from inference.processor import load_processor
from tests.training_data import ANSWER_2, REPORT, write_dataset
from training.finetune.data import (IGNORE_INDEX, Collator, ConversationDataset, DatasetFormatError, Record,
                                    build_training_text, encode_sample, load_records, to_messages)

QUESTION_1 = "Provide a radiology report for this Chest X-Ray."
QUESTION_2 = "Is there a pleural effusion?"


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir)


def sample_record() -> Record:
    return Record(id="r", image="x.png", source="test", conversations=(
        ("user", QUESTION_1), ("assistant", REPORT), ("user", QUESTION_2), ("assistant", ANSWER_2)))


def test_labels_cover_exactly_the_answers_of_every_turn(processor):
    messages = to_messages(sample_record())
    image = Image.new("RGB", (48, 70), 128)
    sample = encode_sample(processor, messages, image, max_length=4096)
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    tokenizer = processor.tokenizer
    image_id = processor.image_token_id
    # Token by token: a label is either IGNORE or the token itself; image tokens never carry loss.
    for position, (token, label) in enumerate(zip(ids, labels)):
        assert label in (IGNORE_INDEX, token), position
        if token == image_id:
            assert label == IGNORE_INDEX
    # The labelled tokens form exactly two runs: each answer followed by its end-of-turn token.
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert [tokenizer.decode(run) for run in runs] == [REPORT + "<|im_end|>", ANSWER_2 + "<|im_end|>"]
    # Each answer starts right after the prompt inference would send for that history.
    first_answer = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    inference_prompt = processor.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    expected = processor(images=[image], text=[inference_prompt], return_tensors="pt")["input_ids"][0].tolist()
    assert ids[:first_answer] == expected
    second_answer = first_answer + len(runs[0]) + next(
        i for i, label in enumerate(labels[first_answer + len(runs[0]):]) if label != IGNORE_INDEX)
    second_prompt_tail = tokenizer.decode(ids[first_answer + len(runs[0]):second_answer])
    assert second_prompt_tail == f"\n<|im_start|>user \n{QUESTION_2}<|im_end|>\n<|im_start|>assistant\n"
    # Everything after the last end-of-turn is unlabelled.
    assert all(label == IGNORE_INDEX for label in labels[second_answer + len(runs[1]):])
    assert sum(token == image_id for token in ids) == sum(
        1 for token in processor(images=[image], text=[inference_prompt])["input_ids"][0] if token == image_id)


def test_training_text_follows_the_generation_prompt(processor):
    text, spans = build_training_text(processor, to_messages(sample_record()))
    assert [text[a:b] for a, b in spans] == [REPORT + "<|im_end|>", ANSWER_2 + "<|im_end|>"]
    assert "<|im_start|>assistant\n" + REPORT in text
    assert "<|im_start|>assistant \n" not in text  # the template's finished-turn header is not trained on


def test_system_prompt_turn_is_never_labelled(processor):
    text, spans = build_training_text(processor, to_messages(sample_record(), "You are a helpful assistant."))
    assert text.startswith("<|im_start|>system")
    assert all("helpful" not in text[a:b] for a, b in spans)


def test_dataset_and_collator_pad_text_and_tiles(tmp_path, processor):
    data = write_dataset(tmp_path, count=3)
    dataset = ConversationDataset(load_records([data]), processor, tmp_path)
    samples = [dataset[0], dataset[2]]
    assert samples[0]["pixel_values"].shape[0] != samples[1]["pixel_values"].shape[0]  # AnyRes tiles differ
    batch = Collator(pad_token_id=processor.tokenizer.pad_token_id)(samples)
    longest = max(len(s["input_ids"]) for s in samples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, longest)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        assert batch["attention_mask"][row].sum() == n
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert torch.equal(batch["pixel_values"][row, : sample["pixel_values"].shape[0]], sample["pixel_values"])
    assert batch["image_sizes"].tolist() == [[64, 48], [80, 48]]
    assert dataset.lengths == [27, 27, 27]  # words over all turns


@pytest.mark.parametrize("record, message", [
    ({"id": "a", "image": "x.png"}, "no 'conversations'"),
    ({"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nQ"}]}, "pairs"),
    ({"id": "a", "image": "x.png", "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]},
     "turn 0"),
    ({"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "Q"},
                                                     {"from": "gpt", "value": "<image> A"}]}, "outside the first"),
])
def test_bad_records_name_the_file_and_line(tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "ok", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DatasetFormatError, match=rf"bad.jsonl:2: .*{message}"):
        load_records([path])


def test_json_list_files_are_read_too(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"id": 1, "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}]))
    (record,) = load_records([path])
    assert record.conversations == (("user", "Q"), ("assistant", "A")) and record.id == "1"


def test_missing_image_is_reported(tmp_path, processor):
    data = write_dataset(tmp_path, count=2)
    (tmp_path / "images" / "img1.png").unlink()
    with pytest.raises(DatasetFormatError, match="1 image\\(s\\) missing .* images/img1.png"):
        ConversationDataset(load_records([data]), processor, tmp_path)

"""Batched generation: one generate call for several questions gives the answers alone (greedy, fp32),
in the runner, the local backend's grounding questions and `radvlm worker` under concurrent requests."""

from __future__ import annotations

import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import torch

from config.settings import InferenceSettings, ModelSettings, Settings
from dicom_node.commands import run_worker
from inference.backend import LocalBackend
from inference.model import Turn
from tests.conftest_node import free_port, wait_for
from tests.model_images import gradient_image
from tests.test_api_chat import TOKEN, first_turn, png_data_url

QUESTIONS = ("Provide a radiology report for this Chest X-Ray.",
             "Are there any abnormalities on this Chest X-ray?",
             "Where is the cardiomegaly located in this Chest X-ray?",
             "Please locate the following sentence: Small left pleural effusion.")


def _same(alone, batched) -> None:
    assert batched.text == alone.text
    assert batched.new_tokens == alone.new_tokens
    assert len(batched.step_logits) == len(alone.step_logits)
    for mine, theirs in zip(batched.step_logits, alone.step_logits):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


def test_batched_answers_equal_answers_alone_across_images_and_lengths(tiny_model):
    # three image sizes (prefixes of different lengths), questions of different lengths and limits
    prefixes = [tiny_model.encode_image(gradient_image(rows, columns, seed))
                for seed, (rows, columns) in enumerate([(150, 120), (90, 200), (60, 60), (150, 120)])]
    assert len({len(p.prefix_ids) for p in prefixes}) == 3
    questions = [tiny_model.prepare(prefix, [Turn("user", text)], max_new_tokens=limit)
                 for prefix, text, limit in zip(prefixes, QUESTIONS, (24, 9, 17, 24))]
    alone = [tiny_model.answer_batch([q], return_logits=True)[0] for q in questions]
    batched = tiny_model.answer_batch(questions, return_logits=True)
    assert [g.batch_size for g in batched] == [4] * 4
    for one, many in zip(alone, batched):
        _same(one, many)
    assert [g.new_tokens for g in batched][:3] == [24, 9, 17]


def test_one_prefix_expanded_to_the_batch_and_left_intact(tiny_model):
    prefix = tiny_model.encode_image(gradient_image(150, 120, 3))
    keys_before = [layer.keys.clone() for layer in prefix.cache.layers]
    turns = [[Turn("user", q)] for q in QUESTIONS]
    alone = [tiny_model.answer(prefix, t, return_logits=True) for t in turns]
    batched = tiny_model.answer_batch([tiny_model.prepare(prefix, t) for t in turns], return_logits=True)
    for one, many in zip(alone, batched):
        _same(one, many)
    for before, layer in zip(keys_before, prefix.cache.layers):
        assert torch.equal(before, layer.keys)  # the study's prefix serves later questions unchanged


def test_local_backend_grounding_batches_equal_one_by_one(tiny_model):
    image = gradient_image(150, 120, 4)
    answers = {}
    for max_batch in (1, 3):
        with LocalBackend(tiny_model).open_study(image, InferenceSettings(max_batch=max_batch)) as study:
            answers[max_batch] = study.ask_all(QUESTIONS)
    assert [a.text for a in answers[3]] == [a.text for a in answers[1]]
    assert [a.new_tokens for a in answers[3]] == [a.new_tokens for a in answers[1]]


def test_worker_batches_concurrent_requests_with_the_answers_alone(tiny_model_dir):
    settings = Settings.model_validate({
        "model": {"path": str(tiny_model_dir), "max_new_tokens": 12}, "api": {"token": TOKEN},
        "inference": {"max_batch": 4, "max_batch_wait_ms": 800}})
    stop, out = threading.Event(), io.StringIO()
    thread = threading.Thread(target=run_worker, args=(settings, "127.0.0.1", free_port(), out, stop), daemon=True)
    thread.start()
    try:
        wait_for(lambda: "ready" in out.getvalue(), 60, what="worker ready")
        ready = json.loads(out.getvalue().splitlines()[0])
        client = openai.OpenAI(base_url=ready["url"] + "/v1", api_key=TOKEN, max_retries=0, timeout=60)
        requests = [(png_data_url(40 + 8 * i, 48, seed=i), QUESTIONS[i]) for i in range(4)]

        def ask(request):
            url, text = request
            completion = client.chat.completions.create(model=ready["model"], messages=[first_turn(url, text)])
            return completion.choices[0].message.content, completion.model_extra["radvlm"]["batch_size"]

        alone = [ask(request) for request in requests]  # one at a time: each waits, then runs alone
        assert [size for _, size in alone] == [1, 1, 1, 1]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(ask, requests))
        assert max(size for _, size in together) > 1, together
        assert [text for text, _ in together] == [text for text, _ in alone]
    finally:
        stop.set()
        thread.join(20)
    assert not thread.is_alive()

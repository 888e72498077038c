"""Batching and worker benchmark (CPU): studies/hour and questions/s of one fixed per-study plan,
every figure beside a baseline measured in the same run, answers compared in every mode.

    .venv/bin/python benchmarks/bench_workers.py [--studies 8] [--max-new-tokens 16] [--batches 1,2,4,8]

The model is a tiny random LlavaOnevision with the REAL token geometry (384-px tiles, patch 14 →
729 tokens per tile, AnyRes up to 6×6, anyres_max_9), so a 1955×1841 chest CR (pydicom-data's
RG1, shifted per study so every study is a different image) gives RadVLM's ~7k-token image prefix;
the text model is tiny, so decode is cheap and the figures measure scheduling, prefill and serving
overhead, not a 7B model (benchmarks/gpu/bench_7b.py does that on a GPU).

Plan per study (fixed, as the node asks it): report, classification, then 5 grounding questions
asked together (``StudySession.ask_all``); each answer is capped at --max-new-tokens.

1. in-process (LocalBackend, image prefix reused): grounding one by one (max_batch 1, the
   baseline) vs batched (max_batch 8: one generate call over the prefix expanded to the batch);
2. `radvlm worker`'s app on loopback (ChatService + uvicorn), --clients concurrent studies, each
   question one OpenAI request carrying the PNG: questions/s at [inference] max_batch 1/2/4/8,
   ratio to max_batch 1;
3. HTTP overhead per question: the same follow-up questions over HTTP (one client, max_batch 1)
   minus in-process;
4. with the remote backend (inference.remote, when present): the node's plan in-process vs through
   1 and 2 `radvlm worker` processes.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from config.settings import ApiSettings, InferenceSettings, ModelSettings  # noqa: E402
from inference import prompts  # noqa: E402
from inference.api import create_app  # noqa: E402
from inference.backend import LocalBackend  # noqa: E402
from inference.chat_service import ChatService  # noqa: E402
from inference.image import ModelImage, load_image  # noqa: E402
from inference.model import RadVLMModel, load_model  # noqa: E402
from inference.serving import ThreadedServer  # noqa: E402
from inference.tiny import build_tiny_model  # noqa: E402

TOKEN = "bench-token"
FIRST = [prompts.REPORT_PROMPT, prompts.CLASSIFICATION_PROMPT]
GROUNDING = [prompts.abnormality_grounding_prompt("cardiomegaly"),
             prompts.abnormality_grounding_prompt("pleural effusion"),
             prompts.abnormality_grounding_prompt("lung opacity"),
             prompts.phrase_grounding_prompt("Small left pleural effusion."),
             prompts.phrase_grounding_prompt("The heart is enlarged.")]
PLAN = FIRST + GROUNDING


def study_images(count: int, small: bool) -> list[ModelImage]:
    """RG1 (1955 rows × 1841 columns) shifted by a different amount per study: distinct pixels, same geometry."""
    from pydicom.data import get_testdata_file

    base = load_image(get_testdata_file("RG1_J2KR.dcm"))
    if small:  # smoke runs: a quarter-size image
        pixels = np.ascontiguousarray(base.pixels[::4, ::4])
        base = ModelImage(pixels=pixels, source=base.source.model_copy(update={"rows": pixels.shape[0], "columns": pixels.shape[1]}))
    return [ModelImage(pixels=np.ascontiguousarray(np.roll(base.pixels, 11 * i, axis=1)), source=base.source)
            for i in range(count)]


def png_url(image: ModelImage) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image.pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def post(base: str, model_id: str, url: str, question: str, max_tokens: int) -> dict:
    body = {"model": model_id, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": question}]}]}
    request = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def run_plan(backend, image: ModelImage, settings: InferenceSettings) -> list[str]:
    with backend.open_study(image, settings) as study:
        texts = [study.ask(question).text for question in FIRST]
        texts += [answer.text for answer in study.ask_all(GROUNDING)]
    return texts


def bench_in_process(model: RadVLMModel, images: list[ModelImage]) -> tuple[list[list[str]], float]:
    print("## 1. In-process plan (LocalBackend, prefix reuse): grounding one by one vs batched")
    print("(each study run in both modes back to back, order alternating; medians over studies)")
    backend = LocalBackend(model)
    run_plan(backend, images[0], InferenceSettings(max_batch=1))  # warm-up
    modes = {1: InferenceSettings(max_batch=1), 8: InferenceSettings(max_batch=8)}
    seconds: dict[int, list[float]] = {1: [], 8: []}
    answers: dict[int, list[list[str]]] = {1: [], 8: []}
    for index, image in enumerate(images):
        for max_batch in (1, 8) if index % 2 == 0 else (8, 1):
            started = time.perf_counter()
            answers[max_batch].append(run_plan(backend, image, modes[max_batch]))
            seconds[max_batch].append(time.perf_counter() - started)
    base = statistics.median(seconds[1])
    print(f"{'mode':<34}{'s/study':>9}{'studies/h':>11}{'ratio':>7}")
    for max_batch, times in seconds.items():
        label = "grounding one by one (baseline)" if max_batch == 1 else f"grounding batched (max_batch {max_batch})"
        per = statistics.median(times)
        print(f"{label:<34}{per:>9.3f}{3600 / per:>11.0f}{base / per:>6.2f}x")
    print(f"answers identical: {answers[8] == answers[1]}")
    return answers[1], base


def bench_worker_batches(model: RadVLMModel, images: list[ModelImage], reference: list[list[str]],
                         batches: list[int], clients: int, max_tokens: int, wait_ms: float, rounds: int) -> bool:
    print(f"\n## 2. Worker app on loopback: {clients} concurrent studies, one request per question "
          f"(PNG {images[0].source.columns}×{images[0].source.rows} in every request), max_batch_wait_ms {wait_ms:g}")
    urls = [png_url(image) for image in images]
    all_same = True
    best: dict[int, tuple[float, float]] = {}  # max_batch → (best questions/s, its mean batch)
    sweep = [b for r in range(rounds) for b in (batches if r % 2 == 0 else batches[::-1])]
    print(f"({rounds} rounds, order alternating; best round per max_batch)")
    for max_batch in sweep:
        service = ChatService.for_model(model, cache_size=len(images) + clients, max_batch=max_batch,
                                        max_batch_wait_ms=wait_ms)
        server = ThreadedServer(create_app(service, ApiSettings(token=TOKEN, max_request_bytes=64 * 2**20)),
                                "127.0.0.1", 0)
        server.start()
        try:
            def study(index: int) -> tuple[list[str], list[int]]:
                texts, sizes = [], []
                for question in PLAN:
                    body = post(server.url, model.info.model_id, urls[index], question, max_tokens)
                    texts.append(body["choices"][0]["message"]["content"])
                    sizes.append(body["radvlm"]["batch_size"])
                return texts, sizes

            study(0)  # warm-up (and its prefix is then cached, as in a running worker)
            started = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                outcomes = list(pool.map(study, range(len(images))))
            seconds = time.perf_counter() - started
        finally:
            server.stop()
            service.close()
        rate = len(images) * len(PLAN) / seconds
        sizes = [size for _, per in outcomes for size in per]
        all_same &= [texts for texts, _ in outcomes] == reference
        if rate > best.get(max_batch, (0.0, 0.0))[0]:
            best[max_batch] = (rate, statistics.mean(sizes))
    base_rate = best[batches[0]][0]
    print(f"{'max_batch':>9}{'questions/s':>13}{'studies/h':>11}{'mean batch':>12}{'ratio':>8}")
    for max_batch in batches:
        rate, mean_batch = best[max_batch]
        print(f"{max_batch:>9}{rate:>13.2f}{3600 * rate / len(PLAN):>11.0f}{mean_batch:>12.2f}{rate / base_rate:>7.2f}x")
    print(f"answers identical to in-process in every round: {all_same}")
    return all_same


def bench_http_overhead(model: RadVLMModel, image: ModelImage, max_tokens: int) -> None:
    print("\n## 3. HTTP overhead per question (follow-up questions, prefix cached; one client, max_batch 1)")
    url = png_url(image)
    service = ChatService.for_model(model, cache_size=4)
    server = ThreadedServer(create_app(service, ApiSettings(token=TOKEN, max_request_bytes=64 * 2**20)),
                            "127.0.0.1", 0)
    server.start()
    try:
        post(server.url, model.info.model_id, url, PLAN[0], max_tokens)  # encodes and caches the prefix
        http = []
        for question in PLAN * 2:
            started = time.perf_counter()
            post(server.url, model.info.model_id, url, question, max_tokens)
            http.append(time.perf_counter() - started)
    finally:
        server.stop()
    from inference.model import Turn

    prefix = model.encode_image(image)
    local = []
    for question in PLAN * 2:
        started = time.perf_counter()
        model.answer(prefix, [Turn("user", question)], max_new_tokens=max_tokens)
        local.append(time.perf_counter() - started)
    http_s, local_s = statistics.median(http), statistics.median(local)
    print(f"median per question: HTTP {http_s * 1000:.1f} ms, in-process {local_s * 1000:.1f} ms, overhead "
          f"{(http_s - local_s) * 1000:.1f} ms ({http_s / local_s:.2f}x; PNG {len(url) / 2**20:.1f} MiB as base64 "
          "decoded and hashed per request)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_worker(model_dir: Path, port: int, max_batch: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "RADVLM_API__TOKEN": TOKEN, "RADVLM_INFERENCE__MAX_BATCH": str(max_batch),
           "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "worker", "--model", str(model_dir),
                             "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


def bench_remote(model_dir: Path, model: RadVLMModel, images: list[ModelImage], reference: list[list[str]],
                 max_tokens: int, inproc_per_study: float, threads: int) -> bool | None:
    try:
        from inference.remote import RemoteBackend
    except ImportError:
        print("\n## 4. Remote backend: inference.remote not available here; skipped")
        return None
    from config.settings import RemoteEndpoint

    print("\n## 4. The node's plan in-process vs through `radvlm worker` processes (remote backend)")
    print(f"{'mode':<28}{'s/study':>9}{'studies/h':>11}{'ratio':>7}{'identical':>11}")
    print(f"{'in-process (baseline)':<28}{inproc_per_study:>9.3f}{3600 / inproc_per_study:>11.0f}{1:>6.2f}x{'True':>11}")
    all_same = True
    for workers in (1, 2):
        ports = [free_port() for _ in range(workers)]
        processes = [_start_worker(model_dir, port, 8, threads) for port in ports]
        try:
            for process in processes:
                line = process.stdout.readline()
                if '"ready"' not in line:
                    raise RuntimeError(f"worker did not start: {line!r}")
            endpoints = [RemoteEndpoint(url=f"http://127.0.0.1:{port}", token=TOKEN, max_concurrent=8)
                         for port in ports]
            settings = InferenceSettings(backend="remote", endpoints=endpoints)
            backend = RemoteBackend(settings, model.settings, health_checks=False)
            try:
                run_plan(backend, images[0], settings)  # warm-up
                started = time.perf_counter()
                with ThreadPoolExecutor(2 * workers) as pool:
                    answers = list(pool.map(lambda image: run_plan(backend, image, settings), images))
                seconds = time.perf_counter() - started
            finally:
                backend.close()
        finally:
            for process in processes:
                process.terminate()
                process.wait(20)
        same = answers == reference
        all_same &= same
        per = seconds / len(images)
        print(f"{f'{workers} worker(s), {2 * workers} studies at once':<28}{per:>9.3f}{3600 / per:>11.0f}"
              f"{inproc_per_study / per:>6.2f}x{str(same):>11}")
    return all_same


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batches", default="1,2,4,8", help="max_batch values of the worker")
    parser.add_argument("--clients", type=int, default=8, help="concurrent studies sent to the worker")
    parser.add_argument("--rounds", type=int, default=2, help="sweeps over --batches (order alternating)")
    parser.add_argument("--wait-ms", type=float, default=10.0, help="[inference] max_batch_wait_ms")
    parser.add_argument("--geometry", choices=["real", "small"], default="real",
                        help="small: 32-px tiles and a quarter-size image (smoke runs)")
    parser.add_argument("--no-remote", action="store_true", help="skip section 4 (worker processes)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (default 1: on a small shared CPU, OpenMP teams spin-wait for"
                             " descheduled threads and a tiny model's steps get slower, not faster)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    print(f"# bench_workers {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.processor() or platform.machine()}"
          f", {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    tile, patch = (384, 14) if args.geometry == "real" else (32, 8)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model(Path(tmp) / "tiny", tile_size=tile, patch_size=patch)
        model = load_model(ModelSettings(path=folder, max_new_tokens=args.max_new_tokens))
        images = study_images(args.studies, small=args.geometry == "small")
        prefix = model.encode_image(images[0], reuse_prefix=False)
        print(f"model: tiny random, {tile}-px tiles, patch {patch}; image {images[0].source.columns}×"
              f"{images[0].source.rows}: {int(prefix.image_inputs['pixel_values'].shape[1])} tiles, prefix "
              f"{len(prefix.prefix_ids)} tokens; {args.studies} studies × {len(PLAN)} questions, "
              f"≤{args.max_new_tokens} new tokens\n")
        reference, per_study = bench_in_process(model, images)
        same = bench_worker_batches(model, images, reference, [int(b) for b in args.batches.split(",")],
                                    args.clients, args.max_new_tokens, args.wait_ms, args.rounds)
        bench_http_overhead(model, images[0], args.max_new_tokens)
        remote_same = None if args.no_remote else bench_remote(folder, model, images, reference,
                                                               args.max_new_tokens, per_study, args.threads)
    print(f"\nanswers identical in every mode: {same and remote_same is not False}")


if __name__ == "__main__":
    main()

"""Latency of the OpenAI-compatible chat API on loopback (stand-alone app, as `radvlm worker`
serves it), measured with a plain HTTP client (urllib, one connection per request) and, for comparison, the
official `openai` client (whose keep-alive connection adds ~40 ms per request on loopback Linux,
a client-side TCP delayed-ACK effect, not server time): p50/p95 over N requests for

* ``first turn``: a new image every request (decode, preprocess, image prefill, answer);
* ``follow-up``: the second turn about an image already seen (its KV prefix comes from the cache);
* ``models``: ``GET /v1/models`` (HTTP + auth overhead alone).

    .venv/bin/python benchmarks/bench_api.py --requests 50 [--model DIR] [--max-tokens 16]

Without --model a tiny random model is built in a temp dir (numbers then measure the serving
overhead, not a real RadVLM).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import openai  # noqa: E402
from PIL import Image  # noqa: E402

from config.settings import ApiSettings, ModelSettings  # noqa: E402
from inference.api import create_app  # noqa: E402
from inference.chat_service import ChatService  # noqa: E402
from inference.model import load_model  # noqa: E402
from inference.serving import ThreadedServer  # noqa: E402

TOKEN = "bench-token"


def png_url(seed: int, size: int) -> str:
    yy, xx = np.mgrid[0:size, 0:size]
    pixels = ((np.sin(xx / 7 + seed) + np.cos(yy / 9)) * 60 + 128).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def post(base: str, body: dict) -> dict:
    request = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def get(url: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def summary(name: str, seconds: list[float]) -> dict[str, float | str | int]:
    ms = [s * 1000 for s in seconds]
    return {"case": name, "n": len(ms), "p50_ms": round(percentile(ms, 50), 2), "p95_ms": round(percentile(ms, 95), 2),
            "mean_ms": round(statistics.fmean(ms), 2), "max_ms": round(max(ms), 2)}


def run(model_dir: Path, requests: int, max_tokens: int, image_size: int) -> list[dict]:
    service = ChatService(lambda: load_model(ModelSettings(path=model_dir, max_new_tokens=max_tokens)))
    server = ThreadedServer(create_app(service, ApiSettings(token=TOKEN)), "127.0.0.1", 0)
    server.start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        question = "Where is the heart located in this Chest X-ray?"
        for seed in range(3):  # warm-up
            client.chat.completions.create(model=model, max_tokens=max_tokens, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(-1 - seed, image_size)}},
                                             {"type": "text", "text": question}]}])
        first, follow, models, models_openai, first_openai = [], [], [], [], []
        for i in range(requests):
            url = png_url(i, image_size)
            turn = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                {"type": "text", "text": question}]}
            started = time.perf_counter()
            answer = post(server.url, {"model": model, "max_tokens": max_tokens, "messages": [turn]})
            first.append(time.perf_counter() - started)
            started = time.perf_counter()
            post(server.url, {"model": model, "max_tokens": max_tokens, "messages": [
                turn, {"role": "assistant", "content": answer["choices"][0]["message"]["content"] or ""},
                {"role": "user", "content": "Is there a pleural effusion?"}]})
            follow.append(time.perf_counter() - started)
            started = time.perf_counter()
            get(server.url + "/v1/models")
            models.append(time.perf_counter() - started)
            turn_new = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(10_000 + i, image_size)}},
                                                    {"type": "text", "text": question}]}
            started = time.perf_counter()
            client.chat.completions.create(model=model, max_tokens=max_tokens, messages=[turn_new])
            first_openai.append(time.perf_counter() - started)
            started = time.perf_counter()
            client.models.list()
            models_openai.append(time.perf_counter() - started)
        return [summary("first turn (new image)", first), summary("follow-up (cached image prefix)", follow),
                summary("GET /v1/models", models), summary("first turn via openai client", first_openai),
                summary("GET /v1/models via openai client", models_openai)]
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=256, help="square PNG side in pixels")
    parser.add_argument("--model", type=Path, help="model folder (default: a tiny random model)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        if args.model is None:
            from inference.tiny import build_tiny_model

            model_dir = build_tiny_model(Path(folder) / "tiny", seed=0)
        else:
            model_dir = args.model
        rows = run(model_dir, args.requests, args.max_tokens, args.image_size)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'case':36s} {'n':>4s} {'p50 ms':>9s} {'p95 ms':>9s} {'mean ms':>9s} {'max ms':>9s}")
        for r in rows:
            print(f"{r['case']:36s} {r['n']:4d} {r['p50_ms']:9.2f} {r['p95_ms']:9.2f} {r['mean_ms']:9.2f} {r['max_ms']:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

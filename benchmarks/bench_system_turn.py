"""Which handling of a client's system message gives answers closer to training: the shipped demo
model (trained without a system turn) answers held-out phantom questions with no system turn (the
API's rule: client system messages ignored) and with a system turn applied through the chat
template; each answer is compared with its training target (exact, difflib similarity).

    .venv/bin/python benchmarks/bench_system_turn.py [--phantoms 12] [--persona]
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config.settings import DEMO_MODEL_DIR, ModelSettings  # noqa: E402
from inference.image import load_image  # noqa: E402
from inference.model import Turn, load_model  # noqa: E402
from training.phantoms import PhantomConfig  # noqa: E402
from training.phantoms.dataset import write_phantom_dataset  # noqa: E402

PERSONA = "You are ChatGPT, a large language model trained by OpenAI. Answer as concisely as possible."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", type=int, default=12)
    parser.add_argument("--seed", type=int, default=987)
    parser.add_argument("--max-new-tokens", type=int, default=120)
    parser.add_argument("--persona", action="store_true", help="also a typical front-end persona prompt")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="radvlm-system-turn-"))
    write_phantom_dataset(root, args.phantoms, seed=args.seed, config=PhantomConfig(size=128), dicom=False,
                          png=True, variants="canonical")
    records = json.loads((root / "instructions.json").read_text())
    model = load_model(ModelSettings(path=DEMO_MODEL_DIR, max_new_tokens=args.max_new_tokens))
    conditions = {"none (the API's rule)": None, "'You are a helpful assistant.'": "You are a helpful assistant."}
    if args.persona:
        conditions["front-end persona"] = PERSONA
    for label, prompt in conditions.items():
        model.settings.system_prompt = prompt
        exact = 0
        similarity = 0.0
        for record in records:
            prefix = model.encode_image(load_image(root / record["image"]), reuse_prefix=True)
            question = record["conversations"][0]["value"].replace("<image>", "").strip()
            target = record["conversations"][1]["value"].strip()
            answer = model.answer(prefix, [Turn("user", question)]).text
            exact += answer == target
            similarity += difflib.SequenceMatcher(None, answer, target).ratio()
        print(f"{label:35} exact {exact}/{len(records)}  mean similarity {similarity / len(records):.3f}",
              flush=True)


if __name__ == "__main__":
    main()

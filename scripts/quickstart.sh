#!/usr/bin/env bash
# Fresh machine → ./.venv with radvlm installed → the main job on embedded defaults: `radvlm demo`.
# It starts the DICOM node (C-STORE SCP "RADVLM") with the shipped synthetic-phantom demo model in a
# temporary data directory on free ports, sends it held-out phantom studies by C-STORE, reads the
# delivered TID 1500 SR and FHIR Bundle back, prints truth vs predicted labels and the IoU of every
# SR region, then the evaluation metrics. Phantom model: demonstration and testing, not clinical use.
# Extra arguments go to `radvlm demo` (e.g. --count 32, --keep DIR). Run the node itself with
# `.venv/bin/radvlm serve` (README, "Run the node").
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e '.[samples,eval]'
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

model_dir=$(.venv/bin/python -c 'from config import load_settings; print(load_settings().model.path)')
if [ ! -e "$model_dir" ]; then
  # Only when [model] path (RADVLM_CONFIG / RADVLM_MODEL__PATH) names a missing folder: the shipped
  # demo model is the embedded default and always present.
  echo "No model at $model_dir ([model] path). Writing a tiny RANDOM-weight model there for a smoke run;"
  echo "its answers are meaningless. Put the RadVLM weights (HF llava_onevision folder) there for real results."
  .venv/bin/radvlm tiny-model "$model_dir"
fi
exec .venv/bin/radvlm demo "$@"

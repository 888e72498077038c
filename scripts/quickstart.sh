#!/usr/bin/env bash
# Fresh machine → ./.venv with radvlm installed → the main job on embedded defaults:
# the DICOM node (`radvlm serve`): C-STORE SCP "RADVLM" on port 11112, results under
# ./radvlm-data/results/<StudyInstanceUID>/, /healthz and /metrics on http://127.0.0.1:8089.
# Send it a chest X-ray from another shell, e.g. the real CR shipped by pydicom-data:
#   storescu -aec RADVLM 127.0.0.1 11112 "$(.venv/bin/python -c 'from pydicom.data import get_testdata_file as f; print(f("RG1_UNCR.dcm"))')"
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e '.[samples]'
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

model_dir=$(.venv/bin/python -c 'from config import load_settings; print(load_settings().model.path)')
if [ ! -e "$model_dir" ]; then
  echo "No model at $model_dir ([model] path). Writing a tiny RANDOM-weight model there for a smoke run;"
  echo "its answers are meaningless. Put the RadVLM weights (HF llava_onevision folder) there for real results."
  .venv/bin/radvlm tiny-model "$model_dir"
fi
exec .venv/bin/radvlm serve "$@"

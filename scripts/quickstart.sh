#!/usr/bin/env bash
# Fresh machine → ./.venv with radvlm installed → the main job on embedded defaults.
# Until the DICOM node lands, the main job is `radvlm infer` on a real chest CR shipped by
# pydicom-data (RG1, JPEG 2000), writing results under ./radvlm-out/.
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
sample=$(.venv/bin/python -c 'from pydicom.data import get_testdata_file; print(get_testdata_file("RG1_J2KR.dcm"))')
mkdir -p radvlm-out
exec .venv/bin/radvlm infer "$sample" "$@"

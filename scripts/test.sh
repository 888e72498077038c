#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need from the project's
# own files (Debian packages listed in scripts/apt-packages.txt, the Python package with its
# `test` extra into ./.venv), then runs pytest. Servers the tests use (Orthanc, a FHIR server)
# are started and stopped by the tests themselves on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_wanted=$(grep -v '^\s*#' scripts/apt-packages.txt | xargs)
missing=()
# a package counts as present when installed or provided by an installed one (NodeSource's nodejs provides npm)
provided=$(dpkg-query -W -f='${db:Status-Abbrev} ${Provides}\n' 2>/dev/null | awk '/^ii/ {$1=""; print}' | tr ',' '\n' \
  | sed 's/(.*//; s/ //g' | sort -u)
for pkg in $apt_wanted; do
  dpkg -s "$pkg" >/dev/null 2>&1 || grep -qx "$pkg" <<<"$provided" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "missing Debian packages (need root to install): ${missing[*]}" >&2
    exit 1
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
[ -d tests/peers/medplum/node_modules ] || npm ci --prefix tests/peers/medplum --no-audit --no-fund --loglevel=error
# prebuilt OHIF viewer (npm pack, cached in .cache/ohif/) for tests/test_ohif_e2e.py, which is
# skipped without it offline and fails without it under CI=true
scripts/fetch-ohif.sh || echo "warning: OHIF not fetched (tests/test_ohif_e2e.py needs it)" >&2

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"

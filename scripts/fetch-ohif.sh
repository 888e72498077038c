#!/usr/bin/env bash
# Fetches the prebuilt OHIF viewer once: `npm pack @ohif/app@<version>` (≈50 MB, its package/dist
# is a complete offline build) into .cache/ohif/ (gitignored) and unpacks it, so that
# tests/test_ohif_e2e.py and deploy/ohif/serve.py find .cache/ohif/package/dist. Re-runs are free.
# Usage: scripts/fetch-ohif.sh [cache-dir]   (OHIF_VERSION overrides the version)
set -euo pipefail
cd "$(dirname "$0")/.."

version=${OHIF_VERSION:-3.13.2}
cache=${1:-.cache/ohif}
tarball="$cache/ohif-app-$version.tgz"
dist="$cache/package/dist"

if [ -f "$dist/index.html" ] && [ "$(cat "$cache/VERSION" 2>/dev/null)" = "$version" ]; then
  exit 0
fi
if ! command -v npm >/dev/null; then
  echo "fetch-ohif.sh: npm not found (Debian package 'npm', listed in scripts/apt-packages.txt)" >&2
  exit 1
fi
mkdir -p "$cache"
if [ ! -s "$tarball" ]; then
  echo "fetching @ohif/app@$version with npm pack into $cache"
  (cd "$cache" && npm pack "@ohif/app@$version" --silent >/dev/null)
fi
rm -rf "$cache/package"
tar -xzf "$tarball" -C "$cache"
[ -f "$dist/index.html" ] || { echo "fetch-ohif.sh: $tarball has no package/dist/index.html" >&2; exit 1; }
echo "$version" >"$cache/VERSION"

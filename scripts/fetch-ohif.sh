#!/usr/bin/env bash
# Fetches the prebuilt OHIF viewer once: `npm pack @ohif/app@<version>` (≈50 MB, its package/dist
# is a complete offline build) into .cache/ohif/ (gitignored), checks the tarball's SHA-256 and
# unpacks it, so that tests/test_ohif_e2e.py and deploy/ohif/serve.py find
# .cache/ohif/package/dist (docs/viewer.md). Re-runs are free.
# Usage: scripts/fetch-ohif.sh [cache-dir]   (OHIF_VERSION + OHIF_SHA256 fetch another version)
set -euo pipefail
cd "$(dirname "$0")/.."

version=${OHIF_VERSION:-3.13.2}
if [ -n "${OHIF_VERSION:-}" ]; then
  sha256=${OHIF_SHA256:-}
else
  sha256=b189d3963bfc58e9394a9db8c7be75d07beb029ec211dbb126d47b62969dd3f1  # @ohif/app-3.13.2.tgz
fi
cache=${1:-.cache/ohif}
tarball="$cache/ohif-app-$version.tgz"
dist="$cache/package/dist"

if [ -f "$dist/index.html" ] && [ "$(cat "$cache/VERSION" 2>/dev/null)" = "$version" ]; then
  exit 0
fi
checked() {
  [ -s "$tarball" ] || return 1
  [ -z "$sha256" ] || echo "$sha256  $tarball" | sha256sum --check --status
}
if ! checked; then
  if ! command -v npm >/dev/null; then
    echo "fetch-ohif.sh: npm not found (Debian package 'npm', listed in scripts/apt-packages.txt)" >&2
    exit 1
  fi
  mkdir -p "$cache"
  rm -f "$tarball"
  echo "fetching @ohif/app@$version with npm pack into $cache"
  (cd "$cache" && npm pack "@ohif/app@$version" --silent >/dev/null)
  if ! checked; then
    echo "fetch-ohif.sh: $tarball does not have the expected SHA-256 $sha256" >&2
    exit 1
  fi
fi
rm -rf "$cache/package" "$cache/VERSION"
tar -xzf "$tarball" -C "$cache"
[ -f "$dist/index.html" ] || { echo "fetch-ohif.sh: $tarball has no package/dist/index.html" >&2; exit 1; }
echo "$version" >"$cache/VERSION"

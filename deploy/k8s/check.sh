#!/usr/bin/env bash
# Renders every overlay with kustomize and validates each object against the Kubernetes
# schema (kubernetes-validate, strict: unknown fields fail). The custom resources that schema
# lacks (PodMonitor, ScaledObject) are checked by tests/deploy.rs; any other object without a
# schema fails here. Usage: deploy/k8s/check.sh [OUT_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$(mktemp -d)}"
mkdir -p "$out"
known_crds='kind (PodMonitor|ScaledObject) with api version (monitoring.coreos.com/v1|keda.sh/v1alpha1)'
status=0
for overlay in "$here"/overlays/*/; do
    name="$(basename "$overlay")"
    kubectl kustomize "$overlay" > "$out/$name.yaml"
    report="$(kubernetes-validate --strict "$out/$name.yaml" 2>&1)" || status=1
    echo "$report"
    if grep -v -E "$known_crds" <<< "$report" | grep -q -E '^(WARN|ERROR)'; then
        echo "k8s: $name: an object failed or has no schema" >&2
        status=1
    fi
    passed="$(grep -c '^INFO .* passed' <<< "$report" || true)"
    echo "k8s: $name: $passed objects valid"
done
[ "$status" = 0 ] && echo "k8s: all overlays render and validate"
exit "$status"

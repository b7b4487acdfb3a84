#!/usr/bin/env bash
# Prints the folder holding the Prometheus operator's CRDs (ServiceMonitor, PodMonitor, …),
# taken from its Go module through the module proxy into the Go module cache. The chart tests
# install them to dry-run the chart's monitors against their real schemas.
set -euo pipefail
version="${LOCALMODEL_PROMETHEUS_OPERATOR_VERSION:-v0.85.0}"
dir=$(cd "${TMPDIR:-/tmp}" && GOTOOLCHAIN=local GOFLAGS=-mod=mod \
  go mod download -json "github.com/prometheus-operator/prometheus-operator@$version" |
  sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
if [[ -z "$dir" || ! -d "$dir/example/prometheus-operator-crd" ]]; then
  echo "operator-crds.sh: no CRD folder in prometheus-operator $version ($dir)" >&2
  exit 1
fi
echo "$dir/example/prometheus-operator-crd"
